"""DistributedDataParallel with 2 CPU processes (gloo, started by torchrun):
the gradients equal single-process gradients on the same global batch for
reduction="mean" (and for "sum" with the loss multiplied by the world size);
Chainer's normalisation is pooled per rank. Expectations come from the
float64 pure-PyTorch reference. Also the demo under torchrun."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from discloss.reference import discriminative_loss_reference
from helpers import assert_close
import ddp_worker

WORLD_SIZE = 2
TIMEOUT_SECONDS = 240
HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(args, cwd):
    """Run torchrun with 2 processes on this machine; stop it (and its workers) past the timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc_per_node", str(WORLD_SIZE)] + args
    log_path = os.path.join(cwd, "torchrun.log")
    # Output to a file, not a pipe: a worker that outlived torchrun would hold a pipe open.
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
        try:
            process.wait(timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.terminate()  # torchrun stops its workers on SIGTERM
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    with open(log_path) as log:
        output = log.read()
    assert process.returncode == 0, f"torchrun exited with {process.returncode} (timeout {TIMEOUT_SECONDS} s):\n{output}"
    return output


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([os.path.join(HERE, "ddp_worker.py"), str(out)], cwd=out)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def reference_grads(loss_of_embeddings, images):
    """Parameter gradients of one process running the network on ``images`` with a float64 reference loss."""
    network = ddp_worker.make_network()
    loss_of_embeddings(network(images)).backward()
    return [p.grad for p in network.parameters()]


def assert_grads_equal(actual, expected, what):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert float(e.abs().max()) > 0
        assert_close(a, e, torch.float64, f"{what}, parameter {index}")


def test_ranks_hold_the_same_gradients(ddp_grads):
    for name in ddp_worker.CASES:
        for a, b in zip(ddp_grads[0][name], ddp_grads[1][name]):
            assert torch.equal(a, b), name


def test_mean_reduction_matches_one_process_on_the_global_batch(ddp_grads):
    images, labels = ddp_worker.global_batch(WORLD_SIZE)
    expected = reference_grads(lambda e: sum(discriminative_loss_reference(e, labels, gamma=0.1)), images)
    assert_grads_equal(ddp_grads[0]["mean"], expected, "reduction='mean'")


def test_sum_reduction_times_world_size_matches_one_process(ddp_grads):
    images, labels = ddp_worker.global_batch(WORLD_SIZE)
    expected = reference_grads(lambda e: sum(discriminative_loss_reference(e, labels, gamma=0.1, reduction="sum")),
                               images)
    assert_grads_equal(ddp_grads[0]["sum"], expected, "reduction='sum' x world size")


def test_chainer_normalisation_is_pooled_per_rank(ddp_grads):
    images, labels = ddp_worker.global_batch(WORLD_SIZE)

    def chainer(e, lab):
        return sum(discriminative_loss_reference(e, lab, normalization="chainer", max_instances=ddp_worker.K - 1,
                                                 norm=1))

    per_rank = [reference_grads(lambda e, s=ddp_worker.rank_slice(r): chainer(e[s], labels[s]), images)
                for r in range(WORLD_SIZE)]
    expected = [sum(grads) / WORLD_SIZE for grads in zip(*per_rank)]
    assert_grads_equal(ddp_grads[0]["chainer"], expected, "chainer, mean over ranks of per-rank pools")
    pooled_globally = reference_grads(lambda e: chainer(e, labels), images)
    assert not all(torch.allclose(a, b) for a, b in zip(ddp_grads[0]["chainer"], pooled_globally))


def test_demo_under_torchrun_gathers_the_evaluation(tmp_path):
    out = tmp_path / "run"
    printed = torchrun(["-m", "discloss.demo", "--steps", "2", "--image-size", "32", "--batch-size", "2",
                        "--eval-images", "3", "--out", str(out), "--device", "cpu", "--threads", "1",
                        "--log-every", "0"], cwd=tmp_path)
    assert "2 processes (DDP, 2 images each per step)" in printed
    assert "step     2/2" in printed
    # 3 held-out images split 2 + 1 between the ranks, gathered for the score; printed once (rank 0)
    # per seed mode.
    for mode in ("hashed", "seediness-order", "seediness"):
        assert printed.count(f"held-out (3 images, 32x32), {mode} seeds: mean SBD") == 1
    assert (out / "checkpoint.pt").exists() and (out / "panel.png").exists()

"""One rank of tests/test_ddp.py, started by torchrun: a tiny float64 network
under DistributedDataParallel (gloo), the loss on this rank's share of the
global batch, and the parameter gradients written to OUTDIR/rank<r>.pt.

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUTDIR
"""

import os
import sys

import torch

import discloss
from discloss import distributed
from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss

PER_RANK = 2  # images per rank; equal on every rank
K = 6


def make_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(6, 4, 1)).double()


def global_batch(world_size: int):
    """Images (world_size * PER_RANK, 3, 10, 12) float64 and labels in 0..K-1 (0 = background)."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(world_size * PER_RANK, 3, 10, 12, generator=g, dtype=torch.float64)
    rows = torch.arange(10).view(10, 1) // 4
    cols = torch.arange(12).view(1, 12) // 4
    blocks = (rows * 3 + cols) % K  # coherent blocks of labels, some background
    shifts = torch.randint(0, K, (world_size * PER_RANK, 1, 1), generator=g)
    labels = (blocks + shifts) % K
    return images, labels


def rank_slice(rank: int) -> slice:
    return slice(rank * PER_RANK, (rank + 1) * PER_RANK)


# How each case's loss is formed; the test computes the single-process
# expectations from the same definitions.
CASES = {
    "mean": lambda e, l, world: sum(discloss.discriminative_loss(e, l, gamma=0.1, max_instances=K)),
    "sum": lambda e, l, world: world * sum(discloss.discriminative_loss(e, l, gamma=0.1, max_instances=K,
                                                                         reduction="sum")),
    "chainer": lambda e, l, world: sum(chainer_loss(e, l, 0.5, 1.5, K - 1)),
}


def main(out_dir: str) -> None:
    context = distributed.setup("cpu", timeout_seconds=60)
    assert context.distributed, "expected to run under torchrun with WORLD_SIZE > 1"
    network = distributed.wrap_model(make_network(), context)
    images, labels = global_batch(context.world_size)
    mine = rank_slice(context.rank)
    grads = {}
    for name, loss_of in CASES.items():
        network.zero_grad(set_to_none=True)
        loss_of(network(images[mine]), labels[mine], context.world_size).backward()
        grads[name] = [p.grad.detach().clone() for p in network.parameters()]
    torch.save(grads, os.path.join(out_dir, f"rank{context.rank}.pt"))
    distributed.cleanup(context)


if __name__ == "__main__":
    main(sys.argv[1])

"""A few steps of the end-to-end demo, its seediness target and its panel."""

import math

import numpy as np
import pytest
import torch

from discloss import demo
from discloss.demo._threads import ThreadChooser
from discloss.demo.panel import _match_to_truth
from discloss.demo.training import _learning_rate


def test_demo_smoke(tmp_path, capsys):
    # One thread: tiny tensors gain nothing from more, and it keeps the test
    # fast when other programs keep the cores busy.
    out = tmp_path / "run"
    result = demo.main(["--steps", "4", "--image-size", "64", "--batch-size", "2", "--eval-images", "3",
                        "--out", str(out), "--device", "cpu", "--log-every", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "step     4/4" in printed and "seediness" in printed
    assert result["steps"] == 4
    for suffix, mode in (("", "hashed"), ("_seediness_order", "seediness-order"), ("_seediness", "seediness"),
                         ("_robust", "robust")):
        assert 0.0 <= result["sbd" + suffix] <= 1.0 and result["abs_dic" + suffix] >= 0.0
        assert f"{mode} seeds: mean SBD {result['sbd' + suffix]:.3f}" in printed

    import matplotlib.image

    panel = matplotlib.image.imread(result["panel"])
    # 3 rows of 6 columns of 2.4 inch tiles at 100 dpi, 0.4 inch for the titles.
    assert panel.shape[:2] == (760, 1440)
    assert panel[..., :3].std() > 0.1  # drawn, not blank

    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    model = demo.StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        logits, embeddings, seediness = model(torch.rand(1, 3, 64, 64))
    assert logits.shape == seediness.shape == (1, 64, 64) and embeddings.shape == (1, 8, 64, 64)
    assert torch.isfinite(embeddings).all()


def test_seediness_target_by_hand():
    # Image 0: instance 1 at 0 and 1 (mean 0.5), instance 2 at 5, background at 9.
    # Image 1: instance 1 at 3 and 7 (mean 5): means are per image.
    embeddings = torch.tensor([[[[0.0, 1.0, 5.0, 9.0]]], [[[3.0, 7.0, 0.0, 0.0]]]])  # (2, 1, 1, 4)
    labels = torch.tensor([[[1, 1, 2, 0]], [[1, 1, 0, 0]]])
    target = demo.seediness_target(embeddings, labels, delta_v=0.5)
    # exp(-d^2 / (2 * 0.25)): d = 0.5 -> exp(-0.5); d = 2 -> exp(-8).
    expected = torch.tensor([[[math.exp(-0.5), math.exp(-0.5), 1.0, 0.0]], [[math.exp(-8), math.exp(-8), 0.0, 0.0]]])
    torch.testing.assert_close(target, expected)


def test_foreground_loss_by_hand():
    # Logits 0: probability 1/2 everywhere, cross-entropy ln 2 per pixel. Image 0 has
    # 1 foreground pixel of 4, image 1 none: Dice (2*1/2*t + 1) / (1/2*4 + t + 1) with
    # t foreground pixels, 2/4 for image 0 and 1/3 for image 1.
    logits = torch.zeros(2, 2, 2)
    foreground = torch.zeros(2, 2, 2, dtype=torch.bool)
    foreground[0, 0, 0] = True
    expected = math.log(2.0) + ((1.0 - 2.0 / 4.0) + (1.0 - 1.0 / 3.0)) / 2.0
    assert float(demo.foreground_loss(logits, foreground)) == pytest.approx(expected, rel=1e-6)


def test_seediness_loss_reaches_the_head_only():
    embeddings = torch.randn(2, 3, 4, 4, requires_grad=True)
    logits = torch.zeros(2, 4, 4, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, 0, 0] = 1
    loss = demo.seediness_loss(logits, embeddings, labels, delta_v=0.5)
    loss.backward()
    assert embeddings.grad is None
    # d/dlogit of the mean BCE at logit 0: (sigmoid(0) - target) / foreground pixels.
    target = demo.seediness_target(embeddings, labels, 0.5)
    foreground = labels > 0
    expected = torch.where(foreground, (0.5 - target) / foreground.sum(), torch.zeros_like(target))
    torch.testing.assert_close(logits.grad, expected)


def test_predictions_take_the_colour_of_their_best_match():
    truth = np.array([[0, 1, 1, 2, 2, 2]])
    predicted = np.array([[0, 2, 2, 1, 1, 3]])  # 2 is truth 1, 1 is truth 2, 3 is extra
    np.testing.assert_array_equal(_match_to_truth(predicted, truth), [[0, 1, 1, 2, 2, 3]])
    one_stick = np.array([[0, 2, 2, 2, 2, 2]])
    clash = np.array([[0, 1, 1, 1, 2, 2]])  # both overlap truth 2; the larger overlap gets its colour
    np.testing.assert_array_equal(_match_to_truth(clash, one_stick), [[0, 2, 2, 2, 3, 3]])


def test_sticks_option():
    assert demo.parse_args(["--sticks", "16-24"]).sticks == (16, 24)
    assert demo.parse_args(["--sticks", "5"]).sticks == (5, 5)
    assert demo.parse_args([]).sticks == (8, 8)


def test_time_limit_stops_training(tmp_path, capsys):
    result = demo.main(["--steps", "1000", "--time-limit", "0.5", "--image-size", "32", "--batch-size", "1",
                        "--eval-images", "1", "--out", str(tmp_path), "--device", "cpu", "--threads", "1"])
    assert 1 <= result["steps"] < 1000
    assert "time limit of 0.5 s reached" in capsys.readouterr().out


def test_thread_chooser_keeps_the_faster_thread_count():
    original = torch.get_num_threads()
    lines = []
    chooser = ThreadChooser([2, 1], recheck_seconds=1e9, probe_steps=2, log=lines.append)
    try:
        used = []
        for _ in range(8):
            chooser.before_step()
            used.append(torch.get_num_threads())
            chooser.after_step(1.0 if torch.get_num_threads() == 2 else 0.25)
        assert used == [2, 2, 2, 1, 1, 1, 1, 1]
        assert chooser.chosen == 1 and lines == ["using 1 CPU thread (median step time: 2 threads 1.00 s, 1 thread 0.25 s)"]
        chooser.recheck_seconds = 0.0
        chooser.after_step(0.0)  # not probing: ignored
        chooser._recheck_at = 0.0
        chooser.before_step()  # due for a recheck: the contest starts again
        assert torch.get_num_threads() == 2
        chooser.settle()  # training ended mid-contest: back to the chosen count
        assert torch.get_num_threads() == 1
        chooser.before_step()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(original)


def test_learning_rate_schedule_warms_up_then_anneals():
    peak = 1.0
    assert _learning_rate(0.0, peak, warmup=0.1) < 0.1
    assert _learning_rate(0.1, peak, warmup=0.1) == pytest.approx(peak)
    assert _learning_rate(1.0, peak, warmup=0.1) == pytest.approx(0.01 * peak)


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--image-size", "30"), ("--time-limit", "-1"),
                                           ("--sticks", "9-3"), ("--sticks", "x")])
def test_invalid_options_name_the_option(option, value, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args([option, value])
    assert option in capsys.readouterr().err

"""A few steps of the end-to-end demo, and its PNG writer."""

import struct
import zlib

import numpy as np
import pytest
import torch

from discloss import demo


def read_png(path):
    """Decode an 8-bit RGB, non-interlaced PNG written with filter type 0 rows."""
    with open(path, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        position += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:].reshape(height, width, 3)


def test_write_png_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    demo.write_png(str(tmp_path / "x.png"), image)
    np.testing.assert_array_equal(read_png(str(tmp_path / "x.png")), image)


def test_demo_smoke(tmp_path, capsys):
    # One thread: tiny tensors gain nothing from more, and it keeps the test
    # fast when other programs keep the cores busy.
    out = tmp_path / "run"
    result = demo.main(["--steps", "4", "--image-size", "64", "--batch-size", "2", "--eval-images", "3",
                        "--out", str(out), "--device", "cpu", "--log-every", "0", "--threads", "1"])
    printed = capsys.readouterr().out
    assert "step     4/4" in printed and "mean SBD" in printed
    assert result["steps"] == 4
    assert 0.0 <= result["sbd"] <= 1.0 and result["abs_dic"] >= 0.0
    assert f"mean SBD {result['sbd']:.3f}" in printed

    panel = read_png(result["panel"])
    # 3 rows and 4 columns of 64 px images enlarged to 256 px tiles, 4 px apart.
    assert panel.shape == (3 * 256 + 2 * 4, 4 * 256 + 3 * 4, 3)

    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    model = demo.StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        logits, embeddings = model(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 64, 64) and embeddings.shape == (1, 8, 64, 64)
    assert torch.isfinite(embeddings).all()


def test_predictions_take_the_colour_of_their_best_match():
    truth = np.array([[0, 1, 1, 2, 2, 2]])
    predicted = np.array([[0, 2, 2, 1, 1, 3]])  # 2 is truth 1, 1 is truth 2, 3 is extra
    np.testing.assert_array_equal(demo._match_to_truth(predicted, truth), [[0, 1, 1, 2, 2, 3]])
    one_stick = np.array([[0, 2, 2, 2, 2, 2]])
    clash = np.array([[0, 1, 1, 1, 2, 2]])  # both overlap truth 2; the larger overlap gets its colour
    np.testing.assert_array_equal(demo._match_to_truth(clash, one_stick), [[0, 2, 2, 2, 3, 3]])


def test_time_limit_stops_training(tmp_path, capsys):
    result = demo.main(["--steps", "1000", "--time-limit", "0.5", "--image-size", "32", "--batch-size", "1",
                        "--eval-images", "1", "--out", str(tmp_path), "--device", "cpu", "--threads", "1"])
    assert 1 <= result["steps"] < 1000
    assert "time limit of 0.5 s reached" in capsys.readouterr().out


def test_thread_chooser_keeps_the_faster_thread_count():
    original = torch.get_num_threads()
    lines = []
    chooser = demo.ThreadChooser([2, 1], recheck_seconds=1e9, probe_steps=2, log=lines.append)
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
    assert demo._learning_rate(0.0, peak, warmup=0.1) < 0.1
    assert demo._learning_rate(0.1, peak, warmup=0.1) == pytest.approx(peak)
    assert demo._learning_rate(1.0, peak, warmup=0.1) == pytest.approx(0.01 * peak)


@pytest.mark.parametrize("option, value", [("--steps", "0"), ("--image-size", "30"), ("--time-limit", "-1")])
def test_invalid_options_name_the_option(option, value, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args([option, value])
    assert option in capsys.readouterr().err

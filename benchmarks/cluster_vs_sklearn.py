"""cluster_embeddings against scikit-learn's MeanShift: time and SBD.

    python benchmarks/cluster_vs_sklearn.py                       # synthetic embeddings
    python benchmarks/cluster_vs_sklearn.py --checkpoint runs/demo/checkpoint.pt   # the demo's network

Both cluster the same embeddings of the same foreground pixels (the ground
truth foreground, so that only the clustering differs) with the same
bandwidth, 2 * delta_v, on one CPU thread by default; the resulting instances are scored with SBD and |DiC|
against the ground truth of ScatteredSticks images. scikit-learn runs one
image at a time with bin seeding (its fast mode); cluster_embeddings runs
image by image and on the whole batch. Times are medians over repeats after
a warm-up, with device synchronisation. Prints a table and writes it to
benchmarks/results/<cpu|cuda>/cluster_vs_sklearn.md (cluster_vs_sklearn_network.md
with --checkpoint).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from discloss import metrics
from discloss.cluster import cluster_embeddings
from discloss.data import ScatteredSticks

HELD_OUT_SEED = 1_000_003  # the demo's held-out images


def synthetic_embeddings(labels: torch.Tensor, dim: int, delta_v: float, delta_d: float, seed: int) -> torch.Tensor:
    """Embeddings like those of a network trained with discloss, not to zero loss.

    Instance means are drawn at random, at least 2 * delta_d apart; most
    pixels lie within about delta_v of their mean, 10% (the ones a network
    gets wrong) up to 2.5 * delta_v away, partly towards another instance.
    """
    generator = torch.Generator().manual_seed(seed)
    batch, num_labels = labels.shape[0], int(labels.max()) + 1
    centres = torch.zeros(batch, num_labels, dim)
    for b in range(batch):
        found = []
        while len(found) < num_labels:
            candidate = torch.randn(dim, generator=generator) * 2.5 * delta_d
            if all(float((candidate - other).norm()) >= 2 * delta_d for other in found):
                found.append(candidate)
        centres[b] = torch.stack(found)
    image_ids = torch.arange(batch).reshape(batch, 1, 1)
    means = centres[image_ids, labels]  # (B, H, W, E)
    direction = torch.randn(means.shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    radius = torch.rand(labels.shape + (1,), generator=generator) * 1.2 * delta_v
    stray = torch.rand(labels.shape + (1,), generator=generator) < 0.1
    radius = torch.where(stray, torch.rand(labels.shape + (1,), generator=generator) * 2.5 * delta_v, radius)
    # Strays lean towards a random other instance of the image.
    other = centres[image_ids, torch.randint(1, num_labels, labels.shape, generator=generator)]
    towards = other - means
    towards = towards / towards.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    direction = torch.where(stray, (direction + towards) / (direction + towards).norm(dim=-1, keepdim=True), direction)
    return (means + radius * direction).permute(0, 3, 1, 2).contiguous()


def network_embeddings(checkpoint_path: str, images: torch.Tensor) -> torch.Tensor:
    from discloss.demo import StickNet

    checkpoint = torch.load(checkpoint_path, weights_only=True, map_location="cpu")
    model = StickNet(embedding_dim=checkpoint["embedding_dim"], widths=checkpoint["widths"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    with torch.no_grad():
        return model(images)[1]


def median_seconds(function, repeats: int, synchronize) -> float:
    function()  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        # Other programs on the machine skew the timings: say how busy it was.
        load = f", load average {os.getloadavg()[0]:.1f}"
    except OSError:
        load = ""
    return f"{model}, {os.cpu_count()} cores visible{load}, torch using {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="held-out images (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=128, help="(default: %(default)s, as the demo)")
    parser.add_argument("--embedding-dim", type=int, default=8, help="for synthetic embeddings (default: %(default)s)")
    parser.add_argument("--checkpoint", default=None, help="a demo checkpoint: cluster its network's embeddings")
    parser.add_argument("--delta-v", type=float, default=0.5)
    parser.add_argument("--delta-d", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of ours (default: %(default)s)")
    parser.add_argument("--sklearn-repeats", type=int, default=3, help="timed repeats of MeanShift (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="device for cluster_embeddings (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; sklearn's MeanShift (n_jobs=None) uses one, so one is the like "
                             "for like comparison (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="results file (default: benchmarks/results/<cpu|cuda>/cluster_vs_sklearn.md)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images: expected >= 1, got {args.images}")
    try:
        from sklearn import __version__ as sklearn_version
        from sklearn.cluster import MeanShift
    except ImportError:
        print("this benchmark needs scikit-learn: pip install scikit-learn", file=sys.stderr)
        return 2
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    data = ScatteredSticks(length=args.images, image_size=args.image_size, seed=HELD_OUT_SEED)
    batch = data.batch(range(args.images))
    if args.checkpoint:
        embeddings = network_embeddings(args.checkpoint, batch.image)
        source = f"the demo network's embeddings ({args.checkpoint})"
    else:
        embeddings = synthetic_embeddings(batch.labels, args.embedding_dim, args.delta_v, args.delta_d, seed=0)
        source = "synthetic embeddings (instance means >= 2*delta_d apart, 10% stray pixels up to 2.5*delta_v out)"
    foreground = batch.foreground
    bandwidth = 2 * args.delta_v
    options = dict(delta_v=args.delta_v, delta_d=args.delta_d)
    embeddings_device, foreground_device = embeddings.to(device), foreground.to(device)

    def ours_batched():
        return cluster_embeddings(embeddings_device, foreground_device, **options)[0]

    def ours_per_image():
        return [cluster_embeddings(embeddings_device[b:b + 1], foreground_device[b:b + 1], **options)[0]
                for b in range(args.images)]

    points = [embeddings[b][:, foreground[b]].T.double().numpy() for b in range(args.images)]

    def sklearn_per_image():
        labels = torch.zeros_like(batch.labels)
        for b in range(args.images):
            found = MeanShift(bandwidth=bandwidth, bin_seeding=True).fit_predict(points[b])
            labels[b][foreground[b]] = torch.from_numpy(found).long() + 1
        return labels

    print(f"clustering {args.images} images of {args.image_size}x{args.image_size} px: {source}")
    print(f"{int(foreground.sum()) / args.images:.0f} foreground pixels per image on average; "
          f"bandwidth {bandwidth:g}; device {device}: {machine_description(device)}", flush=True)
    results = []
    for name, function, repeats, convert in [
        ("discloss.cluster_embeddings, whole batch", ours_batched, args.repeats, lambda out: out.cpu()),
        ("discloss.cluster_embeddings, image by image", ours_per_image, args.repeats,
         lambda out: torch.cat(out).cpu()),
        ("sklearn MeanShift(bin_seeding=True), image by image", sklearn_per_image, args.sklearn_repeats,
         lambda out: out),
    ]:
        seconds = median_seconds(function, repeats, synchronize)
        labels = convert(function())
        sbd = metrics.symmetric_best_dice(labels, batch.labels).mean().item()
        abs_dic = metrics.absolute_difference_in_count(labels, batch.labels).float().mean().item()
        results.append((name, seconds / args.images * 1e3, sbd, abs_dic))
        print(f"  {name}: {seconds / args.images * 1e3:.2f} ms/image, SBD {sbd:.4f}, |DiC| {abs_dic:.2f}", flush=True)

    reference_ms, reference_sbd = results[-1][1], results[-1][2]
    header = "| method | ms / image (median) | speed-up vs sklearn | mean SBD | mean abs DiC |"
    lines = [header, "|---|---:|---:|---:|---:|"]
    for name, ms, sbd, abs_dic in results:
        lines.append(f"| {name} | {ms:.2f} | {reference_ms / ms:.1f}x | {sbd:.4f} | {abs_dic:.2f} |")
    best_speedup = min(reference_ms / results[0][1], reference_ms / results[1][1])
    passed = best_speedup >= 10 and min(results[0][2], results[1][2]) >= reference_sbd - 1e-9
    verdict = (f"{'PASS' if passed else 'FAIL'}: cluster_embeddings is {best_speedup:.1f}x faster than sklearn "
               f"(the slower of its two rows; target >= 10x) at SBD {min(results[0][2], results[1][2]):.4f} "
               f"vs {reference_sbd:.4f} (target: equal or better)")
    table = "\n".join(lines)
    print()
    print(table)
    print(verdict)

    name = "cluster_vs_sklearn_network.md" if args.checkpoint else "cluster_vs_sklearn.md"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "cuda" if device.type == "cuda" else "cpu", name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        handle.write("# cluster_embeddings vs scikit-learn MeanShift\n\n")
        handle.write(f"- data: {args.images} held-out ScatteredSticks images, {args.image_size}x{args.image_size} px, "
                     f"{int(foreground.sum()) / args.images:.0f} foreground pixels per image (ground-truth mask)\n")
        handle.write(f"- embeddings: {source}, dimension {embeddings.shape[1]}\n")
        handle.write(f"- both: bandwidth 2*delta_v = {bandwidth:g}, delta_d = {args.delta_d:g}; "
                     "cluster_embeddings defaults otherwise\n")
        handle.write(f"- machine: {machine_description(device)}; torch {torch.__version__}, "
                     f"scikit-learn {sklearn_version}, Python {platform.python_version()}\n")
        handle.write(f"- times: median of {args.repeats} (ours) / {args.sklearn_repeats} (sklearn) runs after a "
                     "warm-up, divided by the number of images\n")
        handle.write(f"- command: `python benchmarks/cluster_vs_sklearn.py {' '.join(argv or sys.argv[1:])}`\n\n")
        handle.write(table + "\n\n" + verdict + "\n")
    print(f"wrote {out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmark runs: configurations, synthetic inputs, implementations.

Label maps look like instance segmentation: each image is a jittered-grid
Voronoi tessellation whose cells are either one of K instances (ids 1..K, in
random order) or background (0), so labels are spatially coherent blobs, the
case the fused kernels are designed for. Everything is seeded from the
configuration name, so every run and every implementation sees the same data.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Dict, List, Sequence, Tuple

import torch

# --------------------------------------------------------------------------
# configurations


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark case. K is the number of instances per image; labels are
    0 (background, ignored) and 1..K, so the ops get max_instances = K + 1."""

    name: str
    batch: int
    embed_dim: int
    spatial: Tuple[int, ...]
    instances: int
    note: str = ""

    @property
    def max_instances(self) -> int:
        return self.instances + 1

    @property
    def pixels(self) -> int:  # per image
        return math.prod(self.spatial)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.spatial)

    def embedding_bytes(self, dtype: torch.dtype) -> int:
        return self.batch * self.embed_dim * self.pixels * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# The configurations of issue 4. Order: cheapest family first.
CONFIGS: List[Config] = [
    Config("2d_k2", 8, 16, (512, 512), 2, "2D, few instances"),
    Config("2d_k8", 8, 16, (512, 512), 8, "2D"),
    Config("2d_k64", 8, 16, (512, 512), 64, "2D, the headline case"),
    Config("2d_k512", 8, 16, (512, 512), 512, "2D, many instances"),
    Config("lane", 32, 4, (256, 512), 5, "lane detection (LaneNet-like)"),
    Config("cells", 8, 16, (256, 256), 400, "dense cells"),
    Config("3d_64", 2, 16, (64, 64, 64), 200, "3D EM-like"),
    Config("3d_128", 2, 16, (128, 128, 128), 200, "3D EM-like, large"),
]
CONFIGS_BY_NAME: Dict[str, Config] = {c.name: c for c in CONFIGS}
QUICK_CONFIGS = ["2d_k64"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
LABEL_DTYPES = {"int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "uint8": torch.uint8}

PASSES = ("fwd", "fwdbwd")
IMPLS = ("discloss", "ref_eager", "ref_compiled", "loop")
BASELINES = ("ref_eager", "ref_compiled", "loop")
IMPL_TITLES = {
    "discloss": "discloss (fused op)",
    "ref_eager": "reference, eager",
    "ref_compiled": "reference, torch.compile",
    "loop": "per-instance loop",
}

# Scaling sweeps: one image, E=16, float32, forward+backward.
PIXEL_SWEEP_FULL = [10_000, 30_000, 100_000, 300_000, 1_000_000, 3_000_000, 10_000_000]
PIXEL_SWEEP_QUICK = [10_000, 100_000, 1_000_000]
PIXEL_SWEEP_K = 64
K_SWEEP_FULL = [1, 4, 16, 64, 256, 1024, 4096]
K_SWEEP_QUICK = [1, 16, 256]
K_SWEEP_SPATIAL = (512, 512)
SWEEP_EMBED_DIM = 16


def pixel_sweep_config(pixels: int) -> Config:
    side = int(round(math.sqrt(pixels)))
    return Config(f"px{pixels}", 1, SWEEP_EMBED_DIM, (side, side), PIXEL_SWEEP_K)


def k_sweep_config(k: int) -> Config:
    return Config(f"k{k}", 1, SWEEP_EMBED_DIM, K_SWEEP_SPATIAL, k)


# --------------------------------------------------------------------------
# bytes floor


def floor_bytes(cfg: Config, dtype: torch.dtype, label_dtype: torch.dtype, pass_: str) -> int:
    """The fewest bytes any implementation must move (DESIGN §3).

    forward:          2 reads of the embeddings + 1 read of the labels
                      (pass 1 needs all of a cluster before pass 2 can use mu).
    forward+backward: 3 reads + 1 write of the embeddings (the gradient has
                      their size) + 3 reads of the labels.
    """
    emb = cfg.embedding_bytes(dtype)
    lab = cfg.batch * cfg.pixels * _itemsize(label_dtype)
    if pass_ == "fwd":
        return 2 * emb + lab
    return 4 * emb + 3 * lab


# --------------------------------------------------------------------------
# inputs


def _seed(name: str, extra: int = 0) -> int:
    return (zlib.crc32(name.encode()) + 7919 * extra) % (2**31)


def voronoi_labels(spatial: Sequence[int], instances: int, generator: torch.Generator,
                   background_fraction: float = 0.25, chunk: int = 1 << 20) -> torch.Tensor:
    """One label map: a jittered-grid Voronoi tessellation of the image.

    The grid has g**d cells with g**d >= instances / (1 - background_fraction);
    K cells, picked at random, become instances 1..K, the others background 0.
    Each pixel takes the label of the nearest seed among its cell's 3**d
    neighbours (exact enough for a benchmark: regions stay convex blobs).
    """
    d = len(spatial)
    cells_wanted = max(instances / (1.0 - background_fraction), instances + 1)
    g = max(2, math.ceil(cells_wanted ** (1.0 / d)))
    num_cells = g**d
    jitter = 0.15 + 0.7 * torch.rand((num_cells, d), generator=generator, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(*[torch.arange(g)] * d, indexing="ij"), -1).reshape(-1, d)
    sizes = torch.tensor(spatial, dtype=torch.float64)
    seeds = ((grid + jitter) * sizes / g).float()  # (num_cells, d), pixel units
    cell_label = torch.zeros(num_cells, dtype=torch.int64)
    order = torch.randperm(num_cells, generator=generator)
    cell_label[order[:instances]] = torch.randperm(instances, generator=generator) + 1

    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * d, indexing="ij"), -1).reshape(-1, d)
    strides = torch.tensor([g ** (d - 1 - i) for i in range(d)])
    n = math.prod(spatial)
    out = torch.empty(n, dtype=torch.int64)
    pix_strides = torch.tensor([math.prod(spatial[i + 1:]) for i in range(d)])
    for start in range(0, n, chunk):
        flat = torch.arange(start, min(start + chunk, n))
        coord = (flat[:, None] // pix_strides) % torch.tensor(spatial)  # (m, d)
        pos = coord.float() + 0.5
        cell = (pos.double() * g / sizes).long().clamp_(0, g - 1)  # (m, d)
        cand = (cell[:, None, :] + offsets[None]).clamp_(0, g - 1)  # (m, 3^d, d)
        cand_id = (cand * strides).sum(-1)  # (m, 3^d)
        dist = ((seeds[cand_id] - pos[:, None, :]) ** 2).sum(-1)
        nearest = cand_id.gather(1, dist.argmin(1, keepdim=True)).squeeze(1)
        out[start:start + flat.numel()] = cell_label[nearest]
    return out.view(*spatial)


def make_labels(cfg: Config) -> torch.Tensor:
    """Labels (B, *spatial), int64, the same for every dtype and implementation."""
    gen = torch.Generator().manual_seed(_seed(cfg.name))
    return torch.stack([voronoi_labels(cfg.spatial, cfg.instances, gen) for _ in range(cfg.batch)])


def make_embeddings(cfg: Config, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Embeddings (B, E, *spatial) ~ N(0, 1), drawn in float32, then cast."""
    gen = torch.Generator().manual_seed(_seed(cfg.name, 1))
    emb = torch.randn((cfg.batch, cfg.embed_dim) + tuple(cfg.spatial), generator=gen)
    return emb.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------
# implementations


def make_loss_fn(impl: str, cfg: Config, device: str) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """A callable (embeddings, labels) -> (var, dist, reg), paper defaults."""
    import discloss
    from discloss.reference import discriminative_loss_loop, discriminative_loss_reference

    K = cfg.max_instances
    if impl == "discloss":
        # validate=False: time the op itself; the optional eager label check of
        # CUDA inputs is one extra pass over the labels plus a host sync (the
        # CPU kernel always checks labels as it reads them).
        def fn(x, lab):
            return discloss.discriminative_loss(x, lab, max_instances=K, validate=False)
        return fn
    if impl == "ref_eager":
        def fn(x, lab):
            return discriminative_loss_reference(x, lab, max_instances=K)
        return fn
    if impl == "ref_compiled":
        def ref(x, lab):
            return discriminative_loss_reference(x, lab, max_instances=K)
        return torch.compile(ref, fullgraph=True, dynamic=False)
    if impl == "loop":
        def fn(x, lab):
            return discriminative_loss_loop(x, lab)
        return fn
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


# --------------------------------------------------------------------------
# budgets: predicted cost, so that hopeless runs are skipped before they start


def predicted_loop_seconds(cfg: Config, pass_: str, device: str) -> float:
    """Rough time of the per-instance loop: it launches ~6 small ops per
    ordered pair of instances and ~10 per instance, per image; backward
    makes it ~4x. Calibrated loosely on an idle 2-core CPU (~4 us per op);
    it only decides what not to start, the wall-clock budget does the rest."""
    per_op = 4e-6 if device == "cpu" else 10e-6
    ops = cfg.batch * (6 * cfg.instances * (cfg.instances - 1) + 10 * cfg.instances)
    seconds = ops * per_op
    return seconds * (4.0 if pass_ == "fwdbwd" else 1.0)


def predicted_peak_bytes(impl: str, cfg: Config, dtype: torch.dtype, pass_: str) -> int:
    """Rough extra memory an implementation needs above its inputs."""
    elem = _itemsize(dtype)
    emb = cfg.embedding_bytes(dtype)
    n = cfg.batch * cfg.pixels
    k = cfg.max_instances
    pairs = cfg.batch * k * k * cfg.embed_dim * elem
    if impl == "discloss":
        return emb if pass_ == "fwdbwd" else 0
    if impl in ("ref_eager", "ref_compiled"):
        # transposed copy, masked copy, gathered means, differences, int64
        # index tensors, and the (B, K, K, E) pairwise differences.
        per_pass = 5 * emb + 4 * n * 8 + 3 * pairs
        return per_pass * (2 if pass_ == "fwdbwd" else 1)
    if impl == "loop":
        return 3 * emb * (2 if pass_ == "fwdbwd" else 1)
    raise ValueError(impl)

"""End-to-end demo: train a small U-Net on scattered sticks with discloss.

    python -m discloss.demo            # the defaults: at most about 8 minutes on 2 CPU cores
    python -m discloss.demo --help

The network has three heads on a shared U-Net: a foreground logit (trained
with binary cross-entropy + Dice), a per-pixel embedding (trained with the
discriminative loss) and a seediness logit (Fathi et al. 2017, "Semantic
instance segmentation via deep metric learning": how good a seed for the
clustering each pixel is; see ``seediness_loss``). At test time the
foreground mask selects the pixels that ``cluster_embeddings`` groups into
instances, and the result is scored with Symmetric Best Dice (SBD) and
|DiC| on 50 held-out images, once per seed mode: hashed (the clustering's
own pixel order), seediness-order (seeds in descending seediness),
seediness (the same, among pixels of seediness >= ``--min-seed-score``
only) and robust (``evaluation.ROBUST_OPTIONS``: the clustering made for
touching instances, which needs no seediness).

To fit the CPU budget the defaults train and evaluate at 128 x 128 pixels:
``ScatteredSticks(image_size=128)``, the 256 x 256 sticks geometry scaled by
1/2 (sticks 7.5 px wide, 40-50 px long). Pass ``--image-size 256`` for the
full size (on a GPU), ``--sticks 16-24`` for the hard set. Training runs 600
steps of 8 images, or stops after ``--time-limit`` (420 s) with the learning
rate annealed on the clock, so a slow or busy machine still finishes in
time. Measured with the defaults in three runs (network seeds 0, 1, 2) on 2
AMD EPYC cores shared with other work (load average 2-6): 371-544 steps in
the 420 s, about 7.5 minutes in all; mean SBD over the 50 held-out images
0.926 / 0.922 / 0.938 with hashed seeds and 0.930 / 0.918 / 0.941 with
seediness (mean 0.929 and 0.930), |DiC| 0.49 and 0.48 on average: on this
easy set seediness changes little, because seeds are not what limits it
(clustering these networks' embeddings of the ground-truth foreground,
learned seediness gains 0.004 SBD and seeds chosen from the ground truth
only 0.016; benchmarks/results/cpu/cluster_demo_set.md).

Outputs go to ``--out`` (default runs/demo): checkpoint.pt and panel.png,
drawn with matplotlib: per row, the image, the ground truth, the instances
found with hashed and with seediness seeds (coloured after the ground-truth
instance they overlap most, with the image's SBD and DiC), the seediness
map, and the embeddings projected to 2D by PCA, coloured by ground truth,
with a circle of radius delta_v around each instance's mean.

The package, one idea per file (each imports only those above it):

    model.py        StickNet, the U-Net with its three heads
    losses.py       the foreground and seediness losses beside discloss's
    _threads.py     the CPU thread-count chooser (private; see its measurement)
    training.py     the training loop, its clock and learning-rate schedule
    evaluation.py   prediction per seed mode, SBD and |DiC| on held-out images
    panel.py        the matplotlib picture
    cli.py          the options and the run that ties them together (torchrun too)
    __main__.py     ``python -m discloss.demo``
"""

from .cli import HELD_OUT_SEED, TRAIN_SEED, main, make_dataset, parse_args
from .evaluation import SEED_MODES, Prediction, evaluate, predict
from .losses import foreground_loss, seediness_loss, seediness_target
from .model import StickNet
from .panel import save_panel
from .training import train

__all__ = ["StickNet", "Prediction", "SEED_MODES", "TRAIN_SEED", "HELD_OUT_SEED", "evaluate", "foreground_loss",
           "main", "make_dataset", "parse_args", "predict", "save_panel", "seediness_loss", "seediness_target",
           "train"]

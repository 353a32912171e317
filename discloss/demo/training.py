"""Training the demo's network: the loop, its clock and its learning-rate schedule."""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

from .. import distributed
from ..data import ScatteredSticks
from ..loss import discriminative_loss
from .losses import foreground_loss, seediness_loss
from .model import StickNet
from ._threads import ThreadChooser

__all__ = ["train"]


def _learning_rate(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to 1% of the peak."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.02)
    progress = min((progress - warmup) / (1.0 - warmup), 1.0)
    return peak * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: StickNet, dataset: ScatteredSticks, args, device: torch.device, log=print,
          thread_chooser: Optional[ThreadChooser] = None, context: Optional[distributed.Context] = None) -> int:
    """Train for ``args.steps`` steps or ``args.time_limit`` seconds, whichever ends first.

    The learning rate schedule follows whichever of the two is further
    along, so that training stopped by the clock still ends annealed (on a
    slow or busy machine). Returns the number of steps done. Under torchrun
    (``context``), the ranks take the stop decision together.
    """
    try:
        return _train_steps(model, dataset, args, device, log, thread_chooser, context or distributed.Context())
    finally:
        if thread_chooser is not None:
            thread_chooser.settle()


def _train_steps(model, dataset, args, device, log, thread_chooser, context) -> int:
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    start = time.perf_counter()
    last_report = start
    totals = np.zeros(5)
    reported_steps = 0
    time_limit = args.time_limit if args.time_limit > 0 else math.inf
    for step in range(args.steps):
        step_start = time.perf_counter()
        progress = max(step / args.steps, (step_start - start) / time_limit)
        progress = distributed.agree_max(progress, context)  # every rank stops at the same step
        if progress >= 1.0:
            log(f"time limit of {args.time_limit:g} s reached after {step} of {args.steps} steps")
            return step
        if thread_chooser is not None:
            thread_chooser.before_step()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(progress, args.lr, warmup=0.04)
        first = step * args.batch_size
        batch = dataset.batch(range(first, first + args.batch_size))
        images = batch.image.to(device)
        foreground = batch.foreground.to(device)
        labels = batch.labels.to(device)
        logits, embeddings, seediness_logits = model(images)
        mask_loss = foreground_loss(logits, foreground)
        var, dist, reg = discriminative_loss(
            embeddings, labels, args.delta_v, args.delta_d, max_instances=dataset.max_sticks + 1
        )
        seed_loss = seediness_loss(seediness_logits, embeddings, labels, args.delta_v)
        loss = mask_loss + var + dist + reg + seed_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        totals += [mask_loss.item(), var.item(), dist.item(), reg.item(), seed_loss.item()]
        reported_steps += 1
        now = time.perf_counter()
        if thread_chooser is not None:
            thread_chooser.after_step(now - step_start)
        if step + 1 == args.steps or now - last_report >= args.log_every:
            elapsed = now - start
            eta = min(elapsed / (step + 1) * (args.steps - step - 1), max(time_limit - elapsed, 0.0))
            mean = totals / reported_steps
            log(f"step {step + 1:5d}/{args.steps}  foreground {mean[0]:.3f}  var {mean[1]:.3f}  "
                f"dist {mean[2]:.3f}  reg {mean[3]:.3f}  seediness {mean[4]:.3f}  [{elapsed:5.0f} s elapsed, ~{eta:.0f} s left]")
            totals[:] = 0
            reported_steps = 0
            last_report = now
    return args.steps

"""The README's python code blocks run as written, so that its examples cannot rot.

Each block runs in a namespace of its own. The names a block takes from the
reader's own code (their network, its outputs, a ground truth) are supplied
here, small and consistent with one another; a block that uses any other
name it does not define fails. Every tensor a block leaves behind must be
finite: an example that computed NaN would be a broken example.
"""

import os
import re

import pytest
import torch

import discloss

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 2
        blocks.append(pytest.param(match.group(1), id=f"README.md:{line}"))
    return blocks


class _TwoHeads(torch.nn.Module):
    """A reader's network: (logits, embeddings) from images."""

    def __init__(self, embedding_dim=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1 + embedding_dim, 3, padding=1)

    def forward(self, images):
        out = self.conv(images)
        return out[:, 0], out[:, 1:]


def reader_names():
    generator = torch.Generator().manual_seed(0)
    batch, height, width = 2, 16, 16
    gt = torch.randint(0, 4, (batch, height, width), generator=generator)
    return {
        "torch": torch,
        "discloss": discloss,
        # the autocast example: a network, its input, the labels, a gradient scaler
        "model": _TwoHeads(),
        "images": torch.rand(batch, 3, height, width, generator=generator),
        "labels": gt,
        "scaler": torch.amp.GradScaler("cuda", enabled=torch.cuda.is_available()),
        # the clustering example: a network's outputs and the ground truth
        "embeddings": torch.randn(batch, 4, height, width, generator=generator),
        "foreground": gt > 0,
        "seediness": torch.rand(batch, height, width, generator=generator),
        "gt": gt,
    }


def test_the_readme_has_its_examples():
    # A renamed fence would otherwise leave nothing to run.
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("code", python_blocks())
def test_readme_block_runs(code, recwarn):
    # recwarn: torch.autocast("cuda") warns and stands aside on a machine without CUDA.
    supplied = reader_names()
    namespace = dict(supplied)
    exec(compile(code, README, "exec"), namespace)  # noqa: S102  (the README's own examples)
    left = {name: value for name, value in namespace.items()
            if isinstance(value, torch.Tensor) and value is not supplied.get(name)}
    assert left, "the block computed no tensor"
    for name, value in left.items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{name} is not finite"

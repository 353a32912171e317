"""Smoke test of an installed discloss, run from outside the source tree.

    python scripts/smoke_test.py [--installed]

Checks, in float64 on CPU: DESIGN's check values (paper L1 and L2, the
Chainer normalisation), a backward pass against central finite differences
of the loss (torch.autograd.gradcheck) and against the pure-PyTorch
reference, and the float32 path. With --installed, it also checks that
discloss was imported from the running environment's own site-packages (an
installed copy, not a source tree or another environment). Prints one line
per check; exits non-zero on the first failure.
"""

import argparse
import math
import os
import sys
import sysconfig

import torch


def check(name, condition, detail=""):
    if not condition:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name} {detail}", flush=True)


def close(actual, expected, rel=1e-12):
    return all(math.isclose(float(a), e, rel_tol=rel, abs_tol=1e-15) for a, e in zip(actual, expected))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--installed", action="store_true",
                        help="fail unless discloss comes from this environment's site-packages")
    args = parser.parse_args()

    import discloss
    from discloss.chainer import discriminative_margin_based_clustering_loss as chainer_loss
    from discloss.reference import discriminative_loss_reference

    location = os.path.dirname(os.path.realpath(discloss.__file__))
    check("import", True, f"discloss {discloss.__version__} from {location}, torch {torch.__version__}")
    if args.installed:
        site = os.path.realpath(sysconfig.get_paths()["platlib"])
        check("installed copy", os.path.commonpath([location, site]) == site, f"(in {site})")

    # DESIGN §1 check values: pixels (0,0), (2,0), (1,1) with labels 1, 1, 2.
    x = torch.tensor([[[0.0, 2.0, 1.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, 1, 2]])
    l1 = discloss.discriminative_loss(x, labels, norm=1, gamma=1.0)
    check("paper L1 check values", close(l1, (0.125, 4.0, 1.5)), str([float(t) for t in l1]))
    l2 = discloss.discriminative_loss(x, labels, norm=2, gamma=1.0)
    check("paper L2 check values", close(l2, (0.125, 4.0, (1 + math.sqrt(2)) / 2)), str([float(t) for t in l2]))
    chainer = chainer_loss(x, labels, 0.5, 1.5, 2, gamma=1.0)
    check("chainer L1 check values", close(chainer, (0.125, 4.0, 1.5)), str([float(t) for t in chainer]))

    # Backward: random embeddings, a few clusters and background, every term active.
    generator = torch.Generator().manual_seed(0)
    embeddings = (2.0 * torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64)).requires_grad_(True)
    blobs = torch.randint(0, 4, (2, 5, 6), generator=generator)

    with torch.no_grad():
        terms = discloss.discriminative_loss(embeddings, blobs, gamma=0.1, max_instances=4)
    check("every term active", all(float(t) > 0 for t in terms), str([round(float(t), 4) for t in terms]))

    def total(e):
        return sum(discloss.discriminative_loss(e, blobs, gamma=0.1, max_instances=4))

    check("backward = finite differences (gradcheck)",
          torch.autograd.gradcheck(total, (embeddings,), eps=1e-6, atol=1e-7, rtol=1e-5))
    (grad,) = torch.autograd.grad(total(embeddings), embeddings)
    reference = embeddings.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(sum(discriminative_loss_reference(reference, blobs, gamma=0.1)), reference)
    error = float((grad - expected).abs().max())
    check("backward = float64 reference", error <= 1e-11, f"(max abs difference {error:.1e})")

    single = embeddings.detach().float().requires_grad_(True)
    (grad32,) = torch.autograd.grad(sum(discloss.discriminative_loss(single, blobs, gamma=0.1)), single)
    error32 = float((grad32.double() - expected).abs().max() / expected.abs().max())
    check("float32 backward", grad32.dtype == torch.float32 and error32 < 2e-4,
          f"(max difference {error32:.1e} of the largest entry)")
    print("smoke test passed", flush=True)


if __name__ == "__main__":
    main()

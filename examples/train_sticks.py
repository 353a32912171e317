"""Train a U-Net with the discriminative loss on synthetic scattered sticks.

The same as ``python -m discloss.demo``; see ``--help`` for the options.

    python examples/train_sticks.py --steps 1200 --out runs/demo
    python examples/train_sticks.py --image-size 256 --sticks 16-24 --batch-size 4 --out runs/hard   # the hard set
"""

import sys

from discloss.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])

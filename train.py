"""The command line: ``python train.py --help``. Everything is in ``flax_resnet.cli``."""
import sys

from flax_resnet.cli import main

if __name__ == "__main__":
    sys.exit(main())

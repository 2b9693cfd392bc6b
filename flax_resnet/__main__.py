"""``python -m flax_resnet [COMMAND] [OPTIONS]``: the command line of ``flax_resnet.cli``."""

import sys

from flax_resnet.cli import main

if __name__ == "__main__":
    sys.exit(main())

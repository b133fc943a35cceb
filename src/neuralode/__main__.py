"""``python -m neuralode``: the command line, the same as the ``neuralode`` console script."""

import sys

from neuralode.cli.main import main

if __name__ == "__main__":
    sys.exit(main())

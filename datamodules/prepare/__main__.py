"""``python -m datamodules.prepare``: the data tool's command (``datamodules.prepare.cli``)."""

import sys

from datamodules.prepare.cli import main

if __name__ == "__main__":
    sys.exit(main())

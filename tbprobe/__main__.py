"""``python -m tbprobe``: the ``tbprobe`` command (:mod:`tbprobe.cli`)."""

import sys

from tbprobe.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench`` (from the repository root): see bench/run.py and docs/performance.md."""

import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())

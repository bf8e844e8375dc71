"""``python -m transferkit.experiments``: run the experiments and write the report."""

import sys

from transferkit.experiments.driver import main

if __name__ == "__main__":
    sys.exit(main())

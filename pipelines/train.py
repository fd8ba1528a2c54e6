"""Entry script for xsam.pipelines.train (the same as the console script; see its --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xsam before an installed one

from xsam.pipelines.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ACCEPT_CLUSTER_RESOURCE_LIMITS", "1")
sys.path.insert(0, str(Path(__file__).parent))


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_logging_and_env():
    """A test that runs an entry point's main() in this process (xsam.logs.setup: the `xsam` logger's
    handler and level, XSAM_* / quiet-library variables in os.environ) leaves no trace for the next test."""
    pkg = logging.getLogger("xsam")
    state = (list(pkg.handlers), pkg.level, pkg.propagate, list(logging.root.handlers), logging.root.level)
    env = dict(os.environ)
    yield
    pkg.handlers[:], pkg.level, pkg.propagate = state[0], state[1], state[2]
    logging.root.handlers[:], logging.root.level = state[3], state[4]
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)

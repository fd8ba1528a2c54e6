import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ACCEPT_CLUSTER_RESOURCE_LIMITS", "1")
sys.path.insert(0, str(Path(__file__).parent))


import logging

import pytest


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server on 127.0.0.1 for the whole session, started on first use (the
    evaluation tests, the secrets test of tests/train/test_train_e2e.py), stopped at the end."""
    import subprocess
    import time

    import requests
    from helpers import free_port

    tmp = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{tmp / 'mlflow.db'}", "--artifacts-destination", str(tmp / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{uri}/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("mlflow server did not come up")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)

"""Shared by the evaluation tests: one real MLflow tracking server on 127.0.0.1, started on first use, stopped at the end."""

import subprocess
import sys
import time

import pytest
import requests
from helpers import free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
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

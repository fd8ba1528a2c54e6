"""The workflow end to end at its smallest size: submitted with `ray job submit` to a real local
head, rerun (every step skipped), and a run killed during a step then rerun (same final result)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port  # tests/ is on sys.path (conftest)
from mlflow import MlflowClient

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")



def _args(work: Path) -> list[str]:
    # absolute locations: the job runs in a copy of the repo, the reruns in the checkout
    return ["pipelines/full_run.py", "--workdir", str(work), f"shards={work / 'shards'}", f"output={work / 'runs'}",
            f"mlflow_uri=sqlite:///{work / 'mlflow.db'}", f"weights={{tokenizer: {work / 'tokenizer'}}}"]


def _steps(work: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (work / "steps").glob("*.json")}


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """One full run submitted as a Ray job to a local head (started and stopped here)."""
    work = tmp_path_factory.mktemp("job")
    port, dash = free_port(), free_port()
    # a throwaway head on loopback: no token auth (Ray 2.60 would otherwise ask the job client for one)
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_AUTH_MODE": "disabled"}
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    str(dash), "--num-cpus", "2", "--include-dashboard", "true"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        proc = subprocess.run([RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                               str(ROOT), "--", sys.executable, *_args(work)],
                              capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    return work, proc


def test_ray_job_submit_runs_the_workflow_to_a_selected_model(submitted):
    work, proc = submitted
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout.lower() or "SUCCEEDED" in proc.stdout
    steps = _steps(work)
    assert f"xsam@champion = version {steps['evaluate']['outputs']['version']} (selected this run" in proc.stdout
    assert set(steps) == {"convert", "s1", "s2", "s3", "candidates", "evaluate"}
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("xsam", "champion")
    assert champion.version == steps["evaluate"]["outputs"]["version"]
    # the DAG scored candidates, not one export: the kept S3 checkpoints, each a version with its lineage,
    # and the alias went to the best of them by the selection rule
    found = steps["candidates"]["outputs"]["candidates"]
    assert len(found) >= 2 and found[-1]["checkpoint"] is None and found[0]["step"] < found[-1]["step"]
    versions = client.search_model_versions("name = 'xsam'")
    assert {v.tags["xsam.checkpoint"] for v in versions} == {c["export"] for c in found}
    assert {v.tags["xsam.candidate.step"] for v in versions} == {str(c["step"]) for c in found}
    from xsam.eval.selection import _primary_metrics, rank

    order, _ = rank({v.version: _primary_metrics(client, v.run_id) for v in versions})
    assert champion.version == order[0]
    exp = client.get_experiment_by_name("xsam-local")
    (wf,) = client.search_runs([exp.experiment_id], "tags.`xsam.kind` = 'workflow'")
    import mlflow.artifacts

    table = mlflow.artifacts.load_dict(f"{wf.info.artifact_uri}/comparison.json")
    assert len(table["rows"]) == len(found) and table["benchmarks"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{wf.info.run_id}'")
    assert {"convert", "s1", "s2", "s3", "candidates", "evaluate"} <= {c.data.tags.get("xsam.step") for c in children}
    assert {"s1", "s2", "s3"} <= {c.data.tags.get("xsam.stage") for c in children}  # the training runs nest too


def test_rerun_skips_every_step(submitted):
    work, _ = submitted
    before = _steps(work)
    proc = subprocess.run([sys.executable, *_args(work)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("convert", "s1", "s2", "s3", "candidates", "evaluate"):
        assert f"[full_run] {step}: skipped (up to date)" in proc.stdout
    assert _steps(work) == before
    # the champion is read back from the registry, not from the skipped step's record
    champion = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_model_version_by_alias("xsam", "champion")
    assert f"xsam@champion = version {champion.version} (" in proc.stdout


def test_killed_run_resumes_to_the_same_result(submitted, tmp_path):
    work, _ = submitted
    proc = subprocess.Popen([sys.executable, *_args(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (tmp_path / "steps" / "s1.json").exists():  # kill it inside S2
        assert proc.poll() is None and time.time() < deadline, "the run ended before S1 finished"
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
    assert not (tmp_path / "steps" / "evaluate.json").exists()
    again = subprocess.run([sys.executable, *_args(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[full_run] s1: skipped (up to date)" in again.stdout
    first, second = _steps(work)["evaluate"]["outputs"], _steps(tmp_path)["evaluate"]["outputs"]
    assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6)

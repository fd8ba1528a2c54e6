"""The workflow end to end at its smallest size: submitted with `ray job submit` to a real local
head, rerun (every step skipped), and a run killed during a step then rerun (same final result)."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import process_tree, ray_head, stop_processes  # tests/ is on sys.path (conftest)
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
    # a throwaway head on loopback: no token auth (Ray 2.60 would otherwise ask the job client for one)
    # planted credentials (issue 13): in the environment of the head and the job, never in a log or an output
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "RAY_AUTH_MODE": "disabled",
           "AWS_ACCESS_KEY_ID": "AKIAPLANTEDXSAMTEST1", "AWS_SECRET_ACCESS_KEY": SECRET}
    with ray_head(env) as head:  # stops this head's own processes only, never every Ray on the machine
        proc = subprocess.run([RAY, "job", "submit", "--address", head.dashboard, "--working-dir",
                               str(ROOT), "--", sys.executable, *_args(work)],
                              capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
        leaks = _files_holding(SECRET.encode(), Path(head.temp_dir), work)  # Ray's session logs, every output
    return work, proc, leaks


# made at run time (a literal would be found in the job's copy of this file)
SECRET = "planted/xsam+" + uuid.uuid4().hex


def _files_holding(needle: bytes, *roots: Path) -> list[str]:
    return [str(f) for root in roots for f in root.rglob("*")
            if f.is_file() and not f.is_symlink() and needle in f.read_bytes()]


def test_ray_job_submit_runs_the_workflow_to_a_selected_model(submitted):
    work, proc, leaks = submitted
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not leaks, f"the planted AWS secret is in {leaks}"  # session logs, MLflow store, exports, steps
    assert SECRET not in proc.stdout + proc.stderr
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
    children = client.search_runs([exp.experiment_id], f"tags.`xsam.parent_run` = '{wf.info.run_id}'")
    assert {"convert", "s1", "s2", "s3", "candidates", "evaluate"} <= {c.data.tags.get("xsam.step") for c in children}
    assert {"s1", "s2", "s3"} <= {c.data.tags.get("xsam.stage") for c in children}  # the training runs nest too


def test_rerun_skips_every_step(submitted):
    work, _, _ = submitted
    before = _steps(work)
    proc = subprocess.run([sys.executable, *_args(work)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in ("convert", "s1", "s2", "s3", "candidates", "evaluate"):
        assert f"[full_run] {step}: skipped (up to date)" in proc.stderr  # progress: logging (stderr)
    assert _steps(work) == before
    # the champion is read back from the registry, not from the skipped step's record
    champion = MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_model_version_by_alias("xsam", "champion")
    assert f"xsam@champion = version {champion.version} (" in proc.stdout


def test_readme_single_stage_example_trains_s3_from_the_workflows_exports(submitted):
    """README: after the workflow, `train.py --stage s3 --profile local zero_stage=3 lr=1e-4` trains S3 from
    the S1 and S2 exports the workflow recorded (the profile's init_from: [s1, s2], resolved in --workdir)."""
    work, _, _ = submitted
    steps = _steps(work)
    proc = subprocess.run([sys.executable, "pipelines/train.py", "--stage", "s3", "--profile", "local", "--workdir",
                           str(work), "zero_stage=3", "lr=1e-4", *_args(work)[3:], "max_steps=2", "run_name=readme-s3"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    export = work / "runs" / "readme-s3" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["train_config"]["init_from"] == [steps["s1"]["outputs"]["export"], steps["s2"]["outputs"]["export"]]
    assert {f"init:{steps[s]['outputs']['export']}" for s in ("s1", "s2")} <= set(manifest["init_reports"])
    assert manifest["train_config"]["zero_stage"] == 3 and manifest["train_config"]["lr"] == 1e-4


def test_killed_run_resumes_to_the_same_result(submitted, tmp_path):
    work, _, _ = submitted
    proc = subprocess.Popen([sys.executable, *_args(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (tmp_path / "steps" / "s1.json").exists():  # kill it inside S2
        assert proc.poll() is None and time.time() < deadline, "the run ended before S1 finished"
        time.sleep(0.5)
    time.sleep(3)
    local_ray = process_tree(proc.pid)  # the run's own local Ray: stopped below, no other Ray touched
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stop_processes(local_ray)
    assert not (tmp_path / "steps" / "evaluate.json").exists()
    again = subprocess.run([sys.executable, *_args(tmp_path)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[full_run] s1: skipped (up to date)" in again.stderr
    # output people can read (issue 12): at most 60 lines for S2 + S3 + evaluate, one progress line per
    # training stage, none of Ray Train's per-report dicts or the cleaner's warnings, the summary last
    lines = (again.stdout + again.stderr).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    assert not [ln for ln in lines if "Reporting training result" in ln or "PlacementGroupCleaner" in ln]
    assert any("[train s3] step" in ln and "samples/s" in ln for ln in lines)
    assert [ln for ln in again.stdout.splitlines() if ln.strip()][-1].lstrip().startswith(("model:", "open the UI"))
    first, second = _steps(work)["evaluate"]["outputs"], _steps(tmp_path)["evaluate"]["outputs"]
    assert second["metrics"] == pytest.approx(first["metrics"], abs=1e-6)

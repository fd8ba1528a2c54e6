"""A two-trial Ray Tune sweep on the tiny preset: each trial trains S3 and is scored; MLflow gets
one run per trial with its settings and score."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import convert_fixtures  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_two_trial_sweep(tmp_path):
    _, shards, _ = convert_fixtures(tmp_path, ["coco_panoptic", "llava", "refer"])
    from xsam.model.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp_path / "tok")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [sys.executable, "pipelines/tune.py", "--lr", "1e-4", "--balance-t", "0.05,0.5", "--benchmarks",
         "fixture_refcoco/val", "--max-steps", "2", "--tracking-uri", uri, "--storage", str(tmp_path / "tune"),
         f"shards={shards}", f"output={tmp_path / 'runs'}", f"weights={{tokenizer: {tmp_path / 'tok'}}}",
         "init_from=[]",
         "datasets=[fixture_refcoco/train,fixture_llava_mix665k/train,fixture_coco_panoptic/train]"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "[tune] 2 trials; best score" in proc.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("xsam-tune")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    assert {r.data.params["balance_t"] for r in runs} == {"0.05", "0.5"}
    for r in runs:
        assert "score" in r.data.metrics and "fixture_refcoco/val/ciou" in r.data.metrics
    # each trial's own training run went to the trials experiment
    trials = client.get_experiment_by_name("xsam-tune-trials")
    assert len(client.search_runs([trials.experiment_id])) == 2

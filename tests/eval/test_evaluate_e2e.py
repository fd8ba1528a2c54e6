"""pipelines/evaluate.py end to end: tiny checkpoints scored by Ray actors, logged to a real MLflow
tracking server on 127.0.0.1 (started here), registered, and the alias set on the best version."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from helpers import convert_fixtures
from model_fixtures import tiny_model, tiny_tokenizer

from xsam.model.checkpoint import save_stage_checkpoint
from xsam.model.stages import S3

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = "fixture_refcoco/val,fixture_coco_semantic/val,fixture_coco_interactive/val"



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    _, shards, _ = convert_fixtures(tmp, ["coco_panoptic", "refer", "psalm_interactive"])
    tok = tiny_tokenizer(tmp / "tok")
    checkpoints = []
    for seed in (0, 1):
        cfg, model = tiny_model(tok, "s3", seed=seed)
        folder = tmp / f"ckpt{seed}" / "export"
        save_stage_checkpoint(model, S3, cfg, folder, tokenizer=tok)  # the tokenizer files at the export root
        checkpoints.append(str(folder))
    return tmp, shards, checkpoints


def test_evaluate_logs_registers_and_selects(mlflow_server, setup):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    tmp, shards, checkpoints = setup
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "evaluate.py"), "--checkpoints",
                           ",".join(checkpoints), "--benchmarks", BENCHMARKS, "--shards", shards,
                           "--tracking-uri", mlflow_server, "--model-name", "xsam-test", "--max-samples", "2",
                           "--workers", "2", "--overlays", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("xsam-eval")
    parents = client.search_runs([exp.experiment_id], "tags.`xsam.kind` = 'evaluation'")
    assert len(parents) == 2
    by_ckpt = {r.data.tags["xsam.checkpoint"]: r for r in parents}
    assert set(by_ckpt) == set(checkpoints)
    names = BENCHMARKS.split(",")
    for run in parents:
        assert run.data.tags["xsam.primary.fixture_refcoco/val"] == "ciou"
        assert {f"{b}/{m}" for b, m in zip(names, ("ciou", "miou", "miou"))} <= set(run.data.metrics)
        assert run.data.tags["xsam.code_version"] and run.data.tags["xsam.seed"] == "0"
        # the counts beside the metrics: 2 images each (--max-samples 2); every sentence of every ref a query
        assert all(run.data.metrics[f"{b}/n_images"] == 2 for b in names)
        assert run.data.metrics["fixture_refcoco/val/n_queries"] > 2
        assert run.data.metrics["fixture_coco_interactive/val/n_prompts"] >= 2
        assert all(len(run.data.tags[f"xsam.eval_data.{b}"]) == 64 for b in names)
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert {c.data.tags["xsam.benchmark"] for c in children} == set(names)
        sem = next(c for c in children if c.data.tags["xsam.benchmark"] == "fixture_coco_semantic/val")
        files = {f.path for f in client.list_artifacts(sem.info.run_id)}
        assert "per_category.json" in files
        overlays = [f.path for c in children for f in client.list_artifacts(c.info.run_id, "overlays")]
        assert overlays and all(p.endswith(".png") for p in overlays)

    versions = client.search_model_versions("name = 'xsam-test'")
    assert len(versions) == 2
    for v in versions:  # --max-samples 2 < every benchmark's size: a partial evaluation, tagged as such
        assert v.tags["xsam.partial"] == "true"
        m = client.get_run(v.run_id).data.metrics
        assert all(m[f"{b}/{p}"] == m[f"{b}/{p}"] for b, p in zip(names, ("ciou", "miou", "miou")))
        assert client.get_run(v.run_id).data.tags["xsam.truncated"] == ",".join(sorted(names))
    # ... so it never moves the alias, and the run says so and prints what the registry holds
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias("xsam-test", "champion")
    assert "alias 'champion' not moved" in proc.stdout and "xsam-test@champion = version None" in proc.stdout

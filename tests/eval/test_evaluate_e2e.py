"""pipelines/evaluate.py end to end: tiny checkpoints scored by Ray actors, logged to a real MLflow
tracking server on 127.0.0.1 (started here), registered, and the alias set on the best version."""

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from helpers import convert_fixtures
from model_fixtures import tiny_model, tiny_tokenizer
from PIL import Image

from xsam.model.checkpoint import save_stage_checkpoint
from xsam.model.stages import S3
from xsam.tracking import metric_name

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
    semantic_names = [c["name"] for c in json.loads(
        (Path(shards) / "_meta" / "fixture_coco_semantic" / "val" / "manifest.json").read_text())["categories"]]
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
    # the UI opens on runs; runs are flat (no nesting), one per checkpoint, every metric by one rule
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not client.search_runs([exp.experiment_id], "tags.`mlflow.parentRunId` != ''")
    first_metric = min(client.get_metric_history(r.info.run_id, "fixture_refcoco/val/ciou")[0].timestamp
                       for r in parents)
    overlay_names = []
    for run in parents:
        assert run.data.tags["xsam.primary.fixture_refcoco/val"] == "ciou"
        assert {f"{b}/{m}" for b, m in zip(names, ("ciou", "miou", "miou"))} <= set(run.data.metrics)
        assert all(metric_name(k) == k for k in run.data.metrics), sorted(run.data.metrics)
        assert run.data.tags["xsam.code_version"] and run.data.tags["xsam.seed"] == "0"
        # the run spans the scoring: both checkpoints' runs exist before any score is logged
        assert run.info.status == "FINISHED" and run.info.start_time < first_metric
        # the counts beside the metrics: 2 images each (--max-samples 2); every sentence of every ref a query
        assert all(run.data.metrics[f"{b}/n_images"] == 2 for b in names)
        assert run.data.metrics["fixture_refcoco/val/n_queries"] > 2
        assert run.data.metrics["fixture_coco_interactive/val/n_prompts"] >= 2
        assert all(len(run.data.tags[f"xsam.eval_data.{b}"]) == 64 for b in names)
        # the semantic benchmark's per-category table: an MLflow table, valid JSON, named categories
        raw = _artifact(client, run, "benchmarks/fixture_coco_semantic/val/per_category.json")
        table = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in per_category.json"))
        rows = [dict(zip(table["columns"], r)) for r in table["data"]]
        assert {"category", "iou", "acc"} <= set(table["columns"]) and len(rows) == len(semantic_names)
        assert [r["category"] for r in rows] == semantic_names
        assert any(r["iou"] is not None for r in rows)
        # one overlay per benchmark (--overlays 1): ground truth | prediction, >= 512 px on the long side
        for b in names:
            (png,) = client.list_artifacts(run.info.run_id, f"benchmarks/{b}/overlays")
            overlay_names.append(png.path)
            picture = Image.open(io.BytesIO(_artifact(client, run, png.path)))
            assert max(picture.size) >= 512 and picture.size[0] > picture.size[1], picture.size
    # the same samples for every checkpoint
    assert len(overlay_names) == 2 * len(names) and len(set(overlay_names)) == len(names)

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
    assert "alias 'champion' not moved" in proc.stderr and "xsam-test@champion = version None" in proc.stdout
    _champion_loads_as_pyfunc(client, mlflow_server, shards)


def _artifact(client, run, path: str) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run.info.run_id, path, tmp)).read_bytes()


def _champion_loads_as_pyfunc(client, uri, shards):
    """Each registered version is a pyfunc model: once the alias points at one, `models:/<name>@champion`
    loads and predicts masks of the image's size for a referring prompt and a panoptic request."""
    import base64

    import mlflow
    import numpy as np
    from pycocotools import mask as mask_utils

    versions = sorted(client.search_model_versions("name = 'xsam-test'"), key=lambda v: int(v.version))
    assert all(v.source.startswith("models:/") for v in versions)
    client.set_registered_model_alias("xsam-test", "champion", versions[0].version)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/xsam-test@champion")
    finally:
        mlflow.set_tracking_uri(before)
    image = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    cats = [c["name"] for c in json.loads((Path(shards) / "_meta" / "fixture_coco_panoptic" / "val" / "manifest.json")
                                          .read_text())["categories"]]
    out = model.predict([{"image": base64.b64encode(buf.getvalue()).decode(), "task": "referring",
                          "prompt": "the thing on the left"},
                         {"image": buf.getvalue(), "task": "panoptic", "prompt": cats}])
    ref, pan = out
    assert len(ref["masks"]) == 1 and ref["task"] == "referring"
    for pred in out:
        assert len(pred["masks"]) == len(pred["labels"]) == len(pred["scores"])
        for m in pred["masks"]:
            assert mask_utils.decode({"size": m["size"], "counts": m["counts"].encode()}).shape == (40, 56)
    assert set(pan["labels"]) <= set(cats)

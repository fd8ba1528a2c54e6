"""Secrets stay out of logs, MLflow and exports; names with quotes reach MLflow's filters intact.

The end-to-end check (AWS keys planted in the environment of a real Ray Train + DeepSpeed run, a
password in its tracking URI, then Ray's session logs, the run's MLflow params / tags and its export
searched for them) is tests/train/test_train_e2e.py::test_worker_failure_resumes_exactly (it reuses that
run); the workflow's is tests/test_full_run.py. Here the pieces, against a real local MLflow store."""

import json
import logging

import pytest
import torch
from mlflow import MlflowClient

from xsam import logs
from xsam.model.config import tiny
from xsam.model.export import load_export, write_export
from xsam.tracking import filter_value, redacted_params

PASSWORD = "hunter2pw"
URI = f"https://alice:{PASSWORD}@mlflow.example.com:5000"


def test_redact_masks_uri_credentials_and_aws_keys():
    text = f"uri {URI} key AKIAABCDEFGHIJKLMNOP AWS_SECRET_ACCESS_KEY=abc/def+ghi s3://bucket/x"
    clean = logs.redact(text)
    assert PASSWORD not in clean and "alice" not in clean and "AKIAABCDEFGHIJKLMNOP" not in clean
    assert "abc/def+ghi" not in clean
    assert "https://***@mlflow.example.com:5000" in clean and "s3://bucket/x" in clean  # the rest stays


def test_log_lines_are_redacted(capsys):
    logs.setup(logs.NORMAL)
    logging.getLogger("xsam.test").info(f"[test] tracking at {URI}")
    err = capsys.readouterr().err
    assert "https://***@mlflow.example.com" in err and PASSWORD not in err


def test_mlflow_params_of_a_config_are_redacted():
    params = redacted_params({"mlflow_uri": URI, "lr": 1e-4, "init_from": [f"s3://k:{PASSWORD}@b/x"]})
    assert params["mlflow_uri"] == "https://***@mlflow.example.com:5000"
    assert params["lr"] == "0.0001" and PASSWORD not in params["init_from"]


def test_export_manifest_holds_no_credentials(tmp_path):
    """write_export masks every string of the caller's manifest fields (the training config's URI)."""
    extra = {"train_config": {"mlflow_uri": URI, "lr": 1e-4, "init_from": ["/a/b"]}, "note": "ok"}
    write_export(tmp_path / "e", {"w": torch.zeros(2, 3)}, tiny(), "s1", extra=extra)
    assert not [p for p in (tmp_path / "e").iterdir() if PASSWORD.encode() in p.read_bytes()]
    _, manifest = load_export(tmp_path / "e")
    assert manifest["train_config"] == {"mlflow_uri": "https://***@mlflow.example.com:5000", "lr": 1e-4,
                                        "init_from": ["/a/b"]}
    assert manifest["note"] == "ok"


def test_training_workers_get_no_credentials_through_the_runtime_env():
    """The settings train.py copies into Ray Train's worker_runtime_env: where S3 is, never the keys."""
    from xsam.pipelines.train import WORKER_S3_SETTINGS

    assert "AWS_ENDPOINT_URL" in WORKER_S3_SETTINGS and "AWS_REGION" in WORKER_S3_SETTINGS
    assert not [k for k in WORKER_S3_SETTINGS if "KEY" in k or "TOKEN" in k or "SECRET" in k]


@pytest.mark.parametrize("name", ["plain", "o'brien's run", 'say "hi"', "back\\slash'", "a\\b"])
def test_names_with_quotes_are_found_by_mlflow_filters(tmp_path, name):
    """A run name or registered-model name holding ' (or ", or a backslash) is looked up exactly."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("x")
    other = client.create_run(exp, tags={"xsam.run_name": "other"})
    mine = client.create_run(exp, tags={"xsam.run_name": name})
    found = client.search_runs([exp], f"tags.`xsam.run_name` = {filter_value(name)} and attributes.status != 'FINISHED'")
    assert [r.info.run_id for r in found] == [mine.info.run_id] != [other.info.run_id]
    model = f"m {name}"
    client.create_registered_model(model)
    client.create_model_version(model, (tmp_path / "src").as_uri(), run_id=mine.info.run_id)
    versions = client.search_model_versions(f"name = {filter_value(model)}")
    assert [(v.name, str(v.version)) for v in versions] == [(model, "1")]


def test_names_a_filter_cannot_hold_are_refused_by_name():
    with pytest.raises(ValueError, match="both ' and \""):
        filter_value("it's \"x\"")
    with pytest.raises(ValueError, match="ending in a backslash"):
        filter_value("a\\")


def test_selection_finds_versions_of_a_model_named_with_a_quote(tmp_path):
    """xsam.eval.selection.select: the registry lookup by a model name holding '."""
    from xsam.eval.selection import select
    from xsam.tracking import metric_name

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("x")
    run = client.create_run(exp, tags={"xsam.primary.fx/val": "ciou"})
    client.log_metric(run.info.run_id, metric_name("fx/val/ciou"), 0.5)
    client.create_registered_model("bob's")
    client.create_model_version("bob's", (tmp_path / "src").as_uri(), run_id=run.info.run_id,
                                tags={"xsam.partial": "false"})
    decision = select(client, "bob's")
    assert decision is not None and str(decision.version) == "1"
    assert str(json.loads(client.get_registered_model("bob's").tags["champion.decision"])["version"]) == "1"

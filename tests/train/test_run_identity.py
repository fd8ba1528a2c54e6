"""A run name is a promise: the same name resumes the same run, another config under it is refused
(never 0 steps plus an export rewritten under the new config); watching/storage settings may change."""

import json

import pytest

from xsam.pipelines.train import RunConflict, claim_run
from xsam.train.config import RESULT_NEUTRAL, load_profile, profile_path


def _cfg(tmp_path, *over):
    return load_profile(profile_path("local"), "s1", [f"output={tmp_path}", "run_name=r", *over])


def test_first_claim_records_identity_and_same_config_resumes(tmp_path):
    assert claim_run(_cfg(tmp_path), "fp-1") is False
    record = json.loads((tmp_path / "r" / "xsam-run.json").read_text())
    assert record["lr"] == 1e-4 and record["data_fingerprint"] == "fp-1"
    assert not set(record) & RESULT_NEUTRAL
    # logging, checkpoint cadence and tracking may change between a run and its resumption
    assert claim_run(_cfg(tmp_path, "log_every=5", "checkpoint_every=7", "mlflow_experiment=x"), "fp-1") is True


@pytest.mark.parametrize("over,fingerprint,field", [
    (["lr=0.0002"], "fp-1", "lr"),
    (["bf16=true"], "fp-1", "bf16"),
    ([], "fp-2", "data_fingerprint"),  # the same name over re-converted data
])
def test_changed_config_under_an_existing_name_is_refused(tmp_path, over, fingerprint, field):
    claim_run(_cfg(tmp_path), "fp-1")
    before = (tmp_path / "r" / "xsam-run.json").read_bytes()
    with pytest.raises(RunConflict, match=rf"run 'r' exists .*\n  {field}: "):
        claim_run(_cfg(tmp_path, *over), fingerprint)
    assert (tmp_path / "r" / "xsam-run.json").read_bytes() == before  # the record is never rewritten

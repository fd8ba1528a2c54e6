"""The workflow's plan (xsam.pipelines.workflow) at its smallest: what it converts, its step keys (a changed
source or registry file reruns the conversion, a logging setting retrains nothing), which step a failed
conversion stops the run before, and a stage name in init_from resolved through the step records."""

import json
import os
import shutil

import pytest

from xsam.data.fixtures import generate
from xsam.pipelines import workflow
from xsam.pipelines.convert import build_parser, run
from xsam.pipelines.train import InitFromError, resolve_init_from
from xsam.train.config import load_benchmarks, load_profiles, profile_path

V = "src-test"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    generate(root)
    return root


def _registry(fixtures, tmp_path, *names: str, suffix: str = ".yaml"):
    reg = tmp_path / "registry"
    reg.mkdir()
    for name in names:
        shutil.copy(fixtures / "registry" / f"{name}.yaml", reg / f"{name}{suffix}")
    data = tmp_path / "data"
    shutil.copytree(fixtures / "data", data)
    return str(reg), str(data)


def test_the_local_profile_converts_what_its_stages_and_benchmarks_use():
    path = profile_path("local")
    needed = workflow.needed_datasets(load_profiles(path), load_benchmarks(path))
    assert needed["fixture_llava_pretrain"] == ["s2"]
    assert needed["fixture_coco_panoptic"] == ["s1", "s3", "evaluate"]
    assert needed["fixture_semantic_png"] == ["evaluate"]
    only_stages = workflow.needed_datasets(load_profiles(path), [])
    assert "fixture_semantic_png" not in only_stages and len(only_stages) == 10


def test_convert_key_covers_the_sources_and_every_registry_file(fixtures, tmp_path):
    reg, data = _registry(fixtures, tmp_path, "fixture_refcoco", "fixture_llava_pretrain")
    names = ["fixture_refcoco"]
    before = workflow.convert_key(reg, data, "out", names, V)
    assert workflow.convert_key(reg, data, "out", names, V) == before
    # a source file under the data root changes (same size, new mtime): the step reruns
    ann = tmp_path / "data" / "refer" / "refcoco" / "instances.json"
    st = ann.stat()
    os.utime(ann, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after_source = workflow.convert_key(reg, data, "out", names, V)
    assert after_source != before
    # an image added to a folder a split names
    img_dir = tmp_path / "data" / "refer" / "images" / "train2014"
    shutil.copy(next(img_dir.iterdir()), img_dir / "extra.jpg")
    assert workflow.convert_key(reg, data, "out", names, V) != after_source
    # a .yml registry file is part of the key (and converted: next test)
    yml = tmp_path / "registry" / "fixture_extra.yml"
    k0 = workflow.convert_key(reg, data, "out", names, V)
    shutil.copy(fixtures / "registry" / "fixture_ade20k.yaml", yml)
    k1 = workflow.convert_key(reg, data, "out", names, V)
    yml.write_text(yml.read_text() + "\n# edited\n")
    assert len({k0, k1, workflow.convert_key(reg, data, "out", names, V)}) == 3


def test_a_yml_entry_converts_and_a_missing_source_fails_only_its_dataset(fixtures, tmp_path):
    reg, data = _registry(fixtures, tmp_path, "fixture_refcoco", "fixture_llava_pretrain", suffix=".yml")
    missing = tmp_path / "data" / "llava" / "LLaVA-Pretrain"
    shutil.rmtree(missing)
    code, outcomes = run(build_parser().parse_args(["--registry", reg, "--data-root", data, "--output",
                                                    str(tmp_path / "shards"), "--serial"]))
    assert code == 1
    failed = {f"{o.dataset}/{o.split}": o.error for o in outcomes if o.status == "failed"}
    assert list(failed) == ["fixture_llava_pretrain/train"] and str(missing) in failed["fixture_llava_pretrain/train"]
    assert {f"{o.dataset}/{o.split}" for o in outcomes if o.status == "converted"} == {
        "fixture_refcoco/train", "fixture_refcoco/val"}  # from .yml files
    cfgs = load_profiles(profile_path("local"))
    steps = [(s, cfgs[s].datasets) for s in ("s1", "s2", "s3")] + [("evaluate", ["fixture_refcoco/val"])]
    step, hit = workflow.first_blocked(steps, failed)
    assert step == "s2" and hit == {"fixture_llava_pretrain/train": failed["fixture_llava_pretrain/train"]}
    message = workflow.blocked_message(step, hit)
    assert "before step 's2'" in message and "fixture_llava_pretrain/train" in message and str(missing) in message
    assert workflow.first_blocked(steps[:1] + steps[2:], failed) is None  # nothing else needs it


def test_stage_keys_cover_only_what_changes_the_result():
    def keys(*overrides):
        cfgs = load_profiles(profile_path("local"), list(overrides))
        return {s: workflow.stage_key(c, ["up"], V) for s, c in cfgs.items()}

    base = keys()
    for neutral in ("log_every=7", "max_failures=3", "mlflow_experiment=other", "mlflow_uri=sqlite:///x.db",
                    "cpus_per_worker=2", "export_shard_size=1000"):
        assert keys(neutral) == base, neutral
    assert all(keys("lr=3e-4")[s] != base[s] for s in base)
    assert keys("stages.s2.seed=1")["s2"] != base["s2"] and keys("stages.s2.seed=1")["s1"] == base["s1"]
    # S3's kept checkpoints are the selection candidates: which exist is part of its key only
    for setting in ("keep_checkpoints=3", "checkpoint_every=2"):
        changed = keys(setting)
        assert changed["s1"] == base["s1"] and changed["s2"] == base["s2"] and changed["s3"] != base["s3"]


def test_init_from_stage_names_resolve_through_the_step_records(tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps" / "s1.json").write_text(json.dumps({"key": "k", "outputs": {"export": "/runs/a/export"}}))
    assert resolve_init_from(["s1", "/elsewhere/export"], tmp_path) == ["/runs/a/export", "/elsewhere/export"]
    with pytest.raises(InitFromError, match=r"stage 's2' has no recorded export in the workdir .*--workdir"):
        resolve_init_from(["s1", "s2"], tmp_path)
    assert workflow.resolve_stage_exports(["s1", "/x"], {"s1": "/runs/a/export"}) == ["/runs/a/export", "/x"]


@pytest.mark.parametrize("profile", ["local", "paper", "single-node-8gpu"])
def test_profile_benchmarks_are_evaluation_splits_of_the_registry(profile, fixtures):
    from pathlib import Path

    from xsam.data.registry import load_registry

    registry = fixtures / "registry" if profile == "local" else Path(__file__).parents[1] / "datasets_registry"
    entries, _ = load_registry(registry)
    for item in load_benchmarks(profile_path(profile)):
        name, split = item.split("/")
        assert name in entries and split in entries[name].splits, f"{profile}: {item} is not in {registry}"
        assert entries[name].split_spec(split).role == "eval", f"{profile}: {item} is not an eval split"


def test_datasets_flag_and_unknown_entries(fixtures):
    from argparse import Namespace

    from xsam.pipelines.full_run import plan_datasets

    cfgs, reg = load_profiles(profile_path("local")), str(fixtures / "registry")
    assert plan_datasets(Namespace(datasets="fixture_refcoco, fixture_ade20k"), cfgs, reg, None) == [
        "fixture_ade20k", "fixture_refcoco"]
    assert len(plan_datasets(Namespace(datasets=None), cfgs, reg, load_benchmarks(profile_path("local")))) == 18
    with pytest.raises(ValueError, match=r"no entry for: fixture_nope \(used by evaluate\)"):
        plan_datasets(Namespace(datasets=None), cfgs, reg, ["fixture_nope/val"])

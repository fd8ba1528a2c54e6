"""The dataset registry: the real datasets_registry/ folder, and the CLI's validation errors.

The CLI is run as a subprocess (`python pipelines/convert.py --registry PATH --validate-only`) and
the tests assert on its actual output: a bad entry must be reported with its FILE and its FIELD.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xsam.data.readers import READERS
from xsam.data.registry import load_registry
from xsam.eval.benchmark import metric_names

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "datasets_registry"
CLI = REPO / "pipelines" / "convert.py"

# Reference section 2: the data of each training stage.
S1_SOURCES = {"coco_panoptic"}
S2_SOURCES = {"llava_pretrain_558k"}
S3_SOURCES = {"llava_v1_5_mix665k", "coco_panoptic", "refcoco", "refcoco_plus", "refcocog", "reasonseg", "grandf",
              "refcocog_gcg", "psg_gcg", "flickr30k_gcg", "coco_vgd"}
# Reference section 3: the catalogue, name -> source format.
CATALOGUE = {
    "llava_pretrain_558k": "llava", "llava_v1_5_mix665k": "llava",
    "coco_panoptic": "coco_panoptic", "coco_instances_val2017": "coco_instances", "coco_semantic": "coco_panoptic",
    "ade20k_panoptic": "coco_panoptic", "ade20k_semantic": "ade20k", "ade20k_instance": "coco_instances",
    "refcoco": "refer", "refcoco_plus": "refer", "refcocog": "refer", "grefcoco": "refer",
    "reasonseg": "labelme",
    "grandf": "gcg_grandf", "psg_gcg": "gcg_grandf", "refcocog_gcg": "gcg_refcocog", "flickr30k_gcg": "gcg_flickr",
    "gcg_eval": "gcg_eval", "coco_vgd": "coco_vgd", "coco_interactive": "psalm_interactive",
}


@pytest.fixture(scope="module")
def registry():
    entries, problems = load_registry(REGISTRY)
    assert not problems, "\n".join(map(str, problems))
    return entries


def run_cli(registry_path: Path, subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """`convert --registry PATH --validate-only`: in this process (its main(), argv to exit code and output),
    or as the real subprocess (once, for the real registry: the entry script itself)."""
    argv = ["--registry", str(registry_path), "--validate-only"]
    if subprocess_run:
        return subprocess.run([sys.executable, str(CLI), *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    import contextlib
    import io

    from xsam.pipelines.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


# -- the real registry ----------------------------------------------------------------------------

def test_real_registry_is_valid_and_covers_every_format(registry):
    assert len(registry) >= 22
    assert len(registry) == len(list(REGISTRY.glob("*.yaml"))), "every YAML file must load as an entry"
    assert set(READERS) <= {e.format for e in registry.values()}


def test_catalogue_datasets_are_registered_with_their_format(registry):
    missing = sorted(set(CATALOGUE) - set(registry))
    assert not missing
    assert {name: registry[name].format for name in CATALOGUE} == CATALOGUE
    assert registry["coco_semantic"].option_values().merge_by_category is True
    assert registry["reasonseg"].split_spec("train").explanations == "explanatory/train.json"


def test_stages_follow_the_reference(registry):
    by_stage = {s: {n for n, e in registry.items() if s in e.stages} for s in ("s1", "s2", "s3")}
    assert by_stage["s1"] == S1_SOURCES
    assert by_stage["s2"] == S2_SOURCES
    assert by_stage["s3"] == S3_SOURCES
    for name in S3_SOURCES:
        assert "s3" in registry[name].stages, name


def test_entries_are_consistent(registry):
    for name, e in registry.items():
        roles = {split: e.split_spec(split).role for split in e.splits}
        has_eval, has_train = "eval" in roles.values(), "train" in roles.values()
        assert has_eval == bool(e.metrics), f"{name}: metrics iff an eval split ({roles}, {e.metrics})"
        assert set(e.metrics) <= metric_names(e.task), name  # the benchmark's own table
        if e.stages:
            assert has_train, f"{name}: a staged dataset needs a train split"
        if not has_train:
            assert e.stages == [], f"{name}: an eval-only dataset has no stage"
        if e.task.value in ("chat", "gcg", "reasoning_seg"):
            assert e.label_space is None, name
        else:
            assert e.label_space, name
        assert e.description and e.homepage and e.citation and e.license, name
        assert e.root and not e.root.startswith("/"), f"{name}: root is relative to the data root"
        for split in e.splits:
            for field, value in e.split_spec(split).model_dump().items():
                if isinstance(value, str) and field not in ("role", "ref_split"):
                    assert not value.startswith("/") and "://" not in value, f"{name}.{split}.{field}"


def test_cli_validates_the_real_registry():
    res = run_cli(REGISTRY, subprocess_run=True)
    n = len(list(REGISTRY.glob("*.yaml")))
    assert res.returncode == 0, res.stderr
    assert f"{n} valid registry entries" in res.stdout
    assert "INVALID" not in res.stderr


# -- the CLI on bad entries -----------------------------------------------------------------------

def good_entry(name: str) -> dict:
    split = {"annotations": "annotations/panoptic_train2017.json", "images": "train2017",
             "masks": "panoptic_train2017"}
    return {"name": name, "task": "generic_seg", "format": "coco_panoptic", "description": "a test entry",
            "root": "coco", "splits": {"train": dict(split), "val": {**split, "role": "eval"}},
            "label_space": "coco_panoptic_133", "stages": ["s1"],
            "metrics": ["pq"], "license": "CC BY 4.0", "citation": "Lin et al., ECCV 2014"}


def write(folder: Path, stem: str, entry: dict | str) -> Path:
    path = folder / f"{stem}.yaml"
    path.write_text(entry if isinstance(entry, str) else yaml.safe_dump(entry, sort_keys=False), encoding="utf-8")
    return path


def _unknown_format(e):
    e["format"] = "coco_panoptik"


def _missing_masks(e):
    del e["splits"]["train"]["masks"]


def _wrong_task(e):
    e["task"] = "panoptic_seg"


def _extra_key(e):
    e["colour"] = "blue"


def _extra_split_key(e):
    e["splits"]["val"]["panoptic_masks"] = "x"


def _bad_role(e):
    e["splits"]["val"]["role"] = "test"


def _bad_option(e):
    e["options"] = {"merge_by_categry": True}


def _missing_license(e):
    del e["license"]


def _bad_stage(e):
    e["stages"] = ["s4"]


BAD_ENTRIES = [
    # (mutation, field the CLI must name, text of the message)
    (_unknown_format, "format", "unknown source format 'coco_panoptik'"),
    (_missing_masks, "splits.train.masks", "Field required"),
    (_wrong_task, "task", "Input should be"),
    (_extra_key, "colour", "Extra inputs are not permitted"),
    (_extra_split_key, "splits.val.panoptic_masks", "Extra inputs are not permitted"),
    (_bad_role, "splits.val.role", "Input should be 'train' or 'eval'"),
    (_bad_option, "options.merge_by_categry", "Extra inputs are not permitted"),
    (_missing_license, "license", "Field required"),
    (_bad_stage, "stages.0", "Input should be 's1', 's2' or 's3'"),
]


@pytest.mark.parametrize("mutate,field,message", BAD_ENTRIES, ids=[m.__name__.strip("_") for m, _, _ in BAD_ENTRIES])
def test_cli_names_file_and_field_of_a_bad_entry(tmp_path, mutate, field, message):
    entry = good_entry("bad_one")
    mutate(entry)
    bad = write(tmp_path, "bad_one", entry)
    write(tmp_path, "fine", good_entry("fine"))
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {bad}: {field}: {message}" in res.stderr, res.stderr
    assert "fine.yaml" not in res.stderr  # only the bad file is blamed
    assert "1 invalid registry file(s), 1 valid entries" in res.stderr


def test_cli_reports_name_not_matching_file_stem(tmp_path):
    bad = write(tmp_path, "coco_panoptic_copy", good_entry("coco_panoptic"))
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {bad}: name: 'coco_panoptic' must equal the file name 'coco_panoptic_copy'" in res.stderr


def test_cli_reports_invalid_yaml(tmp_path):
    bad = write(tmp_path, "broken", "name: broken\nsplits: {train: [\n")
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {bad}: <file>: not valid YAML" in res.stderr


def test_cli_reports_a_non_mapping_file(tmp_path):
    bad = write(tmp_path, "a_list", "- name: a_list\n")
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {bad}: <file>: top level must be a mapping" in res.stderr


def test_cli_reports_every_problem_of_a_file(tmp_path):
    entry = good_entry("two_bad")
    del entry["splits"]["train"]["masks"]
    del entry["splits"]["val"]["images"]
    bad = write(tmp_path, "two_bad", entry)
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {bad}: splits.train.masks: Field required" in res.stderr
    assert f"INVALID {bad}: splits.val.images: Field required" in res.stderr


def test_cli_reports_a_duplicate_name(tmp_path):
    write(tmp_path, "twin", good_entry("twin"))
    dup = tmp_path / "twin.yml"
    dup.write_text(yaml.safe_dump(good_entry("twin")), encoding="utf-8")
    res = run_cli(tmp_path)
    assert res.returncode != 0
    assert f"INVALID {dup}: name: duplicate dataset name 'twin'" in res.stderr


# -- the CLI on good input ------------------------------------------------------------------------

def test_cli_accepts_a_good_folder(tmp_path):
    write(tmp_path, "first", good_entry("first"))
    write(tmp_path, "second", good_entry("second"))
    (tmp_path / "notes.txt").write_text("not a registry file")
    res = run_cli(tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2 valid registry entries"
    assert res.stderr == ""


def test_cli_accepts_a_single_yaml_file(tmp_path):
    write(tmp_path, "broken", "name: [\n")  # a bad sibling must not matter
    one = write(tmp_path, "only", good_entry("only"))
    res = run_cli(one)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1 valid registry entries"


def test_cli_accepts_a_single_real_registry_file():
    res = run_cli(REGISTRY / "refcoco.yaml")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1 valid registry entries"


def test_cli_rejects_a_single_bad_yaml_file(tmp_path):
    entry = good_entry("alone")
    entry["format"] = "nope"
    bad = write(tmp_path, "alone", entry)
    res = run_cli(bad)
    assert res.returncode != 0
    assert f"INVALID {bad}: format: unknown source format 'nope'" in res.stderr


# -- the data engineer's guide stays true ---------------------------------------------------------

GUIDE = REPO / "docs" / "adding-a-dataset.md"


def test_guide_example_is_a_valid_entry(tmp_path):
    text = GUIDE.read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    entry = yaml.safe_load(example)
    path = write(tmp_path, entry["name"], example)
    res = run_cli(path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1 valid registry entries"


def test_guide_lists_every_format_with_its_fields(registry):
    rows = {line.split("|")[1].strip().strip("`"): line for line in GUIDE.read_text(encoding="utf-8").splitlines()
            if line.startswith("| `")}
    for fmt, reader in READERS.items():
        assert fmt in rows, f"format {fmt} missing from the guide's table"
        fields = [f for f in reader.Split.model_fields if f not in ("role", "allow_empty")] + list(
            reader.Options.model_fields)  # role and allow_empty: every split's fields
        for field in fields:
            assert f"`{field}`" in rows[fmt], f"{fmt}: field {field} missing from the guide's table"
        for example in (cell.strip("` ") for cell in rows[fmt].split("|")[4].split(",")):
            assert registry[example].format == fmt, f"{example} is not a {fmt} entry"


def test_registry_rejects_the_removed_sampling_group_field(tmp_path):
    # S3 balances per dataset; an entry still carrying the old field must name file and field.
    path = write(tmp_path, "old", {**good_entry("old"), "sampling_group": "generic_seg"})
    entries, problems = load_registry(tmp_path)
    assert entries == {}
    assert [(p.file, p.field) for p in problems] == [(str(path), "sampling_group")]
    assert "per dataset" in problems[0].message
    res = run_cli(path)
    assert res.returncode != 0 and "old.yaml" in res.stderr and "sampling_group" in res.stderr


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    text = yaml.safe_dump(good_entry("twice"), sort_keys=False)
    lines = text.splitlines()
    at = lines.index("  train:") + 1  # a second `train:` under splits (plain YAML keeps the last silently)
    lines[at:at] = ["  train:", "    annotations: other.json", "    images: other", "    masks: other"]
    bad = write(tmp_path, "twice", "\n".join(lines) + "\n")
    entries, problems = load_registry(tmp_path)
    assert not entries
    assert [str(p) for p in problems] == [f"{bad}: train: duplicate key 'train' at lines {at} and {at + 1}"]
    res = run_cli(tmp_path)
    assert res.returncode == 2 and f"INVALID {bad}: train: duplicate key 'train'" in res.stderr


@pytest.mark.parametrize("task,metrics,bad", [("generic_seg", ["pq", "ap50"], "'ap50'"),
                                              ("generic_seg", ["PQ"], "'PQ'"),
                                              ("chat", ["miou"], "'miou'")])
def test_metrics_must_be_ones_the_task_benchmark_computes(tmp_path, task, metrics, bad):
    entry = {**good_entry("scored"), "task": task, "metrics": metrics}
    path = write(tmp_path, "scored", entry)
    _, problems = load_registry(tmp_path)
    (problem,) = problems
    assert (problem.file, problem.field) == (str(path), "metrics")
    assert problem.message.startswith(f"{bad} not computed by the {task} benchmark"), problem.message
    for m in metric_names(__import__("xsam.data.schema", fromlist=["Task"]).Task(task)):
        assert m in problem.message  # says what is allowed


def test_metric_table_holds_what_each_benchmark_reports():
    """The names the registry allows are a superset of what Benchmark.result reports (it is not a copy)."""
    from xsam.data.schema import Task
    from xsam.eval.benchmark import PRIMARY, Benchmark

    cats = [{"id": 1, "name": "a", "isthing": 1}, {"id": 2, "name": "b", "isthing": 0}]
    for task in Task:
        names = metric_names(task)
        assert (task in PRIMARY) == bool(names), task
        if task is Task.gcg or task not in PRIMARY:
            continue  # GCG's caption metrics need Java; its names are the accumulator's own lists
        bench = Benchmark("d", "val", task, cats)
        reported = {k for k in bench.result(bench.new()) if not k.startswith("n_")}
        assert reported and reported <= names, (task, reported - names)

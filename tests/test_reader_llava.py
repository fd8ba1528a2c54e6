import json
from pathlib import Path

import yaml

from helpers import read_split
from xsam.data import storage
from xsam.data.convert import convert, serial_executor
from xsam.data.fixtures import generate
from xsam.data.registry import load_registry
from xsam.data.shards import meta_dir, split_dir

MIX = "fixture_llava_mix665k"
PRE = "fixture_llava_pretrain"
COCO = "coco/train2017/000000033471.jpg"


def _convert(tmp: Path, mutate=None):
    """Generate the LLaVA fixtures, let `mutate(llava root, registry folder)` change them, convert."""
    made = generate(tmp / "fx", ["llava"])
    if mutate:
        mutate(tmp / "fx" / "data" / "llava", tmp / "fx" / "registry")
    entries, problems = load_registry(tmp / "fx" / "registry")
    assert not problems, problems
    out = str(tmp / "out")
    outcomes = convert(list(entries.values()), str(tmp / "fx" / "data"), out, executor=serial_executor,
                       log=lambda _: None)
    return made, out, {o.dataset: o for o in outcomes}


def _quarantine(out: str, dataset: str) -> list[dict]:
    text = storage.read_bytes(storage.join(meta_dir(out, dataset, "train"), "quarantine.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def _edit_records(edit):
    def mutate(root, _registry):
        path = root / "llava_v1_5_mix665k.json"
        records = json.loads(path.read_text(encoding="utf-8"))
        edit(records)
        path.write_text(json.dumps(records), encoding="utf-8")
    return mutate


def test_conversations_grouped_by_image_match_the_truth(tmp_path):
    made, out, outcomes = _convert(tmp_path)
    for name in (MIX, PRE):
        assert outcomes[name].status == "converted", outcomes[name]
        truth = made[name].truth["train"]
        got = read_split(out, name, "train")
        assert set(got) == set(truth)
        for image_path, t in truth.items():
            sample, _, ext = got[image_path]
            assert sample.task.value == "chat" and not sample.segments
            assert ext == t["format"] == sample.image.format  # sniffed from the bytes, not the name
            assert (sample.image.file_name, sample.image.width, sample.image.height) == (
                image_path, t["width"], t["height"])
            assert [(c.id, [(x.role, x.value) for x in c.turns]) for c in sample.conversations] == t["conversations"]
    coco = read_split(out, MIX, "train")[COCO][0]
    assert [c.id for c in coco.conversations] == ["000000033471", "000000033471-vqav2"]  # sorted by id
    assert coco.conversations[0].turns[0].value.startswith("<image>\n")
    m = outcomes[MIX].manifest
    assert m.excluded == {"text_only": 2} and (m.num_read, m.num_quarantined) == (4, 0)
    assert read_split(out, MIX, "train")["ocr_vqa/images/671189573.jpg"][1][:4] == b"\x89PNG"


def test_unknown_role_quarantines_the_image_naming_the_field(tmp_path):
    made, out, outcomes = _convert(tmp_path, _edit_records(lambda r: r[2]["conversations"][2].update({"from": "system"})))
    [q] = _quarantine(out, MIX)
    assert (q["source_id"], q["field"]) == (COCO, "2.conversations.2.from")
    assert q["file"].endswith("llava_v1_5_mix665k.json")
    assert set(read_split(out, MIX, "train")) == set(made[MIX].truth["train"]) - {COCO}
    m = outcomes[MIX].manifest
    assert (m.num_read, m.num_samples, m.num_quarantined) == (4, 3, 1)


def test_non_utf8_text_quarantines_the_image_naming_the_field(tmp_path):
    def latin1(root, _registry):
        path = root / "llava_v1_5_mix665k.json"
        path.write_bytes(path.read_bytes().replace(b'"Yes."', b'"Oui, caf\xe9."'))

    made, out, outcomes = _convert(tmp_path, latin1)
    [q] = _quarantine(out, MIX)
    assert (q["source_id"], q["field"]) == ("gqa/images/2354786.jpg", "3.conversations.1.value")
    assert "UTF-8" in q["reason"]
    assert outcomes[MIX].manifest.num_samples == len(made[MIX].truth["train"]) - 1


def test_escaping_path_and_missing_image_are_quarantined(tmp_path):
    def edit(records):
        records[3]["image"] = "../../../etc/passwd"
        records[6]["image"] = "textvqa/train_images/not_there.jpg"

    _, out, _ = _convert(tmp_path, _edit_records(edit))
    got = {q["source_id"]: q for q in _quarantine(out, MIX)}
    assert set(got) == {"../../../etc/passwd", "textvqa/train_images/not_there.jpg"}
    assert got["../../../etc/passwd"]["field"] == "3.image" and "escapes" in got["../../../etc/passwd"]["reason"]
    assert got["textvqa/train_images/not_there.jpg"]["file"].endswith("not_there.jpg")
    assert set(read_split(out, MIX, "train")) == {COCO, "ocr_vqa/images/671189573.jpg"}


def test_text_only_records_quarantined_when_not_dropped(tmp_path):
    def keep_text_only(_root, registry):
        path = registry / f"{MIX}.yaml"
        entry = yaml.safe_load(path.read_text())
        entry["options"]["drop_text_only"] = False
        path.write_text(yaml.safe_dump(entry))

    _, out, outcomes = _convert(tmp_path, keep_text_only)
    q = _quarantine(out, MIX)
    assert sorted((x["source_id"], x["field"]) for x in q) == [("records[1]", "1.image"), ("records[5]", "5.image")]
    assert outcomes[MIX].manifest.excluded == {"text_only": 0}


def test_missing_annotation_file_fails_only_its_dataset(tmp_path):
    made, out, outcomes = _convert(tmp_path, lambda root, _: (root / "llava_v1_5_mix665k.json").unlink())
    assert outcomes[MIX].status == "failed" and "llava_v1_5_mix665k.json" in outcomes[MIX].error
    assert outcomes[PRE].status == "converted"
    assert set(read_split(out, PRE, "train")) == set(made[PRE].truth["train"])


def test_non_utf8_image_path_is_quarantined_naming_the_field(tmp_path):
    def latin1(root, _registry):
        path = root / "llava_v1_5_mix665k.json"
        path.write_bytes(path.read_bytes().replace(b'"gqa/images/2354786.jpg"', b'"gqa/images/caf\xe9.jpg"'))

    made, out, outcomes = _convert(tmp_path, latin1)
    [q] = _quarantine(out, MIX)
    assert (q["source_id"], q["field"]) == ("gqa/images/caf\udce9.jpg", "3.image")
    assert outcomes[MIX].manifest.num_samples == len(made[MIX].truth["train"]) - 1

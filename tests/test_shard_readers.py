"""Converted shards open in any WebDataset reader: Ray Data on a split folder and on the whole tree,
`webdataset.WebDataset` on brace-expanded URLs; an output of the old layout is refused with a hint."""

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from helpers import convert_fixtures
from xsam.data.schema import Sample
from xsam.data.shards import OldLayoutError, iter_tar, list_splits, shard_urls, split_dir, split_manifest
from xsam.train.shard_index import ShardIndex


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A JPEG dataset and one mixing JPEG and PNG images, several shards per split, plus the training
    index cache a run leaves behind."""
    tmp = tmp_path_factory.mktemp("readers")
    _, out, outcomes = convert_fixtures(tmp, ["coco_panoptic", "semantic_png"], max_samples=2, log=lambda _: None)
    assert {o.status for o in outcomes} == {"converted"}
    ShardIndex.build(out, list_splits(out))  # writes index-*.bin beside each manifest
    return out, {(o.dataset, o.split): o.manifest for o in outcomes}


def _check_rows(rows, manifests):
    by_key = {}
    for row in rows:
        assert set(row) == {"__key__", "__url__", "image", "json"}, sorted(row)
        sample = Sample.from_json_bytes(row["json"]) if isinstance(row["json"], bytes) else None
        by_key[row["__key__"]] = (sample, row["image"])
    assert len(by_key) == len(rows) == sum(m.num_samples for m in manifests)
    return by_key


def test_ray_data_reads_a_split_folder_and_the_whole_tree(tree):
    import ray
    import ray.data

    out, manifests = tree
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True)
    try:
        split = ray.data.read_webdataset(split_dir(out, "fixture_semantic_png", "val"), decoder=None).take_all()
        whole = ray.data.read_webdataset(out).take_all()  # default decoding: images become arrays
    finally:
        ray.shutdown()
    got = _check_rows(split, [manifests[("fixture_semantic_png", "val")]])
    formats = {s.image.format for s, _ in got.values()}
    assert formats == {"jpg", "png"}  # the split mixes encodings under one member name
    for sample, image in got.values():
        assert image[:4] == (b"\x89PNG" if sample.image.format == "png" else b"\xff\xd8\xff\xe0")[:4]
    assert len(whole) == sum(m.num_samples for m in manifests.values())
    for row in whole:
        assert set(row) == {"__key__", "__url__", "image", "json"}
        assert isinstance(row["json"], dict) and row["json"]["dataset"] in {d for d, _ in manifests}
        assert "/_meta/" not in row["__url__"] and row["__url__"].endswith(".tar")


def test_webdataset_reads_brace_expanded_urls(tree):
    out, manifests = tree
    m = manifests[("fixture_coco_panoptic", "train")]
    assert len(m.shards) == 3
    url = f"{split_dir(out, 'fixture_coco_panoptic', 'train')}/fixture_coco_panoptic-train-{{000000..000002}}.tar"
    rows = list(wds.WebDataset(url, shardshuffle=False).decode("pil", wds.imagehandler("pil", ["image"])))
    assert len(rows) == m.num_samples
    for row in rows:
        sample = Sample.from_json_bytes(row["json"]) if isinstance(row["json"], bytes) else Sample(**row["json"])
        assert row["image"].size == (sample.image.width, sample.image.height)
    assert [k for url in shard_urls(out, "fixture_coco_panoptic", "train") for k, *_ in iter_tar(url)] \
        == sorted(r["__key__"] for r in rows)


def test_an_output_of_the_old_layout_is_refused_with_a_hint_to_reconvert(tree, tmp_path):
    out, _ = tree
    old = tmp_path / "old"
    folder = old / "fixture_coco_panoptic" / "train"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        Path(out, "_meta", "fixture_coco_panoptic", "train", "manifest.json").read_text())
    with pytest.raises(OldLayoutError, match="converted by an older xsam .* reconvert it"):
        shard_urls(str(old), "fixture_coco_panoptic", "train")
    with pytest.raises(OldLayoutError, match="reconvert"):
        split_manifest(str(old), "fixture_coco_panoptic", "train")
    with pytest.raises(OldLayoutError, match="reconvert"):
        ShardIndex.build(str(old), [("fixture_coco_panoptic", "train")])
    # a tar with layout 1 members (<key>.jpg + <key>.json)
    key, image, _, sample = next(iter_tar(shard_urls(out, "fixture_coco_panoptic", "train")[0]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in ((f"{key}.jpg", image), (f"{key}.json", sample.to_json_bytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = folder / "fixture_coco_panoptic-train-000000.tar"
    shard.write_bytes(buf.getvalue())
    with pytest.raises(OldLayoutError, match=r"members \['jpg', 'json'\].*reconvert"):
        list(iter_tar(str(shard)))

"""Exports in the Hugging Face layout (xsam.model.export): sharded round trip, shard sizes, refusal of
incomplete exports, and no rename / copy when writing, locally and on a loopback S3 server (moto)."""

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch
from helpers import start_moto
from model_fixtures import tiny_model, tiny_tokenizer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from xsam.data import storage
from xsam.model.checkpoint import load_stage_checkpoint, read_manifest, save_stage_checkpoint
from xsam.model.config import tiny
from xsam.model.export import (
    CONFIG,
    INDEX,
    MANIFEST,
    ExportError,
    load_export,
    load_tokenizer,
    plan_shards,
    write_export,
)
from xsam.model.stages import S3
from xsam.model.tokenizer import SPECIAL_TOKENS

SHARD = 300_000  # bytes; the tiny S3 model (~1.6 MB) takes 6 shards


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, "s3", seed=0)


@pytest.fixture(scope="module")
def exported(model, tok, tmp_path_factory):
    cfg, m = model
    folder = tmp_path_factory.mktemp("export") / "export"
    result = save_stage_checkpoint(m, S3, cfg, folder, extra={"data_fingerprint": "abc"}, tokenizer=tok,
                                   max_shard_size=SHARD)
    return folder, result


def _damaged(exported, tmp_path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(exported[0], folder)
    return folder


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*-of-*.safetensors"))


def _relist(folder: Path, name: str) -> None:
    """Record a rewritten file's size and sha256 in the manifest (an export consistent on its face)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest))


# --------------------------------------------------------------------------- layout and round trip
def test_sharded_export_round_trips_exactly(exported, model, tok):
    folder, result = exported
    cfg, m = model
    shards = _shards(folder)
    assert len(shards) >= 3 and [p.name for p in shards][-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    state, manifest = load_export(folder)
    want = m.state_dict()
    assert set(state) == set(want) == set(manifest["keys"])
    for key, value in want.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key

    index = json.loads((folder / INDEX).read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    config = json.loads((folder / CONFIG).read_text())
    assert config["model_type"] == "xsam" and config["architectures"] == ["XSAM"] and config["stage"] == "s3"
    assert {k: config[k] for k in cfg.to_dict()} == json.loads(json.dumps(cfg.to_dict()))
    assert config["special_token_ids"] == {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert config["eos_token_id"] == tok.eos_token_id and config["dtype"] == "float32"
    # transformers reads it: AutoConfig knows model_type "xsam" (registered by xsam.model.export)
    from transformers import AutoConfig

    from xsam.model.hf_config import XSAMPretrainedConfig

    auto = AutoConfig.from_pretrained(str(folder))
    assert isinstance(auto, XSAMPretrainedConfig) and auto.model_type == "xsam" and auto.stage == "s3"
    assert auto.llm == json.loads(json.dumps(cfg.to_dict()["llm"])) and auto.xsam_config() == cfg

    # the manifest lists every other file with its size and sha256; the tokenizer sits at the root
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk == set(result.files) - {MANIFEST}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert manifest["tokenizer_files"] and set(manifest["tokenizer_files"]) <= on_disk
    assert manifest["stage"] == "s3" and manifest["data_fingerprint"] == "abc"
    again = load_tokenizer(folder)
    assert again.get_vocab() == tok.get_vocab()
    assert again.convert_tokens_to_ids("<SEG>") == tok.convert_tokens_to_ids("<SEG>")


def test_bf16_tensors_keep_their_dtype(tmp_path):
    state = {"a.weight": torch.randn(64, 33).to(torch.bfloat16), "b.bias": torch.randn(7).to(torch.bfloat16)}
    write_export(tmp_path / "e", state, tiny(), "s1", max_shard_size=4096)
    got, _ = load_export(tmp_path / "e")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v) for k, v in state.items())
    assert json.loads((tmp_path / "e" / CONFIG).read_text())["dtype"] == "bfloat16"


# --------------------------------------------------------------------------- shard sizes
def test_no_file_exceeds_the_shard_size_but_a_single_oversized_tensor(exported, tmp_path):
    folder, result = exported
    assert not result.oversized
    assert all(p.stat().st_size <= SHARD for p in _shards(folder))

    # header-heavy: many one-element tensors with long names; and one tensor over the limit alone
    limit = 4000
    state = {f"layer.{i:03d}." + "x" * 90: torch.full((1,), float(i)) for i in range(120)}
    state["huge.weight"] = torch.randn(2000)  # 8000 bytes > limit
    result = write_export(tmp_path / "e", state, tiny(), "s1", max_shard_size=limit)
    assert result.oversized == ["huge.weight"]
    index = json.loads((tmp_path / "e" / INDEX).read_text())["weight_map"]
    big = index["huge.weight"]
    assert [k for k, v in index.items() if v == big] == ["huge.weight"]
    sizes = {p.name: p.stat().st_size for p in _shards(tmp_path / "e")}
    assert sizes[big] > limit and all(s <= limit for n, s in sizes.items() if n != big)
    assert len(sizes) < len(state) // 4  # packed, not one tensor per shard
    got, _ = load_export(tmp_path / "e")
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_plan_keeps_key_order_and_packs_greedily():
    state = {k: torch.zeros(100) for k in "abcdef"}  # 400 bytes of data each
    plan, oversized = plan_shards(state, 1200)  # two tensors + headers fit, three do not
    assert [k for shard in plan for k in shard] == list("abcdef") and not oversized
    assert all(len(shard) == 2 for shard in plan)
    with pytest.raises(ValueError, match="max_shard_size"):
        plan_shards(state, 0)


# --------------------------------------------------------------------------- incomplete exports
def test_missing_manifest_is_refused(exported, tmp_path, model):
    folder = _damaged(exported, tmp_path)
    (folder / MANIFEST).unlink()
    with pytest.raises(ExportError, match=r"incomplete export: .*manifest\.json missing"):
        load_export(folder)
    with pytest.raises(ExportError, match=r"manifest\.json missing"):
        load_stage_checkpoint(model[1], folder, S3)


def test_missing_shard_is_refused(exported, tmp_path):
    folder = _damaged(exported, tmp_path)
    shard = _shards(folder)[1]
    shard.unlink()
    with pytest.raises(ExportError, match=f"incomplete export: .*{shard.name} missing"):
        load_export(folder)


def test_truncated_shard_is_refused(exported, tmp_path):
    folder = _damaged(exported, tmp_path)
    shard = _shards(folder)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ExportError, match=f"{shard.name} has {len(data) - 100} bytes, manifest.json says {len(data)}"):
        load_export(folder)


def test_corrupt_shard_of_the_right_size_fails_the_checksum(exported, tmp_path):
    folder = _damaged(exported, tmp_path)
    shard = _shards(folder)[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=f"{shard.name}: sha256"):
        load_export(folder)
    load_export(folder, verify=False)  # sizes only


def test_key_missing_from_a_shard_is_refused(exported, tmp_path):
    folder = _damaged(exported, tmp_path)
    shard = _shards(folder)[2]
    tensors = load_safetensors(shard.read_bytes())
    dropped = min(tensors)
    del tensors[dropped]
    shard.write_bytes(save_safetensors(tensors))
    _relist(folder, shard.name)
    with pytest.raises(ExportError, match=f"key '{dropped}' missing from .*{shard.name}"):
        load_export(folder)


def test_key_missing_from_the_index_is_refused(exported, tmp_path):
    folder = _damaged(exported, tmp_path)
    index = json.loads((folder / INDEX).read_text())
    dropped = sorted(index["weight_map"])[5]
    del index["weight_map"][dropped]
    (folder / INDEX).write_text(json.dumps(index))
    _relist(folder, INDEX)
    with pytest.raises(ExportError, match=f"key '{dropped}' of manifest.json missing from weight_map"):
        load_export(folder)


def test_a_crash_while_rewriting_leaves_no_manifest(exported, tmp_path, model, monkeypatch):
    folder = _damaged(exported, tmp_path)
    written, manifest_there = [], []
    real = storage.write_bytes

    def crash_on_second_shard(location, data):
        written.append(os.path.basename(location))
        manifest_there.append((folder / MANIFEST).exists())
        if len(written) == 2:
            raise OSError("disk full")
        real(location, data)

    monkeypatch.setattr(storage, "write_bytes", crash_on_second_shard)
    cfg, m = model
    with pytest.raises(OSError, match="disk full"):
        save_stage_checkpoint(m, S3, cfg, folder, max_shard_size=SHARD)
    assert written[0].startswith("model-00001-of-") and manifest_there == [False, False]  # deleted first
    with pytest.raises(ExportError, match="manifest.json missing"):
        read_manifest(folder)


# --------------------------------------------------------------------------- no rename, no copy
def test_local_export_renames_and_copies_nothing(model, tok, tmp_path, monkeypatch):
    calls: list[tuple] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def observed(*args, **kwargs):
            calls.append((name, args))
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, observed)

    for owner, name in ((os, "rename"), (os, "replace"), (os, "link"), (shutil, "move"), (shutil, "copyfile"),
                        (storage, "move")):
        spy(owner, name)
    opened = []
    real_open = storage.open_output
    monkeypatch.setattr(storage, "open_output", lambda loc: opened.append(loc) or real_open(loc))
    cfg, m = model
    folder = tmp_path / "export"
    save_stage_checkpoint(m, S3, cfg, folder, tokenizer=tok, max_shard_size=SHARD)
    save_stage_checkpoint(m, S3, cfg, folder, tokenizer=tok, max_shard_size=SHARD)  # a rewrite in place
    assert calls == []
    names = sorted(p.name for p in folder.iterdir())
    assert sorted(os.path.basename(p) for p in opened) == sorted(names * 2)  # every file opened once per export
    assert opened[-1].endswith(MANIFEST)


# --------------------------------------------------------------------------- S3 (moto_server on loopback)
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import requests

    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(tmp_path_factory.mktemp("moto") / "recording.jsonl")}
    proc, endpoint, _ = start_moto("xsam-exports", env)
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_REGION": "us-east-1"}.items():
        patch.setenv(key, value)
    patch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    def record(fn):
        """Run fn() with moto's request recorder on; return the recorded requests."""
        requests.post(f"{endpoint}/moto-api/recorder/reset-recording")
        requests.post(f"{endpoint}/moto-api/recorder/start-recording")
        try:
            fn()
        finally:
            requests.post(f"{endpoint}/moto-api/recorder/stop-recording")
        text = requests.get(f"{endpoint}/moto-api/recorder/download-recording").text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    yield record
    patch.undo()
    proc.terminate()
    proc.wait(timeout=10)


def _writes(recording, bucket="xsam-exports"):
    """(method, key, query) of the requests that change objects, in order."""
    out = []
    for entry in recording:
        url = urlparse(entry["url"])
        headers = {k.lower() for k in entry["headers"]}
        assert "x-amz-copy-source" not in headers, f"copy: {entry['method']} {entry['url']}"  # CopyObject / UploadPartCopy
        if entry["method"] in ("PUT", "POST", "DELETE"):
            out.append((entry["method"], url.path.removeprefix(f"/{bucket}/"), parse_qs(url.query, keep_blank_values=True)))
    return out


def _completed(writes) -> Counter:
    """Objects created per key: a plain PUT, or the completion (POST ?uploadId) of a multipart upload."""
    done = Counter()
    for method, key, query in writes:
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query):
            done[key] += 1
    return done


def test_s3_export_writes_each_key_once_and_copies_nothing(s3, model, tok):
    cfg, m = model
    uri = "s3://xsam-exports/run/export"
    recording = s3(lambda: save_stage_checkpoint(m, S3, cfg, uri, tokenizer=tok, max_shard_size=SHARD))
    writes = _writes(recording)
    names = {loc.rsplit("/", 1)[1] for loc in storage.list_files(uri)}
    assert len([n for n in names if n.startswith("model-")]) >= 3
    assert _completed(writes) == Counter({f"run/export/{n}": 1 for n in names})
    assert not [w for w in writes if w[0] == "DELETE"]  # no temporary key to clean up
    assert max(i for i, w in enumerate(writes) if w[1] == f"run/export/{MANIFEST}") == len(writes) - 1  # last

    state, _ = load_export(uri)  # read directly from S3, checked
    want = m.state_dict()
    assert set(state) == set(want) and all(torch.equal(state[k], v) for k, v in want.items())
    assert load_tokenizer(uri).get_vocab() == tok.get_vocab()

    # a rewrite deletes the old manifest before anything else (then only final keys, still no copy)
    recording = s3(lambda: save_stage_checkpoint(m, S3, cfg, uri, tokenizer=tok, max_shard_size=SHARD))
    writes = [w for w in _writes(recording) if not w[1].endswith("/")]  # pyarrow's directory markers aside
    assert writes[0][:2] == ("DELETE", f"run/export/{MANIFEST}")
    assert [w for w in writes if w[0] == "DELETE"] == writes[:1]
    assert _completed(writes) == Counter({f"run/export/{n}": 1 for n in names})


def test_s3_export_missing_a_shard_is_refused(s3, model):
    import boto3

    cfg, m = model
    uri = "s3://xsam-exports/broken/export"
    save_stage_checkpoint(m, S3, cfg, uri, max_shard_size=SHARD)
    shard = [loc for loc in storage.list_files(uri) if "/model-" in loc][1]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    client.delete_object(Bucket="xsam-exports", Key=shard.removeprefix("s3://xsam-exports/"))
    with pytest.raises(ExportError, match=f"incomplete export: {shard} missing"):
        load_stage_checkpoint(m, uri, S3)

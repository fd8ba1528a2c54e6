"""The real entry point end to end: Ray Train + DeepSpeed (ZeRO-2 and ZeRO-3) on 2 CPU workers,
tiny preset, fixture shards: S1 -> S2 -> S3 chained by exports, losses fall, MLflow gets the
numbers, a worker failure resumes without skipping or repeating samples, exports reload exactly."""

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import convert_fixtures

from xsam.pipelines.train import run
from xsam.tracking import metric_name
from xsam.train.config import load_profile, profile_path

pytestmark = pytest.mark.integration
FORMATS = ["coco_panoptic", "llava", "refer", "gcg_grandf", "coco_vgd"]
# Planted in the environment before Ray starts (the raylet and every worker inherit them), and a
# password in one run's tracking URI: neither may reach Ray's session logs, MLflow or an export.
FAKE_KEY_ID, FAKE_SECRET, FAKE_PASSWORD = "AKIAXSAMFAKEKEY00001", "xsamFakeSecretKey0123456789", "xsamFakePw42"
S3_MIX = ["fixture_llava_mix665k/train", "fixture_coco_panoptic/train", "fixture_refcoco/train",
          "fixture_gcg_grandf/train", "fixture_coco_vgd/train"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    tmp = tmp_path_factory.mktemp("train")
    _, shards, outcomes = convert_fixtures(tmp, FORMATS)
    assert all(o.status == "converted" for o in outcomes)
    from xsam.model.tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(tmp / "tokenizer")
    planted = {"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET}
    before = {k: os.environ.get(k) for k in planted}
    os.environ.update(planted)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield tmp, shards
    ray.shutdown()
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(env, stage, zero, name, **over):
    tmp, shards = env
    items = [f"shards={shards}", f"output={tmp / 'runs'}", f"zero_stage={zero}", f"run_name={name}",
             f"mlflow_uri=sqlite:///{tmp / 'mlflow.db'}", "mlflow_experiment=test", "checkpoint_every=2",
             f"weights={{tokenizer: {tmp / 'tokenizer'}}}"]
    items += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in over.items()]
    return load_profile(profile_path("local"), stage, items)


def _history(cfg, key="loss/total"):
    client = MlflowClient(cfg.mlflow_uri)
    return [m.value for m in sorted(client.get_metric_history(cfg.mlflow_run_id, key), key=lambda m: m.step)]


def test_three_stages_chain_and_learn_in_bf16(env):
    """bf16 end to end, as every GPU profile runs: DeepSpeed casts the parameters, the model casts the
    images at its boundary, targets stay bool until the loss, losses are fp32. The chain runs under ZeRO-2,
    then S3 again under ZeRO-3 (partitioned parameters: the stage that trains the LLM in the paper profile)
    from the same S1 / S2 exports. The fp32 path runs in the resume test below and in the workflow tests."""
    tmp, _ = env
    runs = tmp / "runs"
    _chain(env, runs, 2)
    _s3_learns(env, runs, 3, init_from=[str(runs / "z2-s1" / "export"), str(runs / "z2-s2" / "export")])


def _chain(env, runs, zero):
    s1 = _cfg(env, "s1", zero, f"z{zero}-s1", lr=1e-3, grad_clip=1.0, epochs=6, schedule="cosine", bf16=True)
    run(s1)
    losses = _history(s1)
    assert len(losses) == 18 and all(map(math.isfinite, losses)), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    s2 = _cfg(env, "s2", zero, f"z{zero}-s2", epochs=4, init_from=[str(runs / f"z{zero}-s1" / "export")], bf16=True)
    run(s2)
    assert _history(s2, "loss/lm")[-1] < _history(s2, "loss/lm")[0]
    _s3_learns(env, runs, zero, init_from=[str(runs / f"z{zero}-s1" / "export"), str(runs / f"z{zero}-s2" / "export")])


def _s3_learns(env, runs, zero, init_from):
    tmp = env[0]
    s3 = _cfg(env, "s3", zero, f"z{zero}-s3", datasets=S3_MIX, max_steps=6, lr=1e-3, bf16=True, init_from=init_from)
    run(s3)
    s3_losses = _history(s3)
    assert len(s3_losses) == 6 and all(map(math.isfinite, s3_losses)), s3_losses
    _predict_in_bf16(runs / f"z{zero}-s3" / "export")
    _kept_checkpoints_become_candidates(runs / f"z{zero}-s3")
    manifest = json.loads((runs / f"z{zero}-s3" / "export" / "manifest.json").read_text())
    assert manifest["stage"] == "s3" and manifest["train_config"]["zero_stage"] == zero
    init = manifest["init_reports"]
    assert any(init_from[0] in k for k in init), init
    for report in init.values():  # earlier stages load by exact key: nothing unexpected, no shape mismatch
        assert "unexpected 0" in report and "mismatched 0" in report, report
        assert int(re.search(r"\bmatched (\d+)", report).group(1)) > 0, report

    client = MlflowClient(s3.mlflow_uri)
    r = client.get_run(s3.mlflow_run_id)
    assert r.info.status == "FINISHED"
    assert r.data.tags["xsam.stage"] == "s3" and len(r.data.tags["xsam.data_fingerprint"]) == 64
    assert r.data.tags["xsam.code_version"] and r.data.params["seed"] == "1024"
    metrics = set(r.data.metrics)
    assert {"loss/total", "loss/lm", "lr", "samples_per_s", "tokens_per_s"} <= metrics
    # ONE metric-name rule (xsam.tracking.metric_name: lowercase, "/" groups) for every name training logs
    assert all(metric_name(k) == k and k == k.lower() and "." not in k for k in metrics), sorted(metrics)
    assert r.data.tags["xsam.kind"] == "training"
    # the experiment opens on runs in the UI; its artifacts live beside the sqlite store, not in ./mlruns
    exp = client.get_experiment(r.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp / "mlartifacts" / "test").as_uri()
    seen = {k for k in metrics if k.startswith("seen/")}
    assert len(seen) >= 2  # per-source sample counts; batches come from one source at a time
    # the balanced mixture per source (xsam.train.mixture): records after expansion, repeat, share of draws
    names = {d.split("/", 1)[0] for d in S3_MIX}
    assert {k.split(".")[1] for k in r.data.params if k.startswith("mix.")} == names
    assert sum(float(r.data.params[f"mix.{d}.share"]) for d in names) == pytest.approx(100, abs=0.05)
    assert int(r.data.params["mix.fixture_refcoco.records"]) > int(r.data.params["mix.fixture_refcoco.samples"])
    assert all(float(r.data.params[f"mix.{d}.repeat"]) >= 1 for d in names)


def _predict_in_bf16(export):
    """The bf16 S3 export reloads and predicts in bf16 through the public API."""
    import numpy as np

    from xsam.model.predict import load_for_inference, predict

    model, tok = load_for_inference(export)
    model = model.to(torch.bfloat16)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    for task, prompt in (("semantic", "cat, dog"), ("referring", "the cat on the left")):
        pred = predict(model, tok, image, task, prompt)
        assert all(np.asarray(m).shape == (48, 64) for m in pred.masks), task
        assert all(math.isfinite(s) for s in pred.scores), task


def _kept_checkpoints_become_candidates(run_dir):
    """Every kept checkpoint but the final one is exported on demand (xsam.train.candidates): the
    consolidated DeepSpeed weights in the run's dtype, loadable for prediction; a rerun reuses it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from xsam.model.export import load_export
    from xsam.train.candidates import candidates, kept_checkpoints

    kept = kept_checkpoints(str(run_dir))
    assert [step for step, _ in kept] == [4, 6]  # checkpoint_every=2, keep_checkpoints=2, 6 steps
    found = candidates(str(run_dir), str(run_dir / "export"), final_step=6)
    assert [(c.step, c.checkpoint) for c in found] == [(4, kept[0][1]), (6, None)]
    state, manifest = load_export(found[0].export)
    assert manifest["stage"] == "s3" and manifest["candidate"]["step"] == 4
    zero_state = get_fp32_state_dict_from_zero_checkpoint(kept[0][1], tag="ds")
    final, _ = load_export(found[1].export)
    assert set(state) == set(final)
    assert all(torch.equal(v, zero_state[k].to(torch.bfloat16)) for k, v in state.items())
    assert any(not torch.equal(v, final[k]) for k, v in state.items())  # step 4 is not the final weights
    _predict_in_bf16(found[0].export)
    stamp = (Path(found[0].export) / "manifest.json").stat().st_mtime_ns
    assert candidates(str(run_dir), str(run_dir / "export"), final_step=6) == found
    assert (Path(found[0].export) / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_exported_checkpoint_equals_the_deepspeed_checkpoint(env):
    """The consolidated export (ZeRO-3 gather of a bf16 run) holds exactly the weights of the last
    DeepSpeed checkpoint (its fp32 master weights, consolidated offline by DeepSpeed's zero_to_fp32)
    rounded to the training dtype, so it reloads to identical outputs."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from xsam.model.export import load_export

    tmp, _ = env
    folder = tmp / "runs" / "z3-s1"
    if not (folder / "export").exists():
        run(_cfg(env, "s1", 3, "z3-s1", epochs=1, bf16=True))
    checkpoints = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    zero_state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints[-1]), tag="ds")
    export, manifest = load_export(folder / "export")  # Hugging Face layout, checked complete
    names = {p.name for p in (folder / "export").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors"} <= names
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert export and set(export) <= set(zero_state)
    assert {v.dtype for v in export.values()} == {torch.bfloat16}  # what the bf16 run computed with
    for key, value in export.items():
        assert torch.equal(value, zero_state[key].to(value.dtype)), key

    from xsam.model.builder import build_model
    from xsam.model.checkpoint import load_stage_checkpoint, read_manifest
    from xsam.model.config import XSAMConfig
    from xsam.model.stages import S1

    cfg = XSAMConfig.from_dict(read_manifest(folder / "export")["config"])
    a, b = build_model(cfg, S1.parts), build_model(cfg, S1.parts)
    load_stage_checkpoint(a, folder / "export", S1)
    b.load_state_dict({**b.state_dict(), **{k: v.to(torch.bfloat16).float() for k, v in zero_state.items()
                                            if k in b.state_dict()}})
    x = torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size)
    with torch.no_grad():
        fa = a.segmentor.features(a.sam.features(x))[0]
        fb = b.segmentor.features(b.sam.features(x))[0]
    assert torch.equal(fa, fb)


def test_worker_failure_resumes_exactly(env, mlflow_server):
    """A worker dies after the step-4 checkpoint; the group restarts from it. The resumed run trains
    every scheduled sample once (no skip, no repeat) and, because the checkpoint carries every RNG state
    a step draws from, ends with weights BIT-IDENTICAL to a run that never failed (fp32, ZeRO-2)."""
    from xsam.model.export import load_export
    from xsam.train.sampling import Schedule
    from xsam.train.shard_index import ShardIndex

    tmp, shards = env
    trace = tmp / "trace"
    cfg = _cfg(env, "s1", 2, "fail-s1", epochs=3, fail_at_step=4, trace=str(trace))
    result = run(cfg)
    assert result.metrics["step"] == 9
    # this run logs to the tracking server through a URI with a password (the server takes no auth:
    # MLflow's client sends it as basic auth and the server ignores it)
    secret_uri = mlflow_server.replace("http://", f"http://xsam:{FAKE_PASSWORD}@")
    nofail = _cfg(env, "s1", 2, "nofail-s1", epochs=3, mlflow_uri=secret_uri)
    run(nofail)
    _no_secret_anywhere(tmp, nofail, mlflow_server)
    resumed, _ = load_export(tmp / "runs" / "fail-s1" / "export")
    straight, _ = load_export(tmp / "runs" / "nofail-s1" / "export")
    assert resumed.keys() == straight.keys()
    differ = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
    assert not differ, differ

    # the last occurrence of each (rank, step) is what the finished run trained on
    done: dict[tuple[int, int], list[str]] = {}
    lines = {}
    for rank in (0, 1):
        rows = [json.loads(line) for line in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
        lines[rank] = rows
        for row in rows:
            done[(rank, row["step"])] = row["keys"]
    assert any(r["step"] == 4 for r in lines[0]) and [r["step"] for r in lines[1]].count(4) == 1
    assert len([r for r in lines[0] if r["step"] == 3]) >= 1

    index = ShardIndex.build(shards, [("fixture_coco_panoptic", "train")])
    schedule = Schedule(index.counts(), t=cfg.balance_t, batch_per_rank=1, world_size=2, seed=cfg.seed)
    refs = index.refs["fixture_coco_panoptic"]
    expected = {}
    step = 0
    for epoch in range(3):
        for gb in schedule.epoch(epoch):
            for rank in (0, 1):
                expected[(rank, step)] = [refs[i].key for i in gb.indices[rank:rank + 1]]
            step += 1
    assert done == expected


def _no_secret_anywhere(tmp, cfg, server_uri):
    """The planted AWS keys and the tracking URI's password are in no file of this Ray's session
    (runtime_env_agent.log, the workers' logs), no MLflow param or tag of the run, and no file of the
    run's folder (checkpoints, export manifest)."""
    import ray

    secrets = (FAKE_KEY_ID.encode(), FAKE_SECRET.encode(), FAKE_PASSWORD.encode())
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and "sockets" not in p.parts]
    agent = [p for p in logs if p.name.startswith("runtime_env_agent")]
    # the check can fail: the runtime environment's env vars are written to this log in clear
    assert agent and any(b"HF_HUB_OFFLINE" in p.read_bytes() for p in agent), [p.name for p in agent]
    leaked = [str(p) for p in logs if any(s in p.read_bytes() for s in secrets)]
    assert not leaked, leaked
    r = MlflowClient(server_uri).get_run(cfg.mlflow_run_id)
    assert r.data.params["mlflow_uri"] == server_uri.replace("http://", "http://***@")  # masked, still useful
    values = [*r.data.params.values(), *r.data.tags.values()]
    assert not [v for v in values if any(s.decode() in v for s in secrets)]
    folder = tmp / "runs" / cfg.name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert (folder / "export" / "manifest.json") in files
    leaked = [str(p) for p in files if any(s in p.read_bytes() for s in secrets)]
    assert not leaked, leaked
    manifest = json.loads((folder / "export" / "manifest.json").read_text())
    assert manifest["train_config"]["mlflow_uri"] == server_uri.replace("http://", "http://***@")

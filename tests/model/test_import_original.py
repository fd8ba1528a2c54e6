"""Importing checkpoints in the original X-SAM's key names (xsam.model.import_original, key table in
xsam.model.original_keys).

The "original" checkpoints here are made from tiny project models by the key table applied INVERSELY
(`to_original_state`), never from the authors' code. Covered: the table is a bijection on the tiny and
(meta device, names only) paper models; a round trip gives identical tensors and identical forward
outputs; vocabulary rows move by token; the pixel-shuffle channel-group permutation is checked
numerically against the original's order written from its definition; wrong shape / unknown key /
missing key each fail naming the key; wrappers and bf16; --partial; the command line, once.
"""

import json
import subprocess
import sys

import pytest
import torch
from model_fixtures import generic_example

from xsam.model import original_keys as ok
from xsam.model.batching import collate
from xsam.model.builder import build_model
from xsam.model.checkpoint import load_stage_checkpoint
from xsam.model.config import paper, tiny, with_overrides
from xsam.model.connector import SegConnector
from xsam.model.import_original import (
    REPORT,
    ImportCheckError,
    import_state,
    parse_config,
    read_checkpoint,
    to_original_state,
    wanted_shapes,
)
from xsam.model.pixel_shuffle import pixel_shuffle
from xsam.model.stages import S1, S3, apply_policy
from xsam.model.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer
from xsam.model.xsam import DecodeMode

OVERRIDES = {"decoder": {"num_queries": 6}}  # passed as --config: the import must use it
NECK = {"segmentor.encoder.neck.conv1.weight": (4, 32, 1, 1), "segmentor.encoder.neck.layer_norm1.weight": (4,),
        "segmentor.encoder.neck.layer_norm1.bias": (4,), "segmentor.encoder.neck.conv2.weight": (4, 4, 3, 3),
        "segmentor.encoder.neck.layer_norm2.weight": (4,), "segmentor.encoder.neck.layer_norm2.bias": (4,),
        "segmentor.shared_image_embedding.positional_embedding": (2, 16)}


def _add_tokens(tok, tokens):
    try:  # transformers 5
        tok.add_special_tokens({"extra_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    except TypeError:  # transformers 4
        tok.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_additional_special_tokens=False)


def _tokenizer(folder, tokens):
    """The tiny tokenizer with `tokens` added in this order (the X-SAM tokens in an order other than the
    original's, so that rows must move)."""
    tok = build_tiny_tokenizer(folder, with_special_tokens=False)
    _add_tokens(tok, tokens)
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    _tokenizer(folder, ("</p>", "<SEG>", "<p>"))
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    from xsam.model.import_original import load_tokenizer

    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def cfg():
    return with_overrides(tiny(), OVERRIDES)


@pytest.fixture(scope="module")
def model(cfg, tok):
    torch.manual_seed(0)
    m = build_model(cfg, S3.parts, len(tok))
    with torch.no_grad():  # no parameter left at a symmetric init (LayerNorm 1/0, zero biases)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.special_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    apply_policy(m, S3, unused=m.unused_prefixes())
    return m.eval()


@pytest.fixture(scope="module")
def original(model, tok):
    """An S3 checkpoint in the original's names: the project state (no S1 head) mapped inversely, plus
    the keys the import drops on purpose."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("segmentor.s1_head.")}
    out = to_original_state(state, tok)
    out.update({k: torch.randn(s) for k, s in NECK.items()})
    return out


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(ImportCheckError) as e:
        fn(*args, **kwargs)
    return str(e.value)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _forward(m, cfg, tok):
    torch.manual_seed(0)
    batch = collate([generic_example(0)], DecodeMode.per_sample, tok, cfg)
    with torch.no_grad():
        losses, outputs = m(batch)
    return list(_tensors(losses)) + list(_tensors(outputs))


# --------------------------------------------------------------------------- the table
def test_table_maps_every_tiny_key_both_ways(model):
    keys = list(model.state_dict())
    originals = []
    for key in keys:
        names, _ = ok.to_original(key)
        for name in names:
            assert ok.to_project(name).project == key
        originals += names
    assert len(set(originals)) == len(originals)
    assert not any(ok.is_dropped(k) for k in originals)
    assert all(ok.is_dropped(k) for k in NECK)


def test_paper_key_counts_on_the_meta_device():
    """The fidelity review: 1,349 of 1,356 original keys map onto 1,313 of 1,315 project keys (the S1
    head left); 7 dropped (SAM neck, shared_image_embedding). Names only, no weights."""
    with torch.device("meta"):
        keys = list(build_model(paper(), S3.parts, 32014).state_dict())
    originals = {k: ok.to_original(k)[0] for k in keys}
    s3 = {k: v for k, v in originals.items() if not k.startswith("segmentor.s1_head.")}
    assert len(keys) == 1315 and len(s3) == 1313
    assert sum(len(v) for v in s3.values()) + len(NECK) == 1356
    assert set(wanted_shapes(paper(), "s3", 32014)) == set(s3)


# --------------------------------------------------------------------------- round trip
def test_import_gives_identical_tensors(model, original, tok):
    result = import_state(original, model.cfg, "s3", tok)
    state = model.state_dict()
    assert set(result.state) == {k for k in state if not k.startswith("segmentor.s1_head.")}
    for key, value in result.state.items():
        assert torch.equal(value, state[key]), key
    rep = result.report
    assert sorted(rep["dropped"]) == sorted(NECK) and rep["unconsumed"] == [] and rep["unfilled"] == []
    assert len(rep["consumed"]) == len(original) - len(NECK)
    n_self = model.cfg.decoder.dec_layers - 1
    assert sorted(set(rep["transforms"].values())) == ["concat_qkv", "pixel_shuffle_groups", "vocab_rows"]
    assert list(rep["transforms"].values()).count("concat_qkv") == 2 * n_self
    assert {k for k, v in rep["transforms"].items() if v == "pixel_shuffle_groups"} == {
        "segmentor.connector.levels.0.4.weight", "segmentor.connector.levels.0.5.weight",
        "segmentor.connector.levels.0.5.bias"}
    # the X-SAM tokens sit in another order in this tokenizer than in the original: their rows move
    base = len(tok) - 3
    ids = {t: tok.convert_tokens_to_ids(t) for t in ok.ORIGINAL_ADDED_TOKENS}
    assert rep["vocab"]["moved"] == {str(ids[t]): base + k for k, t in enumerate(ok.ORIGINAL_ADDED_TOKENS)}
    assert torch.equal(original["llm.model.embed_tokens.weight"][base], state["llm.model.model.embed_tokens.weight"][
        ids["<SEG>"]])


def test_wrappers_and_bf16(model, original, tok, tmp_path):
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in original.items()}
    torch.save({"module": bf16}, tmp_path / "m.bin")
    torch.save({"state_dict": original, "epoch": 3}, tmp_path / "s.bin")
    res = import_state(read_checkpoint(tmp_path / "m.bin"), model.cfg, "s3", tok)
    state = model.state_dict()
    for key, value in res.state.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, state[key].to(torch.bfloat16)), key
    assert read_checkpoint(tmp_path / "s.bin").keys() == original.keys()


# --------------------------------------------------------------------------- pixel shuffle
def _original_order_shuffle(y):
    """Scale-2 pixel shuffle in the ORIGINAL's channel order, from its definition:
    out[b, 2i+dy, 2j+dx, c] = y[b, i, j, (2*dx + dy) * C/4 + c]."""
    b, h, w, c = y.shape
    out = y.new_empty(b, 2 * h, 2 * w, c // 4)
    for dy in range(2):
        for dx in range(2):
            g = 2 * dx + dy
            out[:, dy::2, dx::2] = y[..., g * c // 4:(g + 1) * c // 4]
    return out


def test_pixel_shuffle_permutation_numerically():
    torch.manual_seed(0)
    conn = SegConnector(8, 6)
    with torch.no_grad():
        for p in conn.parameters():
            p.copy_(torch.randn_like(p))  # LayerNorm affine too: a permutation of it must matter
    x = torch.randn(2, 3, 3, 8)
    want = conn([x, x, x])[0]  # project: level 0 with the project's order (2*dy + dx)
    level = conn.levels[0]
    orig_state = {k: (ok.pixel_shuffle_groups(v) if k in ("4.weight", "5.weight", "5.bias") else v)
                  for k, v in level.state_dict().items()}  # the same weights as the original stores them
    original_level = SegConnector(8, 6).levels[0]
    original_level.load_state_dict(orig_state)
    with torch.no_grad():
        y = original_level(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, g, g, 16]
        got = _original_order_shuffle(y).permute(0, 3, 1, 2)
        unpermuted = _original_order_shuffle(level(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(unpermuted, want, atol=1e-3)  # without the permutation: another output
    # and the two orders are exactly the permutation of the channel groups
    z = torch.randn(1, 2, 2, 12)
    assert torch.equal(_original_order_shuffle(ok.pixel_shuffle_groups(z.permute(3, 0, 1, 2)).permute(1, 2, 3, 0)),
                       pixel_shuffle(z, 2))
    w = z.permute(3, 0, 1, 2)  # channels first: the layout of a weight
    assert torch.equal(ok.pixel_shuffle_groups(ok.pixel_shuffle_groups(w)), w)  # its own inverse


# --------------------------------------------------------------------------- refusals
def test_wrong_shape_unknown_and_missing_keys_are_named(model, original, tok):
    cfg = model.cfg
    bad = dict(original)
    bad["segmentor.decoder.queries_features.weight"] = torch.zeros(5, 32)
    assert "segmentor.decoder.query_feat.weight" in _err(import_state, bad, cfg, "s3", tok)
    bad = dict(original)
    bad["segmentor.decoder.decoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 31)
    assert "self_attention_layers.0.self_attn.in_proj_weight" in _err(import_state, bad, cfg, "s3", tok)
    bad = dict(original, **{"vision_sampler.dim_projector.weight": torch.zeros(2, 2)})
    assert "vision_sampler.dim_projector.weight" in _err(import_state, bad, cfg, "s3", tok)
    bad = {k: v for k, v in original.items() if k != "bg_embeds.weight"}
    msg = _err(import_state, bad, cfg, "s3", tok)
    assert "segmentor.background.embedding.weight" in msg and "--partial" in msg
    bad = {k: v for k, v in original.items() if k != "segmentor.decoder.decoder.layers.1.self_attn.v_proj.bias"}
    assert "layers.1.self_attn.v_proj.bias" in _err(import_state, bad, cfg, "s3", tok)
    assert "--tokenizer" in _err(import_state, original, cfg, "s3", None)


def test_partial_exports_only_filled_keys(model, original, tok):
    s2 = {k: v for k, v in original.items() if k.startswith(("visual_projector.", "seg_projector."))}
    assert "llm.model.model.embed_tokens.weight" in _err(import_state, s2, model.cfg, "s2", tok)
    res = import_state(s2, model.cfg, "s2", tok, partial=True)
    assert set(res.state) == set(res.report["filled"]) and len(res.state) == 8
    assert res.report["unfilled"] == ["llm.model.lm_head.weight", "llm.model.model.embed_tokens.weight"]


def test_project_tokens_the_original_lacks(model, original, tmp_path):
    """A project tokenizer with one more token (<region> before the X-SAM tokens): its row has no
    original row - an error naming it; with --partial the mean row, listed in the report."""
    from xsam.model.import_original import load_tokenizer

    _tokenizer(tmp_path, ("<region>", "<SEG>", "<p>", "</p>"))
    tok2 = load_tokenizer(tmp_path)
    assert "<region>" in _err(import_state, original, model.cfg, "s3", tok2)
    res = import_state(original, model.cfg, "s3", tok2, partial=True)
    assert res.report["vocab"]["missing_tokens"] == ["<region>"] and res.report["unfilled"] == []
    emb = res.state["llm.model.model.embed_tokens.weight"]
    src = original["llm.model.embed_tokens.weight"]
    assert torch.allclose(emb[tok2.convert_tokens_to_ids("<region>")], src.mean(0))
    assert torch.equal(emb[tok2.convert_tokens_to_ids("<SEG>")], src[len(src) - 3])
    assert _err(import_state, {"llm.model.embed_tokens.weight": torch.zeros(len(tok2) + 5, 64)}, model.cfg, "s3", tok2,
                partial=True).count("no project token takes")  # a different base vocabulary: always refused


def test_s1_keeps_the_linear_head(model, cfg, tmp_path):
    from xsam.model.export import write_export

    torch.manual_seed(1)
    s1 = build_model(cfg, S1.parts).eval()
    original = to_original_state({k: v for k, v in s1.state_dict().items()
                                  if not k.startswith(("segmentor.cosine_head.", "segmentor.background."))})
    assert "segmentor.class_predictor.weight" in original
    res = import_state(original, cfg, "s1")
    assert {"segmentor.s1_head.linear.weight", "segmentor.s1_head.linear.bias"} <= set(res.state)
    write_export(tmp_path / "s1", res.state, cfg, "s1")
    fresh = build_model(cfg, S1.parts).eval()
    assert load_stage_checkpoint(fresh, tmp_path / "s1", S1).missing == [
        "segmentor.cosine_head.logit_scale", "segmentor.background.embedding.weight"]
    pixels = torch.randn(1, 3, cfg.sam.image_size, cfg.sam.image_size)
    with torch.no_grad():
        outs = [m.segmentor.decode(*m.segmentor.features(m.sam.features(pixels)), m.segmentor.s1_head, None)
                for m in (s1, fresh)]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(outs[0]), _tensors(outs[1])))


# --------------------------------------------------------------------------- command line
def test_command_line_export_loads_with_identical_outputs(model, original, cfg, tok, tok_dir, tmp_path):
    from xsam.model.predict import load_for_inference

    (tmp_path / "cfg.json").write_text(json.dumps(OVERRIDES))
    assert parse_config("@" + str(tmp_path / "cfg.json")) == parse_config(json.dumps(OVERRIDES)) == OVERRIDES
    torch.save({"module": original}, tmp_path / "pytorch_model.bin")
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "xsam.model.import_original", "--checkpoint",
                           str(tmp_path / "pytorch_model.bin"), "--preset", "tiny", "--stage", "s3", "--config",
                           json.dumps(OVERRIDES), "--tokenizer", str(tok_dir), "--out", str(out)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / REPORT).read_text())
    assert set(report) >= {"consumed", "dropped", "unconsumed", "filled", "unfilled", "transforms"}
    assert len(report["dropped"]) == len(NECK) and not report["unconsumed"] and not report["unfilled"]
    loaded, tok2 = load_for_inference(out)
    assert loaded.cfg.decoder.num_queries == 6 and len(tok2) == len(tok)
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        if not key.startswith("segmentor.s1_head."):
            assert torch.equal(value, state[key]), key
    loaded.siglip_pad_square = model.siglip_pad_square
    before, after = _forward(model, cfg, tok), _forward(loaded, cfg, tok2)
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after))

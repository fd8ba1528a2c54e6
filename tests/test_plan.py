"""The planner's figures: FLOP formulas against torch's counter, the segmentor count against an
independent count of its pieces, the backward / recompute rules against what the model does, measured
activations and ZeRO states, and text lengths measured on converted shards through the formatter."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import convert_fixtures
from xsam.model import flops
from xsam.model.builder import build_model
from xsam.model.config import tiny
from xsam.model.encoders import SamEncoder, SiglipEncoder
from xsam.model.llm import XSamLLM
from xsam.model.stages import S2, apply_policy
from xsam.model.xsam import DecodeMode, Segmentor, XSAMBatch
from xsam.train import memory, planning
from xsam.train.memory import part_activations, state_bytes


# --------------------------------------------------------------------------- FLOP formulas
def test_segmentor_count_equals_an_independent_count_of_its_connector_and_deformable_sampling():
    cfg = tiny()
    g, c, m, d = cfg.sam.grid, cfg.sam.embed_dim, cfg.decoder.connector_dim, cfg.decoder.hidden_dim
    with torch.device("meta"):
        seg = Segmentor(cfg)
        levels, connector = flops.counted(seg.connector, [torch.empty(1, g, g, c) for _ in seg.blocks])
        _, pixel = flops.counted(seg.pixel_decoder, levels)
        plain = FlopCounterMode(display=False)  # torch's own table: no grid_sample formula
        with plain:
            seg.pixel_decoder(levels)
    # per level of scale s: conv1x1 c->m, conv3x3 m->m, conv1x1 m->c*s, all on the g x g grid
    assert connector == sum(2 * g * g * (c * m + 9 * m * m + m * int(c * s)) for s in (2.0, 1.0, 0.5))
    assert flops.segmentor_forward(cfg, "linear").features == connector + pixel
    # deformable attention: per layer and level, a 4-tap bilinear sample per (channel, query, point)
    queries = sum(x.shape[-2] * x.shape[-1] for x in levels)
    sampled = cfg.decoder.enc_layers * len(levels) * d * queries * cfg.decoder.enc_n_points
    assert pixel - plain.get_total_flops() == 8 * sampled


def test_segmentor_cosine_head_count_is_affine_in_the_classes():
    cfg = tiny()
    counted = {k: flops._segmentor_forward(json.dumps(cfg.to_dict(), sort_keys=True), "cosine", k)
               for k in (1, 2, 7)}
    assert flops.segmentor_forward(cfg, "cosine", 7) == counted[7]
    assert counted[7].decode > counted[1].decode


@pytest.mark.parametrize("window", [4, 3])  # 3 does not divide the 8x8 grid: windows on the padded grid
def test_sam_formula_equals_the_counter(window):
    sam_cfg = dataclasses.replace(tiny().sam, window_size=window)
    with torch.device("meta"):
        _, counted = flops.counted(SamEncoder(sam_cfg), torch.empty(1, 3, sam_cfg.image_size, sam_cfg.image_size))
    assert flops.sam_forward(sam_cfg).total == counted


def test_siglip_and_llm_formulas_equal_the_counter():
    cfg = tiny()
    with torch.device("meta"):
        _, counted = flops.counted(SiglipEncoder(cfg.siglip), torch.empty(1, 3, 56, 56))
    assert sum(flops.siglip_forward(cfg.siglip)) == counted
    llm = XSamLLM(cfg.llm, cfg.llm.vocab_size)  # HF builds its masks with data-dependent ops: CPU, tiny
    for tokens in (9, 21):
        _, counted = flops.counted(llm, torch.randn(1, tokens, cfg.llm.hidden_size))
        assert sum(flops.llm_forward(cfg.llm, tokens, causal=False)) == counted  # the counter ignores causality


def test_attention_terms_grow_quadratically_with_tokens():
    cfg = tiny()
    lin1, att1 = flops.llm_forward(cfg.llm, 1000)
    lin2, att2 = flops.llm_forward(cfg.llm, 2000)
    assert lin2 == 2 * lin1
    assert att2 / att1 == pytest.approx(4 * 2001 / 2002)  # causal: 2 D T (T + 1)
    assert flops.llm_forward(cfg.llm, 1000, causal=False)[1] == pytest.approx(2 * att1 * 1000 / 1001)
    big = dataclasses.replace(cfg.sam, image_size=2 * cfg.sam.image_size)  # 4x the tokens
    assert flops.sam_forward(big).global_attention == 16 * flops.sam_forward(cfg.sam).global_attention
    sig = dataclasses.replace(cfg.siglip, image_size=2 * cfg.siglip.image_size)
    assert flops.siglip_forward(sig)[1] == 16 * flops.siglip_forward(cfg.siglip)[1]


# --------------------------------------------------------------------------- backward and recompute
def test_stage_rules_follow_the_policies():
    s1, s2, s3 = (planning.sample_flops("tiny", s, activation_checkpointing=True) for s in ("s1", "s2", "s3"))
    for part in ("sam", "siglip"):  # S2: frozen encoders, no graph: one forward, no backward, no recompute
        cost = s2.parts[part]
        assert (cost.backward, cost.recompute) == (0, 0) and cost.forward > 0
    llm = s2.parts["llm"]  # frozen, gradients flow through to the projectors; checkpointed
    assert llm.backward == llm.forward == llm.recompute
    assert s2.parts["image_projector"].backward == 2 * s2.parts["image_projector"].forward
    assert s3.parts["sam"].backward == 2 * s3.parts["sam"].forward == 2 * s3.parts["sam"].recompute
    assert "llm" not in s1.parts and s1.parts["sam"].recompute > 0  # S1 trains SAM
    assert s3.model == pytest.approx(3 * s3.forward)
    assert planning.train_flops_per_sample(tiny(), "s2", True) == s2.model  # a config works as well as a name


def test_s2_model_does_not_recompute_its_frozen_encoders():
    """What the rule rests on: with checkpointing on, an S2 step runs each SAM / SigLIP layer once and
    each LLM layer twice (forward + recompute)."""
    cfg = tiny()
    model = build_model(cfg, S2.parts)
    apply_policy(model, S2, model.unused_prefixes())
    model.enable_activation_checkpointing()
    model.train()
    calls = {"sam": 0, "siglip": 0, "llm": 0}
    for name, layer in (("sam", model.sam.blocks[0].mlp), ("siglip", model.siglip.model.encoder.layers[0].mlp),
                        ("llm", model.llm.model.model.layers[0].mlp)):  # inside the checkpointed layer
        layer.register_forward_pre_hook(lambda *a, n=name: calls.__setitem__(n, calls[n] + 1))
    ids = torch.tensor([1, -200, 5, 6, 7])
    batch = XSAMBatch(mode=DecodeMode.none, sam_pixels=torch.randn(1, 3, 128, 128),
                      siglip_pixels=torch.randn(1, 3, 56, 56), input_ids=[ids],
                      labels=[torch.tensor([-100, -100, 5, 6, 7])])
    losses, _ = model(batch)
    losses["total"].backward()
    assert calls == {"sam": 1, "siglip": 1, "llm": 2}


# --------------------------------------------------------------------------- memory
def test_zero_partitions_states_by_stage():
    one, z2, z3 = (state_bytes(100, 20, z, 4, reduce_bucket=10, max_live_parameters=8) for z in (1, 2, 3))
    assert z2.weights == 2 * 120 and z2.optimizer == 12 * 100 / 4 and z2.gradients == 6 * 100 / 4
    assert one.gradients == 2 * 100 + 4 * 100 / 4  # ZeRO-1 keeps full bf16 gradients
    assert z3.weights == 2 * 120 / 4 + 2 * 8 and z2.buckets == 2 * 10  # ZeRO-3: a shard + the gathered working set
    with pytest.raises(ValueError, match="zero_stage"):
        state_bytes(1, 1, 4, 1)


def test_activations_are_measured_affine_in_tokens_and_smaller_when_checkpointed():
    cfg = tiny()
    direct = memory._part(json.dumps(cfg.to_dict(), sort_keys=True), "llm", True,
                                   "cosine", 300, 1, 1)
    assert part_activations(cfg, "llm", True, tokens=300) == pytest.approx(direct)
    sam = part_activations(cfg, "sam", True)
    assert 0 < sam.checkpointed < sam.total
    assert part_activations(cfg, "llm", False, tokens=300).total < direct.total  # frozen weights keep less


def test_paper_s3_memory_table_fits_80_with_checkpointing_only():
    """The dry-run's table for the paper profile's S3 (ZeRO-2, 16 GPUs, batch 4, before conversion: the
    stated text assumptions): with checkpointing it fits 80 GiB but not comfortably 40; without, not 80."""
    from xsam.pipelines.plan import memory_table, stage_text
    from xsam.train.config import load_profile, profile_path

    cfg = load_profile(profile_path("paper"), "s3")
    text = stage_text("s3", cfg, "unused", {d: (None, "public size", None) for d in cfg.datasets}, None, None)
    states, rows = memory_table("s3", cfg, text)
    sm = planning.stage_model("paper", "s3")
    assert states.weights == 2 * (sm.trainable_params + sm.frozen_params)  # bf16, not partitioned by ZeRO-2
    with_ckpt = [r for r in rows if r.checkpointing]
    assert all(r.fit(80) == "fits" and r.fit(40) != "fits" for r in with_ckpt)
    assert all(r.fit(80) == "does not fit" for r in rows if not r.checkpointing)


# --------------------------------------------------------------------------- text lengths
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    _, out, outcomes = convert_fixtures(tmp, ["refer", "llava"], log=lambda _: None)
    assert all(o.status == "converted" for o in outcomes)
    from transformers import AutoTokenizer

    from xsam.model.tokenizer import add_special_tokens, build_tiny_tokenizer

    build_tiny_tokenizer(tmp / "tok")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tok"))
    add_special_tokens(tokenizer)
    return out, tokenizer


def test_text_lengths_are_measured_through_the_formatter(shards):
    from xsam.train.text_stats import measure_text

    out, tokenizer = shards
    cfg = tiny()
    refer = measure_text(out, "fixture_refcoco", "train", "s3", tokenizer, cfg, n=50, seed=3)
    assert refer.measured and refer == measure_text(out, "fixture_refcoco", "train", "s3", tokenizer, cfg, 50, 3)
    assert refer.items >= 1 and refer.items == refer.conditions  # one <p> phrase per <SEG> decoder item
    assert min(refer.lengths) > refer.labelled > 0
    chat = measure_text(out, "fixture_llava_pretrain", "train", "s2", tokenizer, cfg, n=50)
    assert chat.items == 0 and chat.labelled > 0
    few = measure_text(out, "fixture_refcoco", "train", "s3", tokenizer, cfg, n=2, seed=3)
    assert few.basis.startswith("measured: 2 samples")
    # the plan uses them when the shards and the tokenizer are there, else the stated assumption
    from xsam.pipelines.plan import stage_text

    counts = {"fixture_refcoco/train": (5, "manifest", 1), "refcocog/train": (None, "public size", None)}
    stats = stage_text("s3", type("C", (), {"preset": "tiny"})(), out, counts, tokenizer, None, n=20)
    assert stats["fixture_refcoco/train"].measured
    assert stats["refcocog/train"].basis.startswith("assumed") and "not converted" in stats["refcocog/train"].basis
    flop = planning.sample_flops("tiny", "s3", text=stats["fixture_refcoco/train"])
    assert "mask_decoder" in flop.parts and flop.model > 0
    assert planning.train_flops_per_sample(tiny(), "s3", text=stats["fixture_refcoco/train"]) == flop.model


# --------------------------------------------------------------------------- the mixture
MIX_LINE = re.compile(r"^    (\S+)\s+([\d,]+) samples\s+([\d,]+) records \(x[\d.]+\) repeat x([\d.]+)\s.*share ([\d.]+)%$")


def test_paper_s3_mixture_lines_before_conversion(tmp_path, capsys):
    """The dry-run's mixture for the paper profile's S3 from the public sizes: one line per source that
    starts with its name and ends with its share; the shares sum to 100; RefCOCO/+/g together come near
    the original X-SAM's 23.7% (with the stated records estimate: 23.2%)."""
    from xsam.pipelines.plan import ORIGINAL_REFERRING_SHARE, PUBLIC_RECORDS, print_mixture, sources, stage_mixture
    from xsam.train.config import load_profile, profile_path

    cfg = load_profile(profile_path("paper"), "s3")
    srcs = sources(str(tmp_path), cfg.datasets)  # nothing converted there
    print_mixture(srcs, stage_mixture(srcs, cfg.balance_t))
    lines = capsys.readouterr().out.splitlines()
    parsed = {m.group(1): m.groups()[1:] for m in map(MIX_LINE.match, lines) if m}
    assert list(parsed) == cfg.datasets  # one line per source, in the profile's order
    assert sum(float(share) for *_, share in parsed.values()) == pytest.approx(100, abs=0.1 * len(parsed))
    for name, (samples, records, repeat, _) in parsed.items():
        expected = PUBLIC_RECORDS.get(name, int(samples.replace(",", "")))
        assert int(records.replace(",", "")) == expected and float(repeat) >= 1
    (total,) = [ln for ln in lines if ln.startswith("    referring RefCOCO/+/g")]
    refer = float(re.search(r": ([\d.]+)% of the draws", total).group(1))
    assert refer == pytest.approx(sum(float(parsed[n][-1]) for n in PUBLIC_RECORDS), abs=0.15)
    assert abs(refer - ORIGINAL_REFERRING_SHARE) <= 3.0, refer


def test_mixture_records_come_from_the_manifests(shards, tmp_path):
    """A converted split's records are its manifest's num_records; one converted before they were counted
    falls back to its samples and says so; an unconverted one takes the public estimate."""
    from xsam.pipelines.plan import PUBLIC_RECORDS, sources
    from xsam.data.shards import read_manifest

    out, _ = shards
    got = sources(out, ["fixture_refcoco/train", "refcocog/train"])
    m = read_manifest(f"{out}/_meta/fixture_refcoco/train/manifest.json")
    assert got["fixture_refcoco/train"].records == m.num_records > m.num_samples
    assert got["fixture_refcoco/train"].records_basis == "manifest"
    assert got["refcocog/train"].records == PUBLIC_RECORDS["refcocog/train"]
    old = tmp_path / "_meta" / "fixture_refcoco" / "train"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(m.model_copy(update={"num_records": None}).model_dump_json())
    before = sources(str(tmp_path), ["fixture_refcoco/train"])["fixture_refcoco/train"]
    assert before.records == m.num_samples and "not in the manifest" in before.records_basis

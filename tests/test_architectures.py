"""The architecture matrix: every verified family, experts split between tiers, equals Hugging Face."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.model.families import VERIFIED
from tests.conftest import VOCAB, hf_greedy, tiny_config

FAMILIES = sorted(VERIFIED)


def test_every_verified_family_has_a_fixture():
    assert all(tiny_config(f) is not None for f in FAMILIES)


def test_readme_lists_the_registry():
    from pathlib import Path

    from fiddlerc.model.families import supported_text

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- architectures:begin -->\n")[1].split("\n<!-- architectures:end -->")[0]
    assert block == supported_text()


@pytest.fixture(scope="module")
def split_model(model_dirs, hf_model, tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            src = model_dirs(family)
            out = tmp_path_factory.mktemp(family)
            art = fiddlerc.compile(src, out, gpu_memory="1GiB", context=64, fast_experts=0)
            per_layer = art.plan.moe_layers[0].num_experts
            n_fast = len(art.plan.moe_layers) * (per_layer // 2)  # round-robin: half of every layer
            fiddlerc.compile(src, out, gpu_memory="1GiB", context=64, fast_experts=n_fast)
            cache[family] = (hf_model(src), fiddlerc.load(out, device="cpu"))
        return cache[family]

    yield get
    for _, model in cache.values():
        model.close()


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_tokens_and_both_tiers(family, split_model):
    ref, model = split_model(family)
    ids, mask = _prompts()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    got = model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = model.routing_stats()
    for layer, s in stats["layers"].items():  # both tiers received tokens in every MoE layer
        assert s["fast"] > 0 and s["cpu"] > 0, (layer, s)
    want_ids = hf_greedy(ref, ids, mask, 8)
    got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=8, ignore_eos=True)
    assert torch.equal(got_ids, want_ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_perturbing_one_cpu_expert_changes_logits(family, split_model):
    _, model = split_model(family)
    ids, _ = _prompts()
    before = model(ids)
    stats = model.routing_stats()["layers"]
    layer = max(stats)
    placed = next(p for p in model.placed_experts if p.layer == layer)
    counts = stats[layer]["per_expert"]
    busiest = max((e for e in range(len(counts)) if placed.on_cpu[e]), key=lambda e: counts[e])
    assert counts[busiest] > 0
    w = placed.weights[busiest].w_out
    saved = w.clone()
    try:
        w.add_(torch.randn_like(w) * w.abs().mean() * 20)
        after = model(ids)
    finally:
        w.copy_(saved)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(model(ids), before, rtol=0, atol=0)  # restored exactly


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_bfloat16_matches_hugging_face_bfloat16(family, model_dirs, tmp_path):
    """Teacher-forced logits against HF in bf16 with per-expert (eager) arithmetic, within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    src = model_dirs(family)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, experts_implementation="eager").eval()
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0, dtype="bfloat16")
    fiddlerc.compile(
        src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=len(art.plan.experts) // 2, dtype="bfloat16"
    )
    ids, _ = _prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        got = model(ids)
        want = ref(input_ids=ids).logits
    assert got.dtype == want.dtype == torch.bfloat16
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= 0.02 * scale

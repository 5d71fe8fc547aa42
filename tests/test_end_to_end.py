"""The backbone: compiled models equal Hugging Face, logits and greedy tokens, at several placements."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.errors import OptionError
from tests.conftest import ARCHS, VOCAB, hf_greedy

SPLITS = ["none", "half", "all"]  # experts on the GPU tier


def _fast_experts(split: str, total: int) -> int:
    return {"none": 0, "half": total // 2, "all": total}[split]


@pytest.fixture(scope="module")
def compiled(model_dirs, tmp_path_factory):
    cache = {}

    def get(arch: str, split: str):
        if (arch, split) not in cache:
            src = model_dirs(arch)
            out = tmp_path_factory.mktemp(f"{arch}-{split}")
            probe = fiddlerc.compile(src, out, gpu_memory="1GiB", context=64)
            total = len(probe.plan.experts)
            fiddlerc.compile(src, out, gpu_memory="1GiB", context=64, fast_experts=_fast_experts(split, total))
            cache[(arch, split)] = (src, fiddlerc.load(out, device="cpu"))
        return cache[(arch, split)]

    yield get
    for _, model in cache.values():
        model.close()


def _prompts(batch: int, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding on the second row
        ids[1, :3] = 0
        mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_hugging_face(arch, split, compiled, hf_model):
    src, model = compiled(arch, split)
    ref = hf_model(src)
    ids, mask = _prompts(2)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        want_masked = ref(input_ids=ids, attention_mask=mask).logits
    got = model(ids)
    got_masked = model(ids, attention_mask=mask)
    assert got.shape == want.shape == (2, ids.shape[1], VOCAB)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_masked[1, 3:], want_masked[1, 3:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_hugging_face(arch, split, batch, compiled, hf_model):
    src, model = compiled(arch, split)
    ref = hf_model(src)
    ids, mask = _prompts(batch, seed=batch)
    want = hf_greedy(ref, ids, mask, 16)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, ignore_eos=True)
    assert got.shape == (batch, ids.shape[1] + 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ARCHS)
def test_split_placement_uses_both_tiers(arch, compiled):
    _, model = compiled(arch, "half")
    devices = {e.device for e in model.plan.experts}
    assert devices == {"cpu", "cuda:0"}
    ids, _ = _prompts(2, length=16)
    model(ids)
    stats = model.routing_stats()
    assert stats["fast"] > 0 and stats["cpu"] > 0
    assert 0 < stats["hit_rate"] < 1
    moe_layers = {ml.layer for ml in model.plan.moe_layers}
    assert set(stats["layers"]) == moe_layers


def test_no_fast_experts_routes_everything_to_cpu(compiled):
    _, model = compiled("mixtral", "none")
    before = model.routing_stats()
    ids, _ = _prompts(1)
    model(ids)
    after = model.routing_stats()
    assert after["fast"] == before["fast"]
    assert after["cpu"] - before["cpu"] == ids.numel() * 2 * 2  # tokens x top-2 x 2 MoE layers


def test_perturbed_cpu_expert_changes_logits(model_dirs, hf_model, tmp_path):
    """Negative control: the CPU-tier experts really are used (a random perturbation shows up)."""
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=0)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        ids, _ = _prompts(1, length=12)
        before, before_one = model(ids), model(ids[:, :1])  # a prompt; one token (one grouped call a layer)
        placed = next(p for p in model.placed_experts if p.layer == 1)
        for w in placed.weights:
            t = getattr(w.w_out, "weight", w.w_out)  # a NativeWeight reads the tensor as bound
            t.add_(torch.randn_like(t) * 0.5)
        after, after_one = model(ids), model(ids[:, :1])
    assert not torch.allclose(before, after, atol=1e-3)
    assert not torch.allclose(before_one, after_one, atol=1e-3)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_fused_expert_keys_on_disk(arch, model_dirs, hf_model, tmp_path):
    """Checkpoints in transformers 5's own fused layout (experts.gate_up_proj [E, 2I, H]) load too."""
    import shutil

    from safetensors.torch import save_file

    src = model_dirs(arch)
    ref = hf_model(src)
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(src / "config.json", fused / "config.json")
    state = {
        k: v.contiguous()
        for k, v in ref.state_dict().items()
        if k != "lm_head.weight" or not ref.config.tie_word_embeddings
    }
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})
    fiddlerc.compile(fused, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=3)
    ids, _ = _prompts(2)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model, torch.no_grad():
        torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_a_cpu_only_plan_keeps_every_weight_in_host_memory_and_computes_as_hugging_face(
    arch, model_dirs, hf_model, tmp_path
):
    art = fiddlerc.compile(model_dirs(arch), tmp_path / "out", gpu_memory=0, context=64)
    t, mem = art.plan.target, art.plan.memory
    assert t.cpu_only and t.gpus() == () and t.budget_bytes == 0
    assert {e.device for e in art.plan.experts} == {"cpu"}
    assert mem.host_bytes == mem.dense_bytes + mem.kv_reserve_bytes + mem.expert_bytes["cpu"]
    assert "target: CPU only, no GPU tier (--gpu-memory 0)" in (art.path / "report.txt").read_text()
    ref = hf_model(model_dirs(arch))
    ids, mask = _prompts(2)
    with fiddlerc.load(art.path) as model:  # no device: a CPU-only plan loads on the CPU, CUDA or not
        assert model.device.type == "cpu"
        with torch.no_grad():
            torch.testing.assert_close(model(ids), ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        got = model.generate(ids[:1], max_new_tokens=8, ignore_eos=True)
        assert torch.equal(got, hf_greedy(ref, ids[:1], mask[:1], 8))
    with pytest.raises(OptionError, match="CPU-only"):
        fiddlerc.load(art.path, device="cuda:0")

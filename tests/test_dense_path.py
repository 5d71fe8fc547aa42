"""The generated dense path (attention with a static KV cache) and the CPU kernel choice, against Hugging Face."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import fiddlerc
from fiddlerc.compiler.report import report_text
from fiddlerc.errors import OptionError
from fiddlerc.model.folder import open_model_folder
from fiddlerc.model.weights import WeightReader
from fiddlerc.runtime import kernels
from tests.conftest import VOCAB, hf_greedy

GENERATED_FAMILIES = ["mixtral", "qwen2_moe", "phimoe", "granitemoe", "ernie4_5_moe"]


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding: the mask path of the generated attention
    return ids, mask


@pytest.mark.parametrize("family", GENERATED_FAMILIES)
def test_generated_attention_equals_hugging_face(family, model_dirs, hf_model, tmp_path):
    src = model_dirs(family)
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    assert art.plan.attention and {a.path for a in art.plan.attention} == {"generated"}
    text = (tmp_path / "out" / "module.py").read_text()
    assert "def attention(self, layer" in text and "= self.attention(0," in text
    assert "= self.causal_mask(" in text and "create_causal_mask(" not in text  # no mask built at decode
    ref = hf_model(src)
    ids, mask = _prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as model:
        assert type(model.new_cache()).__name__ == "StaticCache"
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=6, ignore_eos=True)
        assert torch.equal(got_ids, hf_greedy(ref, ids, mask, 6))


def test_standard_rotary_is_inlined_and_any_other_is_called():
    from transformers.models.ernie4_5_moe import modeling_ernie4_5_moe
    from transformers.models.mixtral import modeling_mixtral

    from fiddlerc.compiler.attention import rotary_is_standard

    def rotary(dim: int) -> torch.nn.Module:
        m = torch.nn.Module()
        m.register_buffer("inv_freq", torch.ones(dim // 2), persistent=False)
        return m

    standard = modeling_mixtral.apply_rotary_pos_emb
    assert rotary_is_standard(standard, rotary(64), 64)
    assert not rotary_is_standard(standard, rotary(32), 64)  # partial rotary: tables span half the head
    assert not rotary_is_standard(modeling_ernie4_5_moe.apply_rotary_pos_emb, rotary(64), 64)  # interleaved

    def upcast(q, k, cos, sin):  # the standard formula in fp32: equal in fp32 only
        return tuple(x.to(q.dtype) for x in standard(q.float(), k.float(), cos.float(), sin.float()))

    assert not rotary_is_standard(upcast, rotary(64), 64)


@pytest.mark.parametrize("family,inlined", [("mixtral", True), ("ernie4_5_moe", False)])
def test_module_rotates_in_its_own_code_only_for_the_standard_rotary(family, inlined, model_dirs, tmp_path):
    fiddlerc.compile(model_dirs(family), tmp_path / "out", gpu_memory="1GiB", context=64)
    text = (tmp_path / "out" / "module.py").read_text()
    assert ("qk = qk * cos[:, :, None]" in text) == inlined
    assert ("apply_rotary_pos_emb(q, k, cos, sin)" in text) != inlined


def test_attention_kinds_not_generated_stay_hugging_face_and_say_why(model_dirs, tmp_path):
    art = fiddlerc.compile(model_dirs("qwen3_moe"), tmp_path / "out", gpu_memory="1GiB", context=64)
    assert {a.path for a in art.plan.attention} == {"hf"}
    assert all("not a kind fiddlerc generates" in a.reason for a in art.plan.attention)
    text = (tmp_path / "out" / "module.py").read_text()
    assert "def attention(" not in text and "= self.causal_mask(" not in text  # Hugging Face's layers get its mask
    assert "Hugging Face module" in report_text(art.plan)


def test_report_names_the_path_of_every_layer(model_dirs, tmp_path):
    art = fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    n = art.plan.model.num_layers
    assert sorted(a.layer for a in art.plan.attention) == list(range(n))
    assert f"attention, layers 0-{n - 1}: generated code" in report_text(art.plan)


def test_an_edited_attention_path_is_refused(model_dirs, tmp_path):
    import json

    from fiddlerc.errors import ArtifactError, PlanError

    fiddlerc.compile(model_dirs("qwen3_moe"), tmp_path / "out", gpu_memory="1GiB", context=64)
    plan_file = tmp_path / "out" / "plan.json"
    doc = json.loads(plan_file.read_text())
    doc["attention"][0]["path"] = "generated"  # qwen3-moe normalises q/k: the generated code would be wrong
    plan_file.write_text(json.dumps(doc))
    with pytest.raises((ArtifactError, PlanError)):
        fiddlerc.load(tmp_path / "out", device="cpu")


def test_generation_past_the_static_cache_is_refused(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=16)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        with pytest.raises(OptionError, match="context"):
            model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)


# --- kernels ---------------------------------------------------------------------------------------


def test_pick_takes_the_faster_kernel_only_when_it_wins_at_decode_and_holds_at_prefill():
    ref = {1: 100.0, 8: 400.0}
    assert kernels.pick({"reference": ref, "packed": {1: 80.0, 8: 300.0}}) == "packed"
    assert kernels.pick({"reference": ref, "packed": {1: 99.0, 8: 300.0}}) == "reference"  # within noise
    assert kernels.pick({"reference": ref, "packed": {1: 80.0, 8: 500.0}}) == "reference"  # loses at prefill
    assert kernels.pick({"reference": ref}) == "reference"


needs_packing = pytest.mark.skipif(not kernels.can_pack(torch.float32), reason="this CPU cannot pack fp32 for oneDNN")


@needs_packing
def test_packed_linear_equals_f_linear_within_fp32_rounding():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    packed = kernels.pack(w)
    assert packed.is_mkldnn
    for shape in ((1, 64), (7, 64), (2, 3, 64)):
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(kernels.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert kernels.linear(x, w, b).equal(F.linear(x, w, b))  # a plain weight is the reference


@needs_packing
def test_packed_kernels_match_hugging_face_within_tolerance(model_dirs, hf_model, tmp_path):
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    ref = hf_model(src)
    ids, mask = _prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="packed") as model:
        packed = [name for name, mod in model.hf_model.named_modules() if isinstance(mod, kernels.KernelLinear)]
        assert packed, "lm_head and the dense projections are packed"
        assert all(w.is_mkldnn for p in model.placed_experts for ew in p.weights for w in ew.matrices)
        assert all(d.qkv.is_mkldnn and d.o.is_mkldnn for d in model._forward.dense.values())
        with torch.no_grad():  # teacher-forced logits, not greedy tokens: rounding differs from the reference
            want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_split_product_equals_f_linear_within_rounding(dtype):
    from fiddlerc.runtime.worker import CpuWorker

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 128, generator=g).to(dtype), torch.randn(300, generator=g).to(dtype)
    worker = CpuWorker(1)
    try:
        split = kernels.RowSplit(w, worker)
        assert split.shape == w.shape and not split.is_mkldnn
        shapes = ((1, 128), (1, 1, 128), (2, 3, 128))  # one token split; more run F.linear on the whole weight
        for x in (torch.randn(*shape, generator=g).to(dtype) for shape in shapes):
            for bias in (None, b):
                # MKL's product takes another path for the last rows of a block: equal within rounding
                torch.testing.assert_close(kernels.linear(x, split, bias), F.linear(x, w, bias))
    finally:
        worker.close()


def test_cpu_only_decode_splits_dense_products_where_experts_spread(model_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "spread_experts", lambda shape, dtype, kernel: True)
    monkeypatch.setattr(kernels, "MIN_AUTO_BYTES", 0)  # the test model's weights are small
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    ids = _prompts()[0][1:]

    def decode_logits(model) -> list[torch.Tensor]:  # teacher-forced: the prompt, then one token at a time
        cache, n = model.new_cache(), ids.shape[1]
        out = [model._run(ids, cache, None, torch.arange(n)[None])[:, -1]]
        for i, token in enumerate([5, 9, 2, 7]):
            out.append(model._run(torch.tensor([[token]]), cache, None, torch.tensor([[n + i]]))[:, -1])
        return out

    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as ref:
        want = decode_logits(ref)
    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu") as model:
        dense = model._forward.dense.values()
        assert all(type(d.qkv) is kernels.RowSplit and type(d.o) is kernels.RowSplit for d in dense)
        assert type(model.hf_model.lm_head) is kernels.KernelLinear and "row-split" in repr(model.hf_model.lm_head)
        for got, expected in zip(decode_logits(model), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unknown_kernel_mode_is_refused(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    with pytest.raises(OptionError, match="kernels='fast'"):
        fiddlerc.load(tmp_path / "out", device="cpu", kernels="fast")


def test_auto_measures_once_and_caches_the_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(kernels, "measure", lambda shape, dtype: calls.append(shape) or {"reference": {1: 1, 8: 1}})
    monkeypatch.setattr(kernels, "can_pack", lambda dtype: True)
    shape = (1024, 1024)
    assert kernels.choose(shape, torch.float32) == "reference"
    assert kernels.choose(shape, torch.float32) == "reference"
    assert calls == [shape]
    assert kernels.choose((8, 8), torch.float32) == "reference" and calls == [shape]  # too small to measure


def test_released_pages_read_back_the_same_values(model_dirs):
    folder = open_model_folder(model_dirs("mixtral"))
    reader = WeightReader(folder)
    key = max(
        folder.tensors, key=lambda k: len(folder.tensors[k].shape) and torch.Size(folder.tensors[k].shape).numel()
    )
    t = reader.get(key)
    before = t.clone()
    reader.release(t)
    assert torch.equal(t, before)
    reader.close()


def _mapping(ptr: int) -> tuple[str, int]:
    """(file name or "", AnonHugePages kB) of the mapping of this process that holds address `ptr`."""
    found, name, huge = False, "", 0
    for line in open("/proc/self/smaps").read().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            if found:
                break
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            found, name = lo <= ptr < hi, head[5] if len(head) > 5 else ""
        elif found and head[0] == "AnonHugePages:":
            huge = int(head[1])
    assert found, f"no mapping holds {ptr:#x}"
    return name, huge


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_host_copy_is_exact_and_aligned_to_huge_pages():
    from fiddlerc.runtime.host_memory import HUGE_PAGE, host_copy, huge_pages_available

    t = torch.randn(1024, 1536)  # 6 MiB: three huge pages
    c = host_copy(t)
    assert torch.equal(c, t) and c.is_contiguous() and c.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(host_copy(t, torch.bfloat16), t.to(torch.bfloat16))
    small = torch.randn(8, 8)
    s = host_copy(small)
    assert torch.equal(s, small) and s.data_ptr() != small.data_ptr()
    if huge_pages_available():
        assert _mapping(c.data_ptr())[1] > 0, "the kernel allows transparent huge pages but gave none"


def test_weights_stay_mapped_unless_binding_copies_them(model_dirs, tmp_path, monkeypatch):
    from fiddlerc.loader import bind as loader
    from fiddlerc.runtime import experts, host_memory

    copies = []

    def host_copy(t, dtype=None):
        copies.append(tuple(t.shape))
        return host_memory.host_copy(t, dtype)

    monkeypatch.setattr("fiddlerc.loader.bind.huge_pages_available", lambda: True)
    monkeypatch.setattr(loader, "host_copy", host_copy)
    monkeypatch.setattr(experts, "host_copy", host_copy)
    src = model_dirs("mixtral")  # an fp32 checkpoint
    for dtype, mapped in (("float32", True), ("bfloat16", False)):
        copies.clear()
        fiddlerc.compile(src, tmp_path / dtype, gpu_memory="1GiB", context=64, fast_experts=2, dtype=dtype)
        with fiddlerc.load(tmp_path / dtype, device="cpu") as model:
            w = model.placed_experts[0].weights[0].w_out
            assert _mapping(w.data_ptr())[0].endswith(".safetensors") == mapped, dtype
            assert not _mapping(model._forward.dense[0].qkv.data_ptr())[0].endswith(".safetensors")  # fused rows
            n_layers, n_experts = len(model.placed_experts), model.placed_experts[0].num_experts
        # what binding copies goes through host_copy: the fused QKV rows; converted, also every expert matrix,
        # the output projections and lm_head
        want = n_layers if mapped else 3 * n_layers * n_experts + 2 * n_layers + 1
        assert len(copies) == want, dtype


def test_decode_without_padding_builds_no_mask_and_everything_else_gets_transformers_mask(monkeypatch):
    from fiddlerc.runtime import attention

    calls = []
    monkeypatch.setattr(attention, "create_causal_mask", lambda **kw: calls.append(kw) or "transformers' mask")
    one, prompt, mask = torch.zeros(1, 1, 8), torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.long)
    assert attention.causal_mask(inputs_embeds=one, attention_mask=None, cache=None) is None and not calls
    assert attention.causal_mask(inputs_embeds=one, attention_mask=mask, cache=None) == "transformers' mask"
    assert attention.causal_mask(inputs_embeds=prompt, attention_mask=None, cache=None) == "transformers' mask"
    assert [c["inputs_embeds"].shape[1] for c in calls] == [1, 3] and calls[0]["attention_mask"] is mask


def test_sdpa_causal_mask_is_used_only_for_a_prefill_from_an_empty_cache():
    from fiddlerc.runtime.attention import causal_without_mask

    assert causal_without_mask(5, 5) is True
    assert causal_without_mask(1, 9) is False  # one query sees every key
    with pytest.raises(RuntimeError, match="needs an attention mask"):
        causal_without_mask(3, 9)  # SDPA would align its causal mask to the first key: wrong


def test_a_plan_naming_an_attention_the_model_lacks_is_refused(model_dirs, tmp_path):
    import json

    from fiddlerc.errors import ArtifactError, PlanError

    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64)
    plan_file = tmp_path / "out" / "plan.json"
    doc = json.loads(plan_file.read_text())
    doc["attention"][0]["module"] = "model.layers.0.mlp"
    plan_file.write_text(json.dumps(doc))
    with pytest.raises((ArtifactError, PlanError), match="recompile"):
        fiddlerc.load(tmp_path / "out", device="cpu")


def _decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T-1, V] of a prompt of 1 token followed by T-1 single-token steps (the decode path)."""
    cache, out = model.new_cache(), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            out.append(model._forward(ids[:, t : t + 1], cache, mask, torch.tensor([[t]]))[0, -1])
    return torch.stack(out)


def test_spreading_a_tokens_experts_over_both_threads_keeps_the_arithmetic(model_dirs, hf_model, tmp_path):
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf_model(src)(input_ids=ids).logits[0]
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as model:
        assert not any(p.spread for p in model.placed_experts)  # tiny weights: not measured, tiers as placed
        by_tier = _decode_logits(model, ids)
        submitted, worker = [], model.placed_experts[0].worker  # one worker serves every layer
        submit = worker.submit
        worker.submit = lambda fn, *a: submitted.append(len(a[0])) or submit(fn, *a)
        for p in model.placed_experts:
            p.spread = True
        spread = _decode_logits(model, ids)
    assert submitted == [1] * (ids.shape[1] * len(model.placed_experts))  # one of the two picks, every layer and step
    assert torch.equal(spread, by_tier)  # same kernels, same summation order
    torch.testing.assert_close(spread, want, rtol=1e-5, atol=1e-5)


def test_spread_is_measured_once_and_only_for_weights_worth_measuring(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def fake(shape, dtype, kernel):
        calls.append((shape, kernel))
        return {"serial": 100.0, "spread": 60.0 if kernel == "reference" else 99.0}

    monkeypatch.setattr(kernels, "measure_spread", fake)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    shape = (1024, 1024)
    assert kernels.spread_experts(shape, torch.float32, "reference") is True
    assert kernels.spread_experts(shape, torch.float32, "packed") is False  # within noise: stay serial
    assert kernels.spread_experts(shape, torch.float32, "reference") is True
    assert calls == [(shape, "reference"), (shape, "packed")]
    assert kernels.spread_experts((8, 8), torch.float32, "reference") is False and len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [48, 1000, 4096])
def test_fused_rms_norm_is_bit_identical_to_hugging_face(dtype, hidden):
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from fiddlerc.runtime.norms import rms_norm

    g = torch.Generator().manual_seed(hidden)
    hf = MixtralRMSNorm(hidden, eps=1e-6).to(dtype)
    hf.weight.data = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
    x = (torch.randn(3, 5, hidden, generator=g) * 4).to(dtype)
    assert torch.equal(rms_norm(x, hf.weight, 1e-6), hf(x))


def test_codegen_fuses_every_rms_norm_it_recognises_and_leaves_others(model_dirs, tmp_path):
    layers = fiddlerc.compile(
        model_dirs("mixtral"), tmp_path / "m", gpu_memory="1GiB", context=64
    ).plan.model.num_layers
    text = (tmp_path / "m" / "module.py").read_text()
    assert text.count("= self.rms_norm(") == 2 * layers + 1 and "rsqrt" not in text  # two per layer and the final one
    fiddlerc.compile(model_dirs("qwen3_next"), tmp_path / "q", gpu_memory="1GiB", context=64)
    text = (tmp_path / "q" / "module.py").read_text()
    assert "= self.rms_norm(" not in text and "rsqrt" in text  # Gemma-style `1 + weight` norms are not this pattern

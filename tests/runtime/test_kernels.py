"""CPU kernel choice: packed oneDNN weights, native C products, row-split products, and the measured, cached picks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fiddlerc
from fiddlerc.runtime import kernels, matvec
from tests.conftest import decode_logits, padded_prompts


def test_pick_takes_the_faster_kernel_only_when_it_wins_at_decode_and_holds_at_prefill():
    ref = {1: 100.0, 8: 400.0}
    assert kernels.pick({"reference": ref, "packed": {1: 80.0, 8: 300.0}}) == "packed"
    assert kernels.pick({"reference": ref, "packed": {1: 99.0, 8: 300.0}}) == "reference"  # within noise
    assert kernels.pick({"reference": ref, "packed": {1: 80.0, 8: 500.0}}) == "reference"  # loses at prefill
    assert kernels.pick({"reference": ref}) == "reference"
    # native runs the reference beyond two tokens: its time at 8 is the reference's plus noise
    assert kernels.pick({"reference": ref, "native": {1: 80.0, 8: 450.0}}) == "native"
    assert kernels.pick({"reference": ref, "packed": {1: 90.0, 8: 300.0}, "native": {1: 80.0, 8: 400.0}}) == "native"


def test_a_use_that_cannot_pack_chooses_among_the_other_measured_kernels(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    timings = {"reference": {1: 100.0, 8: 400.0}, "packed": {1: 70.0, 8: 300.0}, "native": {1: 80.0, 8: 400.0}}
    monkeypatch.setattr(kernels, "measure", lambda shape, dtype: timings)
    monkeypatch.setattr(kernels, "can_pack", lambda dtype: True)
    assert kernels.choose((1024, 1024), torch.float32) == "packed"
    assert kernels.choose((1024, 1024), torch.float32, ("reference", "native")) == "native"  # read from the cache
    assert kernels.resolve("packed", (1024, 1024), torch.float32, ("reference", "native")) == "reference"


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
    ids, mask = padded_prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="packed") as model:
        packed = [name for name, mod in model.hf_model.named_modules() if isinstance(mod, kernels.KernelLinear)]
        assert packed, "lm_head and the dense projections are packed"
        assert all(w.is_mkldnn for p in model.placed_experts for ew in p.weights for w in ew.matrices)
        assert all(d.qkv.is_mkldnn and d.o.is_mkldnn for d in model._forward.dense.values())
        with torch.no_grad():  # teacher-forced logits, not greedy tokens: rounding differs from the reference
            want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not kernels.can_native(torch.float32), reason="the C kernels were not built")
def test_native_kernels_match_hugging_face_within_tolerance(model_dirs, hf_model, tmp_path):
    from fiddlerc.runtime.matvec import NativeWeight

    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=4)
    ref = hf_model(src)
    ids, mask = padded_prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="native") as model:
        assert "fiddlerc's C product" in repr(model.hf_model.lm_head)
        assert all(type(w) is NativeWeight for p in model.placed_experts for ew in p.weights for w in ew.matrices)
        assert all(type(p.worker).__name__ == "InlineWorker" for p in model.placed_experts)  # it uses every core
        assert all(p.grouped is not None for p in model.placed_experts)  # one token: one C call a layer
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
            want_step = ref(input_ids=ids[:1, -1:]).logits
        got = model(ids, attention_mask=mask)  # prefill: F.linear beyond MAX_TOKENS tokens
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(ids[:1, -1:]), want_step, rtol=1e-4, atol=1e-4)  # one token: the C product


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
    monkeypatch.setattr("fiddlerc.loader.bind.groupable", lambda math: False)  # as experts no grouped call computes
    monkeypatch.setattr(kernels, "choose", lambda *_: "reference")  # no measuring of tiny weights
    monkeypatch.setattr(kernels, "MIN_AUTO_BYTES", 0)  # the test model's weights are small
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    ids = padded_prompts()[0][1:]

    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as ref:
        want = decode_logits(ref, ids)
    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu") as model:
        dense = model._forward.dense.values()
        assert all(type(d.qkv) is kernels.RowSplit and type(d.o) is kernels.RowSplit for d in dense)
        assert type(model.hf_model.lm_head) is kernels.KernelLinear and "row-split" in repr(model.hf_model.lm_head)
        for got, expected in zip(decode_logits(model, ids), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
    monkeypatch.setattr(kernels.quant, "build", lambda: "another")  # a rebuilt C library: measured again
    assert kernels.choose(shape, torch.float32) == "reference" and calls == [shape, shape]


def test_native_tokens_is_where_the_c_product_stops_winning_measured_once(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ref = {2: 500.0, 4: 500.0, 8: 520.0, 12: 600.0, 16: 650.0}
    native = {2: 200.0, 4: 300.0, 8: 480.0, 12: 700.0, 16: 600.0}  # loses at 12: 16 does not count
    assert kernels.crossover({"reference": ref, "native": native}) == 8
    assert kernels.crossover({"reference": ref, "native": {t: 2 * us for t, us in ref.items()}}) == 0
    calls = []

    def fake(shape, dtype, tokens_probed, among):
        calls.append(shape)
        assert tokens_probed == kernels.NATIVE_PROBE_TOKENS and set(among) == {"reference", "native"}
        return {"reference": ref, "native": native}

    monkeypatch.setattr(kernels, "measure", fake)
    monkeypatch.setattr(kernels, "can_native", lambda dtype: True)
    shape = (1024, 1024)
    assert kernels.native_tokens(shape, torch.float32) == 8 == kernels.native_tokens(shape, torch.float32)
    assert calls == [shape]
    assert kernels.native_tokens((8, 8), torch.float32) == matvec.MAX_TOKENS and calls == [shape]  # too small


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


@pytest.mark.skipif(not kernels.can_native(torch.float32), reason="the C kernels were not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_grouped_call_of_native_experts_sums_them_as_one_call_each_would(dtype):
    from fiddlerc.runtime.matvec import NativeWeight

    g = torch.Generator().manual_seed(6)
    hidden, inter = 96, 160
    experts = {
        e: tuple(NativeWeight((torch.randn(*s, generator=g) * 0.05).to(dtype)) for s in ((inter, hidden),) * 2 + ((hidden, inter),))
        for e in range(4)
    }  # fmt: skip
    grouped = kernels.GroupedExperts(experts)
    x = torch.randn(1, hidden, generator=g).to(dtype)
    picks, route = [3, 1], torch.tensor([0.7, 0.3])
    want = torch.zeros(1, hidden, dtype=torch.float64)
    for e, r in zip(picks, route, strict=True):  # in float64 on the same weights
        gate, up, down = (m.weight.double() for m in experts[e])
        h = F.silu(x.double() @ gate.T) * (x.double() @ up.T)
        want += r.double() * (h @ down.T)
    got = grouped(x, picks, route)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())
    plain = tuple(m.weight for m in experts[0])
    assert not kernels.GroupedExperts.accepts(plain, experts[0])  # plain tensors do not join a native group


@pytest.mark.skipif(not kernels.can_native(torch.float32), reason="the C kernels were not built")
def test_a_grouped_call_orders_and_counts_its_picks_and_refuses_an_expert_it_does_not_hold():
    from fiddlerc.runtime.matvec import NativeWeight

    g = torch.Generator().manual_seed(7)
    hidden, inter = 64, 32
    experts = {
        e: tuple(NativeWeight(torch.randn(*s, generator=g) * 0.1) for s in ((inter, hidden),) * 2 + ((hidden, inter),))
        for e in (0, 2, 3)
    }  # expert 1 is held elsewhere (another tier)
    grouped = kernels.GroupedExperts(experts, num_experts=4)
    assert not grouped.holds_all
    x, counts = torch.randn(1, hidden, generator=g), torch.zeros(4, dtype=torch.int64)
    route = torch.tensor([0.25, 0.75])
    forward = grouped(x, torch.tensor([[0, 3]]), route, counts)
    backward = grouped(x, torch.tensor([[3, 0]]), route.flip(0), counts)  # the same picks in the other slots
    assert torch.equal(forward, backward)  # summed in expert order whatever the router's slot order
    assert counts.tolist() == [2, 0, 0, 2]
    with pytest.raises(ValueError, match="not all of them are in this group"):
        grouped(x, [0, 1], route)
    with pytest.raises(ValueError, match="not all of them are in this group"):
        grouped(x, [0, 4], route)


@pytest.mark.skipif(not kernels.can_native(torch.float32), reason="the C kernels were not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_tokens_in_one_grouped_call_equal_each_token_alone_and_are_counted(dtype):
    from fiddlerc.runtime.matvec import NativeWeight

    g = torch.Generator().manual_seed(8)
    hidden, inter, n = 96, 160, 6
    experts = {
        e: tuple(NativeWeight((torch.randn(*s, generator=g) * 0.05).to(dtype)) for s in ((inter, hidden),) * 2 + ((hidden, inter),))
        for e in range(n)
    }  # fmt: skip
    grouped = kernels.GroupedExperts(experts)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    picks = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(7)])  # [T, k], any order per token
    route = torch.rand(7, 2, generator=g)
    counts = torch.zeros(n, dtype=torch.int64)
    got = grouped.tokens(x, picks, route, counts)
    assert got.shape == (7, hidden) and got.dtype == torch.float32
    for t in range(7):  # what the one-token call gives, each token alone
        torch.testing.assert_close(got[t : t + 1], grouped(x[t : t + 1], picks[t], route[t]), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == torch.bincount(picks.reshape(-1), minlength=n).tolist()
    with pytest.raises(ValueError, match="not all of them are in this group"):
        grouped.tokens(x[:1], torch.tensor([[0, n]]), route[:1])

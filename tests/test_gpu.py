"""GPU checks: the same compiled models on a real CUDA device (skipped without one)."""

import pytest
import torch

import fiddlerc
from fiddlerc.model.families import VERIFIED
from tests.conftest import VOCAB, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", sorted(VERIFIED))
def test_split_model_on_cuda_equals_hugging_face(arch, model_dirs, hf_model, tmp_path):
    if arch == "minimax":  # seen on H100, torch 2.11 + transformers 5.17: HF's own generate fails the same way
        pytest.xfail(
            "left-padded SDPA on CUDA raises '(*bias): last dimension must be contiguous' in transformers itself"
        )
    src = model_dirs(arch)
    probe = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64)
    half = len(probe.plan.moe_layers) * (probe.plan.moe_layers[0].num_experts // 2)
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=half)
    ref = hf_model(src)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    with fiddlerc.load(tmp_path / "out", device="cuda:0") as model:
        assert model.device.type == "cuda"
        for ml in model.plan.moe_layers:
            placed = model.hf_model.get_submodule(ml.experts_module)
            for w, dev in zip(placed.weights, model.plan.placement(ml.layer), strict=True):
                assert w.w_out.device.type == ("cpu" if dev == "cpu" else "cuda")
        assert model.hf_model.lm_head.weight.device.type == "cuda"
        with torch.no_grad():
            want = ref(input_ids=ids).logits
        got = model(ids)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        want_ids = hf_greedy(ref, ids, mask, 16)
        got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=16, ignore_eos=True)
        assert torch.equal(got_ids.cpu(), want_ids)
        stats = model.routing_stats()
        assert stats["fast"] > 0 and stats["cpu"] > 0


def test_plan_larger_than_free_gpu_memory_is_refused(model_dirs, tmp_path):
    from fiddlerc.errors import BudgetError

    # a KV reserve of 10^10 tokens: terabytes, more than any GPU has free
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="100TiB", context=10**10)
    with pytest.raises(BudgetError, match="but only .* is free there"):
        fiddlerc.load(tmp_path / "out", device="cuda:0")


def test_fetched_experts_and_micro_batches_on_cuda_equal_hugging_face(model_dirs, hf_model, tmp_path):
    """Double-buffered weight fetches (side stream + events) and the micro-batched forward (pinned
    staging per micro-batch) on a real GPU."""
    src = model_dirs("mixtral")
    fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2, batch=4, micro_batches=2)
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_model(src)(input_ids=ids).logits
    with fiddlerc.load(tmp_path / "out", device="cuda:0") as model:
        torch.testing.assert_close(model(ids).cpu(), want, rtol=1e-4, atol=1e-4)  # micro-batched
        for placed in model.placed_experts:  # as a plan for a slow CPU would say: fetch from 3 tokens
            placed.fetch_min_tokens = tuple(3 if cpu else None for cpu in placed.on_cpu)
        torch.testing.assert_close(model(ids).cpu(), want, rtol=1e-4, atol=1e-4)
        assert model.routing_stats()["fetched"] > 0

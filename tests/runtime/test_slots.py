"""The server's slot cache: sequences of different lengths in one batched step compute what each computes
alone, and Hugging Face computes for it."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.runtime import attention
from fiddlerc.runtime.slots import SlotCache
from tests.conftest import VOCAB


class _Config:
    num_attention_heads, num_key_value_heads, head_dim, hidden_size, num_hidden_layers = 4, 2, 8, 32, 2


def test_a_step_appends_each_sequence_at_its_own_position_and_masks_the_rest():
    cache = SlotCache(_Config(), slots=3, context=16, dtype=torch.float32, device=torch.device("cpu"))
    for slot, n in ((0, 5), (1, 2)):
        for lay in cache.view(slot).layers:
            lay.fiddlerc_length = n
    assert cache.begin_step(2).tolist() == [5, 2]
    mask = cache.mask()
    assert mask.shape == (2, 1, 1, 6)
    assert mask[0, 0, 0].tolist() == [True] * 6 and mask[1, 0, 0].tolist() == [True] * 3 + [False] * 3
    k = torch.randn(2, 2, 1, 8)
    keys, values = cache.append(0, k, k + 1)
    assert keys.shape == (2, 2, 6, 8)
    assert torch.equal(cache.keys[0][0, :, 5], k[0, :, 0]) and torch.equal(cache.keys[0][1, :, 2], k[1, :, 0])
    assert cache.view(0).layers[0].fiddlerc_length == 6 and cache.view(1).layers[1].fiddlerc_length == 2
    cache.append(1, k, k)
    assert cache.lengths(2).tolist() == [6, 3]
    cache.move(0, 1)  # slot 1's sequence ended: slot 0's takes it
    assert cache.lengths(2).tolist() == [0, 6] and torch.equal(cache.keys[0][1, :, 5], k[0, :, 0])
    with pytest.raises(RuntimeError, match="one token to each of 2 slots"):
        cache.append(0, torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))


def test_a_packed_prefill_writes_each_prompt_into_its_slot_and_masks_the_others():
    cache = SlotCache(_Config(), slots=3, context=16, dtype=torch.float32, device=torch.device("cpu"))
    packed = cache.prefill([2, 0], [3, 2])
    assert packed.position_ids().tolist() == [[0, 1, 2, 0, 1]] and packed.ends.tolist() == [2, 4]
    mask = packed.mask()[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    k = torch.randn(1, 2, 5, 8)
    assert packed.append(0, k, k + 1)[0] is k
    assert torch.equal(cache.keys[0][2, :, :3], k[0, :, :3]) and torch.equal(cache.values[0][0, :, :2], k[0, :, 3:] + 1)
    assert cache.view(2).layers[0].fiddlerc_length == 3 and cache.view(0).layers[0].fiddlerc_length == 2
    with pytest.raises(RuntimeError, match="holds a sequence already"):
        cache.prefill([0], [4])
    with pytest.raises(RuntimeError, match="context this model was compiled for"):
        cache.prefill([1], [17])


@pytest.mark.parametrize(
    "packed,kernels",
    [(False, "auto"), (True, "auto"), (False, "reference")],
    ids=["prefills-one-by-one", "packed-prefill", "torch-attention"],
)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_batched_step_of_sequences_of_different_lengths_equals_hugging_face(
    family, packed, kernels, model_dirs, hf_model, tmp_path, monkeypatch
):
    in_c = []  # the step's attention: one C call a layer for all slots (attend_rows), each over its own prefix
    real = attention.attend_rows

    def spy(*args):
        out = real(*args)
        in_c.append(out is not None)
        return out

    monkeypatch.setattr(attention, "attend_rows", spy)
    src = model_dirs(family)
    fiddlerc.compile(src, tmp_path / "out", gpu_memory=0, context=32, batch=3)
    ref = hf_model(src)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (7, 3, 5)]
    nxt = torch.randint(3, VOCAB, (3, 2), generator=g)  # two batched steps
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels=kernels) as model:
        cache = model.slot_cache()
        assert cache is not None and cache.slots == 3
        if packed:  # the prompts in one forward, as the server admits several at once
            prefill = cache.prefill([0, 1, 2], [ids.shape[1] for ids in prompts])
            firsts = model.next_logits(torch.cat(prompts, dim=1), prefill, prefill.position_ids())
        else:  # one forward each
            firsts = [
                model.next_logits(ids, cache.view(s), torch.arange(ids.shape[1])[None])[0]
                for s, ids in enumerate(prompts)
            ]
        for first, ids in zip(firsts, prompts, strict=True):
            with torch.no_grad():
                torch.testing.assert_close(first, ref(input_ids=ids).logits[0, -1], rtol=1e-5, atol=1e-5)
        for step in range(2):
            positions = cache.begin_step(3)
            got = model.next_logits(nxt[:, step : step + 1], cache, positions[:, None])
            for row, ids in enumerate(prompts):
                full = torch.cat([ids[0], nxt[row, : step + 1]])[None]
                with torch.no_grad():
                    want = ref(input_ids=full).logits[0, -1]
                torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        assert (in_c and all(in_c)) if kernels == "auto" else not in_c  # reference: the torch ops, masked
        # two slots: few enough tokens for the experts' one C call over every token (GroupedExperts.tokens)
        if kernels == "auto":
            assert model.placed_experts[0].grouped.max_tokens >= 2
        last = torch.randint(3, VOCAB, (2, 1), generator=g)
        got = model.next_logits(last, cache, cache.begin_step(2)[:, None])
        for row, ids in enumerate(prompts[:2]):
            full = torch.cat([ids[0], nxt[row], last[row]])[None]
            with torch.no_grad():
                torch.testing.assert_close(got[row], ref(input_ids=full).logits[0, -1], rtol=1e-5, atol=1e-5)


def test_in_bf16_a_packed_prefill_and_a_batched_step_compute_what_each_sequence_does_alone(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("qwen3_moe"), tmp_path / "out", gpu_memory=0, context=32, batch=3, dtype="bfloat16")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (1, n), generator=g) for n in (5, 3, 7)]
    nxt = torch.randint(3, VOCAB, (3, 1), generator=g)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        cache = model.slot_cache()
        prefill = cache.prefill([0, 1, 2], [ids.shape[1] for ids in prompts])
        firsts = model.next_logits(torch.cat(prompts, dim=1), prefill, prefill.position_ids())
        got = model.next_logits(nxt, cache, cache.begin_step(3)[:, None])
        for row, ids in enumerate(prompts):
            full = torch.cat([ids, nxt[row : row + 1]], dim=1)
            alone = model(full)[0].float()  # a forward of its own, every position
            assert got.dtype == torch.bfloat16
            # the bf16 rounding of the kernels' other sums: a unit in the last place of these logits
            torch.testing.assert_close(firsts[row].float(), alone[-2], rtol=0, atol=8e-3)
            torch.testing.assert_close(got[row].float(), alone[-1], rtol=0, atol=8e-3)

"""The generated attention with its static KV cache, and the masks it builds, against Hugging Face."""

from __future__ import annotations

import pytest
import torch

import fiddlerc
from fiddlerc.errors import OptionError
from tests.conftest import decode_logits, hf_greedy, padded_prompts

GENERATED_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "phimoe", "granitemoe", "ernie4_5_moe"]


@pytest.mark.parametrize("family", GENERATED_FAMILIES)
def test_generated_attention_equals_hugging_face(family, model_dirs, hf_model, tmp_path):
    src = model_dirs(family)
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64, fast_experts=2)
    assert art.plan.attention and {a.path for a in art.plan.attention} == {"generated"}
    text = (tmp_path / "out" / "module.py").read_text()
    assert "def attention(self, layer" in text and "= self.attention(0," in text
    assert "= self.causal_mask(" in text and "create_causal_mask(" not in text  # no mask built at decode
    ref = hf_model(src)
    ids, mask = padded_prompts()
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as model:
        assert type(model.new_cache()).__name__ == "StaticCache"
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask).logits
        got = model(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        got_ids = model.generate(ids, attention_mask=mask, max_new_tokens=6, ignore_eos=True)
        assert torch.equal(got_ids, hf_greedy(ref, ids, mask, 6))


def test_generation_past_the_static_cache_is_refused(model_dirs, tmp_path):
    fiddlerc.compile(model_dirs("mixtral"), tmp_path / "out", gpu_memory="1GiB", context=16)
    with fiddlerc.load(tmp_path / "out", device="cpu") as model:
        with pytest.raises(OptionError, match="context"):
            model.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)


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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_token_attention_in_c_equals_the_generated_torch_ops(family, dtype, model_dirs, tmp_path, monkeypatch):
    """Teacher-forced decode (a prompt, then one token at a time) on a CPU load, where each layer's attention
    at one token is one C call, against the same model with the reference kernels (the generated torch ops)."""
    from fiddlerc.runtime import attention, quant

    if quant.library() is None:
        pytest.skip("the C kernels were not built")
    calls = []
    real = attention.attend_one
    monkeypatch.setattr("fiddlerc.loader.model.attend_one", lambda *a: calls.append(a[1]) or real(*a))
    fiddlerc.compile(model_dirs(family), tmp_path / "out", gpu_memory="1GiB", context=64, dtype=dtype)
    ids = padded_prompts()[0][1:]

    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as ref:
        want = decode_logits(ref, ids, (5, 9, 2, 7, 11, 3))
    with torch.no_grad(), fiddlerc.load(tmp_path / "out", device="cpu") as model:
        got = decode_logits(model, ids, (5, 9, 2, 7, 11, 3))
        layers = model.config.num_hidden_layers
    assert calls == [layer for _ in range(6) for layer in range(layers)]  # every decode step, every layer
    tol = 1e-5 if dtype == "float32" else 8e-3  # bf16: the C path rounds once where the torch ops round per op
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=tol)

"""select_attention: every decoder layer gets a path, generated or Hugging Face's, with its reason."""

from __future__ import annotations

import torch

import fiddlerc
from fiddlerc.compiler.report import report_text
from tests.conftest import hf_greedy, padded_prompts


def test_attention_kinds_not_generated_stay_hugging_face_and_say_why(model_dirs, tmp_path):
    art = fiddlerc.compile(
        model_dirs("olmoe"), tmp_path / "out", gpu_memory="1GiB", context=64
    )  # q/k norms over all heads
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


def test_attention_that_normalises_each_head_is_generated_and_equals_hugging_face(model_dirs, hf_model, tmp_path):
    src = model_dirs("qwen3_moe")  # Qwen3: an RMSNorm over each head of the queries and keys
    art = fiddlerc.compile(src, tmp_path / "out", gpu_memory="1GiB", context=64)
    assert {a.path for a in art.plan.attention} == {"generated"}
    assert "qk = self.rms_norm(qk, w.head_norm," in (tmp_path / "out" / "module.py").read_text()
    ref, (ids, mask) = hf_model(src), padded_prompts()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    with fiddlerc.load(tmp_path / "out", device="cpu", kernels="reference") as model:
        torch.testing.assert_close(
            model(ids, attention_mask=mask)[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5
        )
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, ignore_eos=True)
    assert torch.equal(got, hf_greedy(ref, ids, mask, 6))

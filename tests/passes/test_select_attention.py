"""select_attention: every decoder layer gets a path, generated or Hugging Face's, with its reason."""

from __future__ import annotations

import fiddlerc
from fiddlerc.compiler.report import report_text


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

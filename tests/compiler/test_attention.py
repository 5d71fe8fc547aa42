"""Compile-time attention decisions: which rotary embeddings the generated module writes out itself."""

from __future__ import annotations

import pytest
import torch

import fiddlerc


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

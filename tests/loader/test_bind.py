"""Binding weights: which stay mapped from the safetensors files and which binding copies."""

from __future__ import annotations

import fiddlerc
from tests.conftest import mapping_of


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
            w = getattr(w, "weight", w)  # a NativeWeight reads the tensor as bound
            assert mapping_of(w.data_ptr())[0].endswith(".safetensors") == mapped, dtype
            assert not mapping_of(model._forward.dense[0].qkv.data_ptr())[0].endswith(".safetensors")  # fused rows
            n_layers, n_experts = len(model.placed_experts), model.placed_experts[0].num_experts
        # what binding copies goes through host_copy: the fused QKV rows; converted, also every expert matrix,
        # the output projections and lm_head
        want = n_layers if mapped else 3 * n_layers * n_experts + 2 * n_layers + 1
        assert len(copies) == want, dtype

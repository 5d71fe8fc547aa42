"""The fused RMSNorm the generated module calls, bit for bit against Hugging Face's."""

from __future__ import annotations

import pytest
import torch


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

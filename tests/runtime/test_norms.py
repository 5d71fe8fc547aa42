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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [48, 1000, 4096])
def test_native_rms_norm_equals_the_fused_one_within_rounding(dtype, hidden):
    from fiddlerc.runtime import quant
    from fiddlerc.runtime.norms import native_rms_norm, rms_norm

    if quant.library() is None:
        pytest.skip("the C kernels were not built")
    g = torch.Generator().manual_seed(hidden)
    w = (torch.randn(hidden, generator=g) * 0.1 + 1).to(dtype)
    x = (torch.randn(3, 5, hidden, generator=g) * 4).to(dtype)
    got, want = native_rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    ulp = 1e-6 if dtype == torch.float32 else 1e-2  # one rounding of the dtype at most
    torch.testing.assert_close(got, want, rtol=ulp, atol=ulp)
    half = x.to(torch.float16)  # a dtype the C kernel does not take: the fused norm
    assert torch.equal(native_rms_norm(half, w.to(torch.float16), 1e-6), rms_norm(half, w.to(torch.float16), 1e-6))

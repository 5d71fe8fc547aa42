"""fiddlerc's C product of a few tokens with float weights as bound, against `F.linear` in fp32."""

import pytest
import torch
import torch.nn.functional as F

from fiddlerc.runtime import kernels, matvec
from fiddlerc.runtime.matvec import MAX_TOKENS, NativeWeight

needs_kernels = pytest.mark.skipif(not matvec.quant.available(), reason="the C kernels were not built")
# short rows (one at a time), long rows (four at a time, >= 8 KiB), ragged row and column counts (rows
# past the last eight and columns past the last 64 of the tokens-in-lanes loop, from five tokens)
SHAPES = [(4, 64), (33, 200), (96, 768), (21, 4100), (8, 8192)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_products_equal_fp32_arithmetic_on_the_same_weights(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    for tokens in (*range(1, MAX_TOKENS + 1), 4, 5, 8, 9, max(kernels.NATIVE_PROBE_TOKENS)):  # native_tokens' probes
        x = torch.randn(tokens, cols, generator=g).to(dtype)
        want = F.linear(x.double(), w.double()).float()  # the same numbers, summed exactly
        tol = 1e-6 * cols**0.5 * want.abs().max().item()  # fp32 sums in another order only
        for simd in (True, False) if matvec.quant.library().simd else (False,):
            for threads in (1, 2):
                got = matvec.matvec(x, w, threads=threads, simd=simd)
                assert got.shape == (tokens, rows) and got.dtype == torch.float32
                torch.testing.assert_close(got, want, rtol=0, atol=tol)


@needs_kernels
def test_a_native_weight_computes_like_f_linear_and_longer_calls_are_f_linear():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 128, generator=g).to(torch.bfloat16), torch.randn(48, generator=g).to(torch.bfloat16)
    native = NativeWeight(w)
    assert native.shape == w.shape and native.dtype == w.dtype and not native.is_mkldnn
    for shape in ((1, 128), (1, 1, 128), (2, 128)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        got = native(x, b)
        assert got.shape == (*shape[:-1], 48) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-2, atol=1e-2)  # bf16 rounding of the result
    long = torch.randn(MAX_TOKENS + 1, 128, generator=g).to(torch.bfloat16)
    assert native(long, b).equal(F.linear(long, w, b))
    measured = NativeWeight(w, max_tokens=8)  # as the loader sets it from kernels.native_tokens
    x8, x9 = (torch.randn(n, 128, generator=g).to(torch.bfloat16) for n in (8, 9))
    assert measured(x8, None).equal(matvec.matvec(x8, w).to(torch.bfloat16))  # the C product up to 8 tokens
    assert measured(x9, None).equal(F.linear(x9, w))  # F.linear beyond


@needs_kernels
def test_weights_the_kernel_cannot_read_are_refused():
    w = torch.randn(64, 32)
    assert matvec.supports(w) and not matvec.supports(w.t()) and not matvec.supports(w.to(torch.float64))
    with pytest.raises(RuntimeError, match="contiguous CPU fp32/bf16/fp16 weights"):
        matvec.matvec(torch.randn(1, 64), w.t())
    with pytest.raises(ValueError, match="activations of shape \\(1, 16\\) for a weight of 32 columns"):
        matvec.matvec(torch.randn(1, 16), w)

"""The C kernels that read quantized CPU-tier experts (fiddlerc.quant_format), through ctypes.

`_quant.c` (with `_matvec.c`, the float products of fiddlerc.runtime.matvec) is built with the package (setuptools; optional, so an install without a C compiler
still works and says so when a quantized plan is loaded). ctypes releases the GIL for each call,
so the CPU worker computes while the main thread drives the fast device; rows are split over
OpenMP threads, as many as torch's intra-op threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
from functools import cache

import torch

from fiddlerc.quant_format import FORMATS, GROUP, QuantizedActivations, QuantizedWeight


class _Library:
    def __init__(self, path: str) -> None:
        lib = ctypes.CDLL(path)  # ctypes releases the GIL for the length of each call
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.fc_has_avx2.restype = i32
        lib.fc_quantize_activations.argtypes = [p, i64, i64, p, p, i32]
        lib.fc_quantize_activations.restype = None
        lib.fc_matmul.argtypes = [i32, p, p, i64, i64, p, p, i64, p, i32, i32]
        lib.fc_matmul.restype = None
        lib.fc_matvec.argtypes = [i32, p, i64, i64, p, i64, p, i32, i32]  # _matvec.c, for fiddlerc.runtime.matvec
        lib.fc_matvec.restype = None
        # kernels.GroupedExperts: (format, n, picks, route, table[, scales], experts, hidden, inter, x, y, counts,
        # threads, simd)
        lib.fc_experts_silu.argtypes = [i32, i32, p, p, p, p, i64, i64, i64, p, p, p, i32, i32]
        lib.fc_experts_silu.restype = i32
        lib.fc_experts_silu_float.argtypes = [i32, i32, p, p, p, i64, i64, i64, p, p, p, i32, i32]
        lib.fc_experts_silu_float.restype = i32
        lib.fc_experts_silu_float_tokens.argtypes = [i32, i64, i32, p, p, p, i64, i64, i64, p, p, p, i32, i32]
        lib.fc_experts_silu_float_tokens.restype = i32
        lib.fc_rms_norm.argtypes = [i32, p, p, i64, i64, i64, ctypes.c_float, p]  # fiddlerc.runtime.norms
        lib.fc_rms_norm.restype = None
        # fiddlerc.runtime.attention.attend_one: (kind, qkv, head_norm, eps, cos, sin, heads, kv_heads, head_dim,
        # keys, values, max_len, pos, scale, out, threads, simd)
        lib.fc_attention_decode.argtypes = [i32, p, p, ctypes.c_float, p, p, i64, i64, i64, p, p, i64, i64,
                                            ctypes.c_float, p, i32, i32]  # fmt: skip
        lib.fc_attention_decode.restype = i32
        # attention.attend_rows: (kind, rows, qkv, qkv_stride, head_norm, eps, cos, sin, heads, kv_heads, head_dim,
        # keys, values, slot_stride, max_len, positions, scale, out, threads, simd)
        lib.fc_attention_decode_rows.argtypes = [i32, i64, p, i64, p, ctypes.c_float, p, p, i64, i64, i64, p, p, i64,
                                                 i64, p, ctypes.c_float, p, i32, i32]  # fmt: skip
        lib.fc_attention_decode_rows.restype = i32
        # fiddlerc.runtime.routing.route: (kind, weight, experts, hidden, x, tokens, k, normalise, picks, weights, simd)
        lib.fc_route_softmax_topk.argtypes = [i32, p, i64, i64, p, i64, i32, i32, p, p, i32]
        lib.fc_route_softmax_topk.restype = i32
        self.lib = lib
        self.simd = bool(lib.fc_has_avx2())
        with open(path, "rb") as f:  # which build: measurements of its kernels are cached under it
            self.build = hashlib.sha256(f.read()).hexdigest()[:12]


@cache
def library() -> _Library | None:
    """The compiled kernels, or None where the package was installed without them."""
    spec = importlib.util.find_spec("fiddlerc.runtime._quant")
    if spec is None or spec.origin is None:
        return None
    return _Library(spec.origin)


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """`t` as a C kernel reads it: contiguous fp32 (itself where it is already; a call at one token has few
    microseconds to spare)."""
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def available() -> bool:
    return library() is not None


def build() -> str | None:
    """Which build of the C kernels this is (a hash of the library), None without them: measurements of
    their speed (kernel choices, calibration) are cached under it, since another build may be faster."""
    lib = library()
    return lib.build if lib is not None else None


def _lib() -> _Library:
    lib = library()
    if lib is None:
        raise RuntimeError(
            "fiddlerc's quantized kernels were not built (fiddlerc/runtime/_quant.c): reinstall fiddlerc on a "
            "machine with a C compiler (pip install -e .), or compile without --expert-dtype"
        )
    return lib


def quantize_activations(x: torch.Tensor, *, simd: bool | None = None) -> QuantizedActivations:
    """Quantize activations [n, cols] (any float dtype) for `matmul`."""
    lib = _lib()
    x = as_f32(x)
    n, cols = x.shape
    if cols % (2 * GROUP):
        raise ValueError(f"activations of width {cols} are not a multiple of two blocks of {GROUP}")
    q = torch.empty(n, cols, dtype=torch.int8)
    d = torch.empty(n, cols // GROUP, dtype=torch.float32)
    lib.lib.fc_quantize_activations(
        x.data_ptr(), n, cols, q.data_ptr(), d.data_ptr(), int(lib.simd if simd is None else simd)
    )
    return QuantizedActivations(q, d)


def matmul(
    x: torch.Tensor | QuantizedActivations,
    qw: QuantizedWeight,
    *,
    threads: int | None = None,
    simd: bool | None = None,
) -> torch.Tensor:
    """`x @ W.T` as fp32 [n, rows], for activations [n, cols] or ones `quantize_activations` made;
    rows are split over `threads` (default: torch's intra-op thread count)."""
    lib = _lib()
    xa = x if isinstance(x, QuantizedActivations) else quantize_activations(x, simd=simd)
    rows, cols = qw.shape
    n = xa.q.shape[0]
    if xa.q.shape[1] != cols:
        raise ValueError(f"activations of width {xa.q.shape[1]} for a weight of {cols} columns")
    y = torch.empty(n, rows, dtype=torch.float32)
    lib.lib.fc_matmul(
        FORMATS.index(qw.fmt),  # _quant.c's FMT_ codes
        qw.data.data_ptr(),
        qw.scales.data_ptr(),
        rows,
        cols,
        xa.q.data_ptr(),
        xa.scales.data_ptr(),
        n,
        y.data_ptr(),
        threads or torch.get_num_threads(),
        int(lib.simd if simd is None else simd),
    )
    return y


def linear(x: torch.Tensor | QuantizedActivations, qw: QuantizedWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, W, b)` for a quantized W: x [..., cols] in any float dtype (the result in x's dtype), or
    activations quantized once for several products, [n, cols] (the result in W's compute dtype)."""
    if isinstance(x, QuantizedActivations):
        y = matmul(x, qw).to(qw.dtype)
        return y if b is None else y + b
    lead = x.shape[:-1]
    y = matmul(x.reshape(-1, x.shape[-1]), qw).to(x.dtype)
    if b is not None:
        y = y + b
    return y.reshape(*lead, y.shape[-1])

"""CPU matrix kernels: which implementation of `y = x @ W.T + b` runs, chosen by measurement.

At decode a weight is read once per token, so a CPU linear is bound by memory bandwidth, and the
default call is often far from it: `F.linear`'s one-token path (MKL's matrix-vector product) runs
on one thread, and at a few tokens oneDNN with the weight pre-packed in its blocked layout can read
it faster. Which wins depends on the CPU, dtype, shape and thread count, so it is measured
per (shape, dtype, threads) on the machine that runs the model, over a pool of weights larger than
the caches, and cached beside the calibration profiles.

Kernels:
- `reference`: `F.linear` on the weight as the loader bound it (memory-mapped, or where converted to
  another dtype, in huge pages: fiddlerc.runtime.host_memory). Exactly Hugging Face's arithmetic.
- `packed`: oneDNN's `_linear_pointwise` on a copy of the weight reordered for `PACK_TOKENS`-token
  calls (the layout inductor's CPU backend uses after freezing). Rounding differs from the
  reference within the dtype's tolerance. Not every CPU supports every dtype (bf16 needs AVX512 or
  AVX-NE-CONVERT): where packing fails, `reference` is used.
- `native`: fiddlerc's own C product of a few tokens (fiddlerc.runtime.matvec) on the weight as bound,
  no copy; longer calls run `F.linear`. Sums in fp32 in another order than the reference.

The same measurements decide how a decode token's experts use the cores of a CPU-only machine
(`spread_experts`): one after the other, each product with the intra-op threads, or spread over the
main thread and the CPU worker at once. Spreading pays where one product uses one core (MKL's fp32
matrix-vector product) and loses where it already uses them all (its bf16 product, on some CPUs).
"""

from __future__ import annotations

import ctypes
import json

import torch
import torch.nn.functional as F
from torch import nn

from fiddlerc.measure import cache_path, cached, median_seconds, pool_size
from fiddlerc.quant_format import FORMATS, QuantizedActivations, QuantizedWeight
from fiddlerc.runtime import matvec, quant
from fiddlerc.runtime.matvec import NativeWeight
from fiddlerc.runtime.worker import CpuWorker

KERNELS = ("reference", "packed", "native")
MODES = ("auto", *KERNELS)  # what load(kernels=...) accepts
PACK_TOKENS = 1  # the call size packed layouts are tuned for: decode, the case that matters most
MIN_AUTO_BYTES = 256 * 2**10  # smaller weights are call-overhead bound: auto keeps the reference
_PROBE_TOKENS = (1, 8)
NATIVE_PROBE_TOKENS = (2, 4, 8, 12, 16)  # native_tokens: where fiddlerc's C product stops beating F.linear


def shared_input(x: torch.Tensor, weights: tuple) -> torch.Tensor | QuantizedActivations:
    """`x` as several products reading it take it: quantized once where they are all quantized (an expert's
    gate and up), else as it is."""
    if len(weights) > 1 and all(type(w) is QuantizedWeight for w in weights):
        return quant.quantize_activations(x)
    return x


def linear(
    x: torch.Tensor | QuantizedActivations, w: torch.Tensor | RowSplit | QuantizedWeight, b: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear` for a plain, a packed (oneDNN, `w.is_mkldnn`), a row-split (`RowSplit`), a native
    (`NativeWeight`) or a quantized (`QuantizedWeight`, fiddlerc.runtime.quant) weight."""
    if type(w) is RowSplit or type(w) is NativeWeight:
        return w(x, b)
    if type(w) is QuantizedWeight:
        return quant.linear(x, w, b)
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return F.linear(x, w, b)


def _product_into(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> None:
    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


class RowSplit:
    """A CPU weight [out, in] whose one-token products are split by rows: the first half on the calling
    thread, the second on the CPU worker, at once, each with the one-thread matrix-vector product. For
    CPU-only decode where two such products side by side measured faster than one after the other
    (`spread_experts`: MKL's fp32 product runs on one core). Calls of more than one token run `F.linear` on
    the whole weight. Its price is prefill, which is compute-bound and where oneDNN's packed layout is
    faster; decode, which reads every weight once per token, is what a CPU-only run spends most of its
    time in. The weight is held once either way (a packed copy beside the mapped pages would not be)."""

    is_mkldnn = False

    def __init__(self, weight: torch.Tensor, worker: CpuWorker) -> None:
        self.weight, self.worker = weight, worker
        half = weight.shape[0] // 2
        self.halves = (weight[:half], weight[half:])

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def __call__(self, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if x.numel() != x.shape[-1]:
            return F.linear(x, self.weight, b)
        top, bottom = self.halves
        half = top.shape[0]
        row = x.reshape(1, -1)
        y = torch.empty(1, self.weight.shape[0], dtype=x.dtype)
        b_top, b_bottom = (None, None) if b is None else (b[:half], b[half:])
        job = self.worker.submit(_product_into, row, bottom, b_bottom, y[:, half:])
        _product_into(row, top, b_top, y[:, :half])
        job.result()
        return y.view(*x.shape[:-1], -1)


def pack(w: torch.Tensor) -> torch.Tensor:
    """A copy of the CPU weight [out, in] in oneDNN's blocked layout; raises RuntimeError where this CPU
    cannot run that dtype packed."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_TOKENS)


def can_native(dtype: torch.dtype) -> bool:
    return quant.available() and dtype in matvec.KINDS


def can_pack(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        pack(torch.zeros(16, 16, dtype=dtype))
    except RuntimeError:
        return False
    return True


class KernelLinear(nn.Module):
    """Drop-in for a CPU `nn.Linear` whose weight runs with another kernel than `F.linear`: packed (`pack`),
    row-split (`RowSplit`), native (`NativeWeight`) or quantized (`QuantizedWeight`); keeps its shape for
    code that reads it."""

    def __init__(
        self, weight: torch.Tensor | RowSplit | NativeWeight | QuantizedWeight, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.kernel_weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.kernel_weight, self.bias)

    def extra_repr(self) -> str:
        w = self.kernel_weight
        if type(w) is NativeWeight:
            return f"in_features={self.in_features}, out_features={self.out_features}, fiddlerc's C product up to {w.max_tokens} tokens"
        how = (
            f"{w.fmt} blocks"
            if type(w) is QuantizedWeight
            else {RowSplit: "row-split over two threads"}.get(type(w), "packed for oneDNN")
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, {how}"


def _time(fn, weights: list[torch.Tensor], x: torch.Tensor, rounds: int) -> float:
    """Median seconds per call, cycling through `weights` (larger than the caches together)."""

    def one_pass() -> None:
        for w in weights:
            fn(x, w)

    return median_seconds(one_pass, rounds) / len(weights)


def measure(
    shape: tuple[int, int],
    dtype: torch.dtype,
    rounds: int = 5,
    tokens_probed: tuple[int, ...] = _PROBE_TOKENS,
    among: tuple[str, ...] = KERNELS,
) -> dict[str, dict[int, float]]:
    """Microseconds per call of each kernel `among` those this CPU supports, by token count, for a weight
    `shape` (native: fiddlerc's C product at every count, however many tokens)."""
    out_f, in_f = shape
    n = pool_size(out_f * in_f * dtype.itemsize)
    gen = torch.Generator().manual_seed(0)
    plain = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(n)]
    candidates = {"reference": (F.linear, plain)}
    if can_pack(dtype) and "packed" in among:
        candidates["packed"] = (linear, [pack(w) for w in plain])
    if can_native(dtype) and "native" in among:
        candidates["native"] = (linear, [NativeWeight(w, max(tokens_probed)) for w in plain])
    result: dict[str, dict[int, float]] = {k: {} for k in candidates}
    for tokens in tokens_probed:
        x = torch.randn(tokens, in_f, generator=gen).to(dtype)
        for _ in range(2):  # alternate the kernels, keep each one's best median
            for name, (fn, weights) in candidates.items():
                us = _time(fn, weights, x, rounds) * 1e6
                result[name][tokens] = round(min(us, result[name].get(tokens, us)), 2)
    return result


def pick(timings: dict[str, dict[int, float]]) -> str:
    """The kernel fastest at 1 token (decode) that is no slower at 8 (prefill, batches); else the reference.
    Only native's one-token time counts: beyond the tokens where it measured faster (`native_tokens`) a
    native weight runs the reference."""
    best = "reference"
    for name, t in timings.items():
        ref = timings["reference"]
        holds = name == "native" or t[8] <= ref[8] * 1.03
        if name != "reference" and t[1] < ref[1] * 0.97 and holds:
            best = name if best == "reference" or t[1] < timings[best][1] else best
    return best


def native_tokens(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """The most tokens a call of a native weight of `shape` runs in fiddlerc's C product, not `F.linear`:
    the largest of `NATIVE_PROBE_TOKENS` up to which the C product measured faster at every probe (cached
    per machine), and never under matvec.MAX_TOKENS. A prompt's experts get a few tokens each in a
    model whose routing is uneven (seen here: 3-15 tokens of 128 for some experts of the benchmark model),
    where MKL's fp32 product of 1024 x 1024 took ~0.5 ms whatever the count up to 16 and the C one
    0.13-0.45 ms; with AVX512-BF16, oneDNN's bf16 product wins from 3 tokens on."""
    if shape[0] * shape[1] * dtype.itemsize < MIN_AUTO_BYTES or not can_native(dtype):
        return matvec.MAX_TOKENS

    def compute() -> dict:
        timings = measure(shape, dtype, tokens_probed=NATIVE_PROBE_TOKENS, among=("reference", "native"))
        return {"microseconds_by_tokens": timings, "tokens": crossover(timings)}

    try:
        return max(matvec.MAX_TOKENS, int(_cached("n1", shape, dtype, compute)["tokens"]))
    except (KeyError, TypeError, ValueError):  # a malformed entry (edited by hand)
        return matvec.MAX_TOKENS


def crossover(timings: dict[str, dict[int, float]]) -> int:
    """The largest probed token count up to which native beat the reference by 3 % at every probe; 0 if
    it did not at the first."""
    best = 0
    for tokens in sorted(timings["reference"]):
        if timings["native"][tokens] > timings["reference"][tokens] * 0.97:
            break
        best = tokens
    return best


def _cached(kind: str, shape: tuple[int, int], dtype: torch.dtype, compute) -> dict:
    """`compute()`'s document for this machine, thread count, weight shape and dtype and the build of the C
    kernels (another build may be faster at other calls): from the cache beside the calibration profiles
    when there, else measured and stored (fiddlerc.measure)."""
    key = [torch.get_num_threads(), list(shape), str(dtype), quant.build()]

    def read(text: bytes) -> dict:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a measurement")
        return doc

    return cached(cache_path(f"kernel-{kind}", key), lambda: json.dumps(compute(), indent=1) + "\n", read)


def choose(shape: tuple[int, int], dtype: torch.dtype, among: tuple[str, ...] = KERNELS) -> str:
    """The measured fastest kernel `among` these for a CPU weight of `shape` at this thread count (measured
    once for all kernels, cached per machine)."""
    if shape[0] * shape[1] * dtype.itemsize < MIN_AUTO_BYTES or not (can_pack(dtype) or can_native(dtype)):
        return "reference"

    def compute() -> dict:
        timings = measure(shape, dtype)
        return {"microseconds_by_tokens": timings, "kernel": pick(timings)}

    doc = _cached("k2", shape, dtype, compute)
    # the choice among `among` is made from the cached timings; a malformed entry (edited by hand): the reference
    try:
        measured = doc["microseconds_by_tokens"].items()
        timings = {k: {int(n): float(us) for n, us in t.items()} for k, t in measured if k in among and k in KERNELS}
        return pick(timings) if "reference" in timings else "reference"
    except (AttributeError, KeyError, TypeError, ValueError):
        return "reference"


def measure_spread(shape: tuple[int, int], dtype: torch.dtype, kernel: str, rounds: int = 5) -> dict[str, float]:
    """Microseconds for two one-token calls on different weights of `shape`: one after the other on
    this thread (`serial`, each with the intra-op threads), and at once, the second on another thread
    (`spread`), as the CPU worker would run it. Weights cycle through more than the caches."""
    out_f, in_f = shape
    n = 2 * pool_size(2 * out_f * in_f * dtype.itemsize)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(n)]
    if kernel == "packed":
        weights = [pack(w) for w in weights]
    elif kernel == "native":
        weights = [NativeWeight(w) for w in weights]
    pairs = list(zip(weights[0::2], weights[1::2], strict=True))
    x = torch.randn(1, in_f, generator=gen).to(dtype)
    other = CpuWorker(torch.get_num_threads())

    def serial(x, pair):
        linear(x, pair[0])
        linear(x, pair[1])

    def spread(x, pair):
        done = other.submit(linear, x, pair[1])
        linear(x, pair[0])
        done.result()

    best: dict[str, float] = {}
    try:
        for _ in range(2):  # alternate, keep each one's best median
            for name, fn in (("serial", serial), ("spread", spread)):
                us = _time(fn, pairs, x, rounds) * 1e6
                best[name] = round(min(us, best.get(name, us)), 2)
    finally:
        other.close()
    return best


def spread_experts(shape: tuple[int, int], dtype: torch.dtype, kernel: str) -> bool:
    """Whether a token's experts should be spread over the main thread and the CPU worker on a
    CPU-only machine (measured with `kernel` on an expert matrix of `shape`; cached per machine): it
    pays where a one-token product leaves cores idle (MKL's fp32 matrix-vector product runs on one)."""
    if shape[0] * shape[1] * dtype.itemsize < MIN_AUTO_BYTES or torch.get_num_threads() < 2:
        return False

    def compute() -> dict:
        timings = measure_spread(shape, dtype, kernel)
        return {"microseconds_two_calls": timings, "spread": timings["spread"] < timings["serial"] * 0.97}

    return bool(_cached(f"s1-{kernel}", shape, dtype, compute).get("spread"))


def resolve(mode: str, shape: tuple[int, int], dtype: torch.dtype, among: tuple[str, ...] = KERNELS) -> str:
    """The kernel a weight gets under load(kernels=mode), `among` those its use allows."""
    if mode == "auto":
        return choose(shape, dtype, among)
    if mode not in among:
        return "reference"
    if (mode == "packed" and not can_pack(dtype)) or (mode == "native" and not can_native(dtype)):
        return "reference"
    return mode


class GroupedExperts:
    """A layer's SwiGLU experts (SiLU(gate x) * up x, then down; no biases), all quantized in one format
    (`_quant.c`'s fc_experts_silu) or all native float weights of one dtype (`_matvec.c`'s
    fc_experts_silu_float), run at one token in one C call for any subset of them. At one token of a
    fine-grained MoE (Qwen3: 8 experts of 768) the Python and call overhead of some twenty small ops per
    expert costs as much as the products; in C it goes, and a quantized group quantizes its input once.
    The C side also puts the picks in expert order and counts them, so a call needs no Python list of
    them. All arithmetic is fp32; the sum comes back fp32."""

    def __init__(self, experts: dict[int, tuple], num_experts: int | None = None) -> None:
        gate = next(iter(experts.values()))[0]
        self.quantized = type(gate) is QuantizedWeight
        self.code = FORMATS.index(gate.fmt) if self.quantized else matvec.KINDS[gate.dtype]  # the C files' codes
        self.inter, self.hidden = gate.shape
        self.experts = experts  # keeps the weights alive for the pointers below
        self.num_experts = num_experts or max(experts) + 1
        self.holds_all = len(experts) == self.num_experts
        # `tokens`: the most tokens a call takes, each expert then getting no more than its products were
        # measured faster for in the C product (NativeWeight.max_tokens, kernels.native_tokens); quantized: one
        self.max_tokens = 1 if self.quantized else min(m.max_tokens for ms in experts.values() for m in ms)

        def table(pointer) -> ctypes.Array:  # three per expert, NULL for those the group does not hold
            flat = [None] * (3 * self.num_experts)
            for e, ms in experts.items():
                flat[3 * e : 3 * e + 3] = [pointer(m) for m in ms]
            return (ctypes.c_void_p * len(flat))(*flat)

        if self.quantized:
            self.table, self.scales = table(lambda m: m.data.data_ptr()), table(lambda m: m.scales.data_ptr())
        else:
            self.table, self.scales = table(lambda m: m.weight.data_ptr()), None

    @staticmethod
    def accepts(ws: tuple, like: tuple) -> bool:
        """Whether an expert's (gate, up, down) can join a group whose first expert is `like`."""
        gate = like[0]
        if type(gate) is QuantizedWeight:
            same = all(type(m) is QuantizedWeight and m.fmt == gate.fmt for m in ws)
        else:
            same = type(gate) is NativeWeight and all(
                type(m) is NativeWeight and m.dtype == gate.dtype and matvec.supports(m.weight) for m in ws
            )
        return same and ws[0].shape == ws[1].shape == gate.shape and ws[2].shape == gate.shape[::-1]

    def __call__(
        self, x: torch.Tensor, picks: torch.Tensor | list[int], route: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum over `picks` of route[i] * expert(x), x [1, hidden], picks and route [k] (any order; the router's
        `top_k_index[0]` and `top_k_weights[0]`): fp32 [1, hidden]. `counts` (int64 [experts]) counts the picks."""
        lib = quant.library()
        if type(picks) is not torch.Tensor or picks.dtype is not torch.int64 or not picks.is_contiguous():
            picks = torch.as_tensor(picks).to(torch.int64).contiguous()
        xf, r = quant.as_f32(x), quant.as_f32(route)
        y = torch.empty(1, self.hidden, dtype=torch.float32)
        head = (self.code, picks.numel(), picks.data_ptr(), r.data_ptr(), self.table)
        tail = (self.num_experts, self.hidden, self.inter, xf.data_ptr(), y.data_ptr(),
                0 if counts is None else counts.data_ptr(), torch.get_num_threads(), int(lib.simd))  # fmt: skip
        if self.quantized:
            code = lib.lib.fc_experts_silu(*head, self.scales, *tail)
        else:
            code = lib.lib.fc_experts_silu_float(*head, *tail)
        return self._checked(code, picks, y)

    def tokens(
        self, x: torch.Tensor, picks: torch.Tensor, route: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Several tokens at once, x [T, hidden], picks and route [T, k]: fp32 [T, hidden], each token's sum over
        its picks, each expert's weights read once for all of its tokens (float groups: fc_experts_silu_float_tokens)."""
        if self.quantized:
            raise TypeError("the quantized group runs one token a call")
        lib = quant.library()
        picks = picks.to(torch.int64).contiguous()
        xf, r = quant.as_f32(x), quant.as_f32(route)
        y = torch.empty(x.shape[0], self.hidden, dtype=torch.float32)
        code = lib.lib.fc_experts_silu_float_tokens(
            self.code, x.shape[0], picks.shape[1], picks.data_ptr(), r.data_ptr(), self.table, self.num_experts,
            self.hidden, self.inter, xf.data_ptr(), y.data_ptr(), 0 if counts is None else counts.data_ptr(),
            torch.get_num_threads(), int(lib.simd),
        )  # fmt: skip
        return self._checked(code, picks, y)

    def _checked(self, code: int, picks: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if code == -1:
            raise ValueError(f"experts {picks.tolist()}: not all of them are in this group of {self.num_experts}")
        if code != 0:
            raise MemoryError("fiddlerc's grouped expert kernel could not allocate its buffers")
        return y

"""Placed experts: a drop-in for a transformers experts module whose experts live on two tiers.

Called exactly like the module it replaces, `experts(hidden [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`, inside Hugging Face's own MoE block (router, shared experts
and gating stay Hugging Face's code). Per call:

1. the routing indices cross to the host once;
2. the tokens of cpu-tier experts are gathered and copied to the host, and the CPU worker starts
   on them (weights never move: only activations);
3. meanwhile the fast device runs its resident experts, and cpu-tier experts whose call is big
   enough (the plan's `fetch_min_tokens`) get their weights copied to it for this call;
4. the CPU results come back and everything is summed in expert order, as Hugging Face does.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import accumulate
from math import prod as math_prod

import torch
from torch import nn

from fiddlerc.plan import fetches
from fiddlerc.quant_format import QuantizedWeight, dequantize
from fiddlerc.runtime import kernels, quant
from fiddlerc.runtime.host_memory import host_copy
from fiddlerc.runtime.matvec import NativeWeight
from fiddlerc.runtime.trace import COPIES, MAIN, WORKER, Tracer
from fiddlerc.runtime.worker import CpuWorker

_NO_SPAN = nullcontext()  # reusable: what `_span` gives when no trace is recorded


@dataclass
class ExpertWeights:
    """One expert's weights in `F.linear` layout ([out, in]; transposed checkpoints are viewed, not copied).

    `w_in` is the input projection: one tensor ([2I, H] gate and up, or [I, H] up only) or, where
    the gate can be applied to its halves, the two halves (gate [I, H], up [I, H]).
    """

    w_in: tuple[torch.Tensor, ...]
    b_in: tuple[torch.Tensor, ...] | None
    w_out: torch.Tensor  # [H, I]
    b_out: torch.Tensor | None

    def to(self, device: torch.device, dtype: torch.dtype | None) -> ExpertWeights:
        """On a device, in a dtype (None: keep it); no copy when both already match: stays memory-mapped."""

        def move(t: torch.Tensor | QuantizedWeight | NativeWeight | None) -> torch.Tensor | None:
            if isinstance(t, QuantizedWeight):  # a fetch of a quantized cpu-tier expert: its values, dequantized
                return dequantize(t, dtype or t.dtype).to(device)
            if isinstance(t, NativeWeight):
                t = t.weight
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return ExpertWeights(
            tuple(move(t) for t in self.w_in),
            None if self.b_in is None else tuple(move(t) for t in self.b_in),
            move(self.w_out),
            move(self.b_out),
        )

    @property
    def matrices(self) -> tuple[torch.Tensor, ...]:
        return (*self.w_in, self.w_out)

    def in_host_memory(self, dtype: torch.dtype, release: Callable[[torch.Tensor], None]) -> ExpertWeights:
        """A CPU copy in `dtype` with each matrix in huge-page host memory (fiddlerc.runtime.host_memory);
        each original goes to `release` once copied. Biases are only converted."""

        def copy(t: torch.Tensor) -> torch.Tensor:
            c = host_copy(t, dtype)
            release(t)
            return c

        def convert(b: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
            return None if b is None else tuple(t.to(dtype=dtype) for t in b)

        b_out = None if self.b_out is None else self.b_out.to(dtype=dtype)
        return ExpertWeights(tuple(copy(t) for t in self.w_in), convert(self.b_in), copy(self.w_out), b_out)

    def native(self, which: Callable[[torch.Tensor], int]) -> ExpertWeights:
        """The same tensors, the matrices `which` picks read by fiddlerc's C product (fiddlerc.runtime.matvec)
        in calls of up to `which(matrix)` tokens (0: not picked)."""

        def wrap(t: torch.Tensor) -> torch.Tensor | NativeWeight:
            tokens = which(t)
            return NativeWeight(t, tokens) if tokens else t

        return ExpertWeights(tuple(wrap(t) for t in self.w_in), self.b_in, wrap(self.w_out), self.b_out)

    def packed(self, release: Callable[[torch.Tensor], None]) -> ExpertWeights:
        """A copy with the matrices in oneDNN's packed layout (CPU, fiddlerc.runtime.kernels); each
        original goes to `release` once copied. Biases stay as they are."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            p = kernels.pack(t)
            release(t)
            return p

        return ExpertWeights(tuple(pack(t) for t in self.w_in), self.b_in, pack(self.w_out), self.b_out)


def _grouped(weights: list[ExpertWeights], on_host: tuple[bool, ...], math) -> kernels.GroupedExperts | None:
    """The experts that run on the host at one token as one `kernels.GroupedExperts`, where all are SwiGLU
    experts with SiLU, no biases and the routing weight on the output, quantized alike or native alike;
    else None."""
    cpu = {e: w for e, w in enumerate(weights) if on_host[e]}
    if not cpu or not groupable(math):
        return None
    first = next(iter(cpu.values()))
    if len(first.w_in) != 2 or type(first.w_out) not in (QuantizedWeight, NativeWeight) or not quant.available():
        return None
    like = (*first.w_in, first.w_out)
    for w in cpu.values():
        if len(w.w_in) != 2 or w.b_in is not None or w.b_out is not None:
            return None
        if not kernels.GroupedExperts.accepts((*w.w_in, w.w_out), like):
            return None
    return kernels.GroupedExperts({e: (*w.w_in, w.w_out) for e, w in cpu.items()}, len(weights))


def groupable(math) -> bool:
    """Whether the family's experts compute what `kernels.GroupedExperts` does: SiLU(gate x) * up x, with
    the routing weight applied to the output."""
    return math.split_gate and not math.scale_input and _is_silu(math.act)


def _is_silu(act) -> bool:
    """Whether the family's activation computes SiLU (checked on a probe, whatever module wraps it)."""
    if act is None:
        return False
    t = torch.linspace(-8, 8, 257)
    try:
        return torch.allclose(act(t), torch.nn.functional.silu(t), rtol=0, atol=1e-6)
    except (TypeError, RuntimeError):
        return False


def run_expert(x: torch.Tensor, w: ExpertWeights, math) -> torch.Tensor:
    """One expert on the tokens routed to it: x [n, H] -> [n, H]. `math` says how it computes: the
    family's activation, gate and flags (fiddlerc.model.families.ExpertMath, read off the model)."""
    b_in = w.b_in or (None,) * len(w.w_in)
    linear = kernels.linear
    xin = kernels.shared_input(x, w.w_in)
    if math.split_gate:
        h = math.act(linear(xin, w.w_in[0], b_in[0])) * linear(xin, w.w_in[1], b_in[1])
    else:
        parts = [linear(xin, p, b) for p, b in zip(w.w_in, b_in, strict=True)]
        proj = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        h = math.gate(proj) if math.gate is not None else math.act(proj)
    return linear(h, w.w_out, w.b_out)


class PlacedExperts(nn.Module):
    def __init__(
        self,
        weights: list[ExpertWeights],
        on_cpu: tuple[bool, ...],
        math,
        fast_device: torch.device,
        worker: CpuWorker,
        layer: int,
        fetch_min_tokens: tuple[int | None, ...] | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = len(weights)
        self.weights = weights
        self.on_cpu = on_cpu
        self.math = math
        self.fast_device = fast_device
        self.worker = worker
        self.layer = layer
        self.fetch_min_tokens = fetch_min_tokens or (None,) * self.num_experts  # the plan's execution policy
        self.tokens_fetched = 0  # tokens of cpu-tier experts whose weights were copied to the fast device
        self.tokens_fast = 0  # routed (token, expert) pairs served by each tier, for routing_stats()
        self.tokens_cpu = 0
        self.expert_tokens = [0] * self.num_experts  # routed tokens per expert
        self.observer: Callable[[int, torch.Tensor], None] | None = None  # sees (layer, picks [T, k]) per call
        self.tracer: Tracer | None = None  # records a timeline when set (fiddlerc.runtime.trace)
        self._pinned: dict[str, torch.Tensor] = {}  # staging buffers for GPU <-> CPU-worker activations
        # Micro-batching: while `deferred` names a micro-batch, a call returns the fast tier's part at
        # once and leaves its CPU experts running; `finish(micro_batch)` returns their part later.
        self.deferred: int | None = None
        self._pending: dict[int, tuple] = {}
        # CPU-only decode: spread a token's experts over the main thread and the worker whatever their
        # tier (set by the loader where measured to pay: fiddlerc.runtime.kernels.spread_experts).
        self.spread = False
        # CPU-only decode: a token's experts in one C call where they are quantized or native SwiGLU experts
        # (every expert where the fast device is this CPU too, else the cpu tier's).
        self.grouped = _grouped(weights, on_cpu if fast_device.type != "cpu" else (True,) * len(weights), math)
        self.decode_counts = torch.zeros(self.num_experts, dtype=torch.int64)  # that call's picks, counted in C

    def extra_repr(self) -> str:
        n_cpu = sum(self.on_cpu)
        return f"layer={self.layer}, experts={self.num_experts}, fast={self.num_experts - n_cpu} on {self.fast_device}, cpu={n_cpu}"

    def _expert(self, e: int, x: torch.Tensor, w: torch.Tensor, weights: ExpertWeights | None = None) -> torch.Tensor:
        """Expert e on its tokens x [n, H] with their routing weights w [n, 1]."""
        weights = weights or self.weights[e]
        if self.math.scale_input:
            return run_expert(x * w, weights, self.math)
        return run_expert(x, weights, self.math) * w

    def one_call_ready(self) -> bool:
        """Whether one token's experts run as one grouped call on this thread, counted in `decode_counts`: where
        the group holds every expert (a CPU load, whose grouped experts get an inline worker), unless picks are
        spread over two threads, observed, traced, or deferred (micro-batching)."""
        g = self.grouped
        quiet = self.observer is None and self.tracer is None and self.deferred is None
        return g is not None and g.holds_all and not self.spread and quiet

    def tokens_at_once(self, tokens: int) -> bool:
        """Whether a call of a few tokens (a batched decode step) runs as one C call over float experts, which
        reads each expert's weights once for all of its tokens: up to the tokens its C products were measured
        faster for (GroupedExperts.max_tokens); longer calls (prompts) get F.linear's matrix products."""
        return self.one_call_ready() and tokens <= self.grouped.max_tokens

    def _token_by_token(self, tokens: int, k: int) -> bool:
        """Whether a call of several tokens runs token by token through the grouped call: where its experts are
        small (each under kernels.MIN_AUTO_BYTES, where a product costs less than the twenty-odd ops an
        expert's batch costs in Python) and each expert the call reaches gets few of its tokens (at most 4
        on average: fine-grained routing, Qwen3's 8 of 128), so batching them by expert saves little reading."""
        if not self.one_call_ready() or tokens * k > 4 * self.num_experts:
            return False
        first = self.weights[next(iter(self.grouped.experts))]
        return sum(m.nbytes for m in first.matrices) < kernels.MIN_AUTO_BYTES

    def counts(self) -> tuple[int, int, int, list[int]]:
        """Routed (token, expert) pairs since load: served by the fast tier, the cpu tier, fetched; per expert."""
        decode = self.decode_counts.tolist()
        cpu = sum(n for e, n in enumerate(decode) if self.on_cpu[e])
        per_expert = [a + b for a, b in zip(self.expert_tokens, decode, strict=True)]
        return self.tokens_fast + sum(decode) - cpu, self.tokens_cpu + cpu, self.tokens_fetched, per_expert

    def _span(self, name: str, track: str = MAIN, **args):
        return self.tracer.span(f"L{self.layer} {name}", track, **args) if self.tracer is not None else _NO_SPAN

    def run_cpu(
        self,
        jobs: list[tuple[int, torch.Tensor, torch.Tensor]],
        ready: torch.cuda.Event | None = None,
        out: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Worker side: each job is (expert, tokens [n, H] on host, routing weights [n, 1] on host).
        With a GPU: `ready` marks the end of the copies into the pinned inputs (the worker waits for
        it, the main thread does not), and the results go into the pinned `out` rows, job after job."""
        if ready is not None:
            ready.synchronize()
        results, row = [], 0
        for e, x, w in jobs:
            with self._span(f"E{e} cpu", WORKER, tokens=x.shape[0]):
                y = self._expert(e, x, w)
            if out is not None:
                out[row : row + y.shape[0]].copy_(y)
                y = out[row : row + y.shape[0]]
            results.append(y)
            row += y.shape[0]
        return results

    def _staging(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer of this layer, grown as needed and reused. Safe to reuse: the next call
        of this layer starts with the routing copy, which waits for the copies of the previous one."""
        need = math_prod(shape)
        buf = self._pinned.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < need:
            buf = torch.empty(max(need, 2 * (buf.numel() if buf is not None else 0)), dtype=dtype, pin_memory=True)
            self._pinned[name] = buf
        return buf[:need].view(shape)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        with self._span("moe", tokens=hidden_states.shape[0]):
            return self._forward(hidden_states, top_k_index, top_k_weights)

    def _forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if hidden_states.device.type == "cpu" and self.deferred is None:
            out = self._forward_on_cpu(hidden_states, top_k_index, top_k_weights)
            if out is not None:
                return out
        k = top_k_index.shape[1]
        # [T*k] flat routing on the host: the one synchronisation of this layer.
        flat = top_k_index.reshape(-1).to("cpu")
        if self.observer is not None:  # counting routes (fiddlerc popularity): which experts each token picked
            self.observer(self.layer, flat.view(-1, k))
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        hit = [e for e, c in enumerate(counts) if c]
        starts = [0, *accumulate(counts)]

        def rows(e: int) -> tuple[torch.Tensor, torch.Tensor]:
            sel = order[starts[e] : starts[e + 1]]
            return sel // k, sel % k  # token index, top-k slot

        fast_hit, cpu_hit, fetched = [], [], []
        for e in hit:
            if not self.on_cpu[e]:
                fast_hit.append(e)
            elif fetches(self.fetch_min_tokens[e], counts[e]):
                fetched.append(e)  # a big call of a cpu-tier expert: copy its weights rather than its tokens
            else:
                cpu_hit.append(e)
        self.tokens_cpu += sum(counts[e] for e in cpu_hit)
        self.tokens_fast += sum(counts[e] for e in fast_hit)
        self.tokens_fetched += sum(counts[e] for e in fetched)
        for e in hit:
            self.expert_tokens[e] += counts[e]

        future = None
        cpu_tokens = {}  # expert -> its token indices on the fast device, for the combine
        host_out = None
        if cpu_hit:
            dev = hidden_states.device
            with self._span("to host", COPIES):
                picked = [rows(e) for e in cpu_hit]
                for e, (tok, _) in zip(cpu_hit, picked, strict=True):
                    cpu_tokens[e] = tok.to(dev)
                if dev.type == "cuda":  # one gather, one async copy into pinned memory, an event for the worker
                    tok_d = torch.cat([cpu_tokens[e] for e in cpu_hit])
                    slot_d = torch.cat([slot for _, slot in picked]).to(dev)
                    xs, ws = hidden_states[tok_d], top_k_weights[tok_d, slot_d, None]
                    mb = self.deferred or 0  # micro-batches in flight together need their own buffers
                    host_x = self._staging(f"x{mb}", tuple(xs.shape), xs.dtype)
                    host_w = self._staging(f"w{mb}", tuple(ws.shape), ws.dtype)
                    host_x.copy_(xs, non_blocking=True)
                    host_w.copy_(ws, non_blocking=True)
                    host_out = self._staging(f"y{mb}", tuple(xs.shape), xs.dtype)
                    ready = torch.cuda.Event()
                    ready.record(torch.cuda.current_stream(dev))
                    bounds = [0, *accumulate(len(tok) for tok, _ in picked)]
                    jobs = [(e, host_x[a:b], host_w[a:b]) for e, a, b in zip(cpu_hit, bounds, bounds[1:], strict=False)]
                    future = self.worker.submit(self.run_cpu, jobs, ready, host_out)
                else:  # the fast device is the CPU: the worker reads the activations where they are
                    jobs = [
                        (e, hidden_states[tok], top_k_weights[tok, slot, None])
                        for e, (tok, slot) in zip(cpu_hit, picked, strict=True)
                    ]
                    future = self.worker.submit(self.run_cpu, jobs)

        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        copies = self._fetch_copies(fetched, hidden_states.device) if fetched else None
        for e in fast_hit + fetched:  # overlaps with the worker
            tok, slot = rows(e)
            tok_d, slot_d = tok.to(hidden_states.device), slot.to(hidden_states.device)
            weights = self.weights[e] if not self.on_cpu[e] else next(copies)  # fetched: copied for this call
            x, w = hidden_states[tok_d], top_k_weights[tok_d, slot_d, None]
            home = weights.w_out.device  # another GPU of a multi-GPU plan: activations go there and back
            with self._span(f"E{e} {'fetched' if self.on_cpu[e] else 'fast'}", tokens=x.shape[0]):
                if home != x.device:
                    y = self._expert(e, x.to(home), w.to(home), weights).to(x.device)
                else:
                    y = self._expert(e, x, w, weights)
            outputs[e] = (tok_d, y)

        if self.deferred is not None:  # micro-batching: the CPU part is added after the block (finish)
            self._pending[self.deferred] = (future, cpu_hit, cpu_tokens, host_out, hidden_states)
            with self._span("combine fast part"):
                final = torch.zeros_like(hidden_states)
                for e in hit:
                    if e in outputs:
                        tok, y = outputs[e]
                        final.index_add_(0, tok, y.to(final.dtype))
            return final
        self._collect(future, cpu_hit, cpu_tokens, host_out, hidden_states, outputs)
        with self._span("combine"):
            final = torch.zeros_like(hidden_states)
            for e in hit:  # expert order, as Hugging Face accumulates
                tok, y = outputs[e]
                final.index_add_(0, tok, y.to(final.dtype))
        return final

    def _forward_on_cpu(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor | None:
        """The CPU-only shortcuts, None where none applies: one token; a few tokens in one C call (a batched
        decode step); small fine-grained experts token by token."""
        if hidden_states.shape[0] == 1:
            return self._forward_one_token(hidden_states, top_k_index, top_k_weights)
        if self.tokens_at_once(hidden_states.shape[0]):
            out = self.grouped.tokens(hidden_states, top_k_index, top_k_weights, self.decode_counts)
            return out.to(hidden_states.dtype)
        if self._token_by_token(*top_k_index.shape):
            out = torch.empty_like(hidden_states)
            for t in range(hidden_states.shape[0]):  # each token's experts in one grouped call, as at decode
                out[t] = self.grouped(hidden_states[t], top_k_index[t], top_k_weights[t], self.decode_counts)[0]
            return out
        return None

    def _forward_one_token(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Decode of one sequence on a CPU-only machine: the same arithmetic without the gather and
        scatter bookkeeping of a batch (a few dozen small ops per layer, comparable to the experts
        themselves at this size). The picks the grouped call holds run in it, on the worker; else the
        cpu-tier experts run on the worker, beside the others; with `spread`, every other pick does,
        whatever its tier (both tiers are this CPU). Each part is summed in expert order."""
        if self.one_call_ready():  # the lean path: one call, which also orders and counts the picks (`counts()`)
            return self.grouped(hidden_states, top_k_index, top_k_weights, self.decode_counts).to(hidden_states.dtype)
        if self.observer is not None:
            self.observer(self.layer, top_k_index.reshape(1, -1).to("cpu"))
        picks = sorted((e, slot) for slot, e in enumerate(top_k_index[0].tolist()))  # expert order, as HF sums
        on_worker = picks[1::2] if self.spread else [(e, slot) for e, slot in picks if self.on_cpu[e]]
        for e, _ in picks:
            self.expert_tokens[e] += 1
        n_cpu = sum(self.on_cpu[e] for e, _ in picks)  # routing stats count tiers, not threads
        self.tokens_cpu += n_cpu
        self.tokens_fast += len(picks) - n_cpu
        future = None
        grouped = self.grouped is not None and not self.spread
        if grouped:  # one call for all those it holds, summed in expert order
            on_worker = [(e, slot) for e, slot in picks if e in self.grouped.experts]
        if grouped and on_worker:
            slots = [slot for _, slot in on_worker]
            future = self.worker.submit(self.grouped, hidden_states, [e for e, _ in on_worker], top_k_weights[0, slots])
        elif on_worker:
            jobs = [(e, hidden_states, top_k_weights[:, slot, None]) for e, slot in on_worker]
            future = self.worker.submit(self.run_cpu, jobs)
        outputs = {}
        for e, slot in picks:
            if (e, slot) not in on_worker:
                with self._span(f"E{e} {'cpu' if self.on_cpu[e] else 'fast'}", tokens=1):
                    outputs[e] = self._expert(e, hidden_states, top_k_weights[:, slot, None])
        final = None
        if future is not None:
            with self._span("wait for CPU"):
                if grouped:
                    final = future.result().to(hidden_states.dtype)
                else:
                    outputs.update(zip((e for e, _ in on_worker), future.result(), strict=True))
        for e, _ in picks:
            if e in outputs:
                y = outputs[e].to(hidden_states.dtype)
                final = y if final is None else final + y
        return final

    def _fetch_copies(self, fetched: list[int], device: torch.device):
        """The fetched experts' weights on `device`, in order. On a GPU the copies are double-buffered:
        the next expert's copy is issued on a side stream when the caller comes back for it, after it
        launched the current expert's compute, so the copy runs while that computes; the compute
        stream waits on each copy's event."""
        if device.type != "cuda":
            for e in fetched:
                with self._span(f"E{e} weights to device", COPIES):
                    yield self.weights[e].to(device, None)
            return
        if getattr(self, "_copy_stream", None) is None:
            self._copy_stream = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)

        def issue(e: int):
            with torch.cuda.stream(self._copy_stream), self._span(f"E{e} weights to device", COPIES):
                moved = self.weights[e].to(device, None)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            return moved, done

        pending = issue(fetched[0]) if fetched else None
        for j in range(len(fetched)):
            moved, done = pending
            compute.wait_event(done)
            for t in (*moved.w_in, moved.w_out, *(moved.b_in or ()), moved.b_out):
                if t is not None:
                    t.record_stream(compute)  # allocated on the copy stream, used on the compute stream
            yield moved  # the caller launches this expert's compute before asking for the next
            if j + 1 < len(fetched):
                pending = issue(fetched[j + 1])  # runs on the copy stream while that computes

    def _collect(self, future, cpu_hit, cpu_tokens, host_out, like: torch.Tensor, outputs: dict) -> None:
        """Wait for the CPU worker's results and put them, on the fast device, into `outputs`."""
        if future is None:
            return
        with self._span("wait for CPU"):
            results = future.result()
        if host_out is not None:  # one async copy back from pinned memory
            back = host_out.to(like.device, non_blocking=True)
            bounds = [0, *accumulate(y.shape[0] for y in results)]
            results = [back[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for e, y in zip(cpu_hit, results, strict=True):
            outputs[e] = (cpu_tokens[e], y)

    def finish(self, micro_batch: int) -> torch.Tensor | None:
        """The CPU experts' part [T, H] of this layer's deferred call for `micro_batch` (None: none ran)."""
        future, cpu_hit, cpu_tokens, host_out, like = self._pending.pop(micro_batch)
        if future is None:
            return None
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._collect(future, cpu_hit, cpu_tokens, host_out, like, outputs)
        with self._span("combine CPU part"):
            part = torch.zeros_like(like)
            for e in cpu_hit:
                tok, y = outputs[e]
                part.index_add_(0, tok, y.to(part.dtype))
        return part

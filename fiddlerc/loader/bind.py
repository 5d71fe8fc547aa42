"""Binding weights: every parameter of the meta model gets its tensor, where the plan puts it, in the
layout the kernel that runs it reads.

Weights are memory-mapped from the model's safetensors files and copied only to change device or
dtype, to fuse QKV rows, or to pack a CPU matrix for the kernel chosen for it
(fiddlerc.runtime.kernels). Where the machine allows, the CPU matrices copied anyway land in
transparent huge pages (fiddlerc.runtime.host_memory), which a one-token product streams faster; a
weight that needs no copy stays mapped. Mapped pages of a copied weight are released, so resident
memory holds each weight once. Where the plan quantizes (`expert_dtype`, `dense_dtype`), the cpu-tier
experts, and on a CPU-only load the dense projections, come memory-mapped from the compiled folder's
QUANTIZED_FILE instead (fiddlerc.model.quantize wrote it; nothing is quantized here).

The steps run in this order, each a method of `WeightBinder`: dense tensors and buffers; the experts
of every MoE layer (a `PlacedExperts` module installed in each block); the decision whether big
one-token products split their rows over two threads (which needs the experts' measured spread);
then the generated attention layers' fused weights and the remaining CPU linears, placed by that
decision; last, on a CPU load, the MoE blocks that route one token in C (fiddlerc.runtime.routing)
take their blocks' places.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fiddlerc.compiler.attention import PROJECTIONS
from fiddlerc.errors import ArtifactError
from fiddlerc.loader.devices import device_map
from fiddlerc.model.families import Layout, find_layout
from fiddlerc.model.folder import ModelFolder
from fiddlerc.model.quantize import QUANTIZED_FILE, dense_key, matrix_key
from fiddlerc.model.weights import DirectSource, ExpertTensors, Source, WeightReader, resolve_sources
from fiddlerc.plan import CPU, GENERATED, MoeLayer, Plan
from fiddlerc.progress import progress
from fiddlerc.quant_format import QuantizedWeight
from fiddlerc.runtime import kernels, matvec, quant, routing
from fiddlerc.runtime.attention import AttentionWeights, fuse_qkv, head_norm_rows
from fiddlerc.runtime.experts import ExpertWeights, PlacedExperts, groupable
from fiddlerc.runtime.host_memory import host_copy, huge_pages_available, return_freed_heap
from fiddlerc.runtime.matvec import NativeWeight
from fiddlerc.runtime.worker import CpuWorker, InlineWorker
from fiddlerc.units import parse_dtype


@dataclass(frozen=True)
class Bound:
    """What binding produced beside the model's own parameters."""

    placed: tuple[PlacedExperts, ...]  # one per MoE layer, in plan order
    attention: dict[int, AttentionWeights]  # generated attention layer -> its fused weights


def bind_weights(
    model: nn.Module,
    folder: ModelFolder,
    plan: Plan,
    fast: torch.device,
    worker: CpuWorker,
    kernel_mode: str = "reference",
    sources: dict[str, Source] | None = None,
    quantized: ModelFolder | None = None,
) -> Bound:
    """Put every weight of `model` (built on the meta device) where `plan` says, on this machine's
    `fast` device and the CPU, for the kernels `kernel_mode` picks (see the module docstring).
    `quantized` is the compiled folder's QUANTIZED_FILE where the plan quantizes weights."""
    binder = WeightBinder(model, folder, plan, fast, worker, kernel_mode, sources, quantized)
    binder.bind_dense()
    placed = tuple(binder.bind_experts(ml) for ml in progress(plan.moe_layers, "binding MoE layers"))
    binder.split_rows = binder.rows_split(placed)
    attention = {a.layer: binder.bind_attention(a.module) for a in plan.attention if a.path == GENERATED}
    binder.bind_linears()
    for ml, p in zip(plan.moe_layers, placed, strict=True):
        binder.route_in_c(ml.block, p)
    binder.finish()
    return Bound(placed, attention)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class WeightBinder:
    """The state one binding shares between its steps: the memory maps, the converted dense tensors
    (tied weights share one), the kernel choices, and whether big products split their rows."""

    def __init__(
        self,
        model: nn.Module,
        folder: ModelFolder,
        plan: Plan,
        fast: torch.device,
        worker: CpuWorker,
        kernel_mode: str,
        sources: dict[str, Source] | None,
        quantized: ModelFolder | None = None,
    ) -> None:
        self.model, self.plan, self.fast, self.worker, self.kernel_mode = model, plan, fast, worker, kernel_mode
        self.dtype = parse_dtype(plan.model.dtype)
        self.sources = sources if sources is not None else resolve_sources(model, folder)
        self.reader = WeightReader(folder)
        self.experts = ExpertTensors(model, self.reader, self.sources, self.dtype)
        self.fmt = plan.target.expert_dtype
        # Quantized dense projections run where the dense weights run on the CPU; on a GPU, the compute dtype.
        self.dense_fmt = plan.target.dense_dtype if fast.type == "cpu" else None
        wanted = self.fmt or self.dense_fmt
        if wanted is not None and (quantized is None or not quant.available()):
            why = (
                "its quantized weights were not given"
                if quantized is None
                else "fiddlerc's quantized kernels were not built"
            )
            raise ArtifactError(
                f"this model's CPU weights are {wanted}, and {why}: reinstall fiddlerc on a machine with a C compiler, "
                "or recompile without --expert-dtype/--dense-dtype"
            )
        self.quantized = WeightReader(quantized) if quantized is not None else None
        self.huge_pages = huge_pages_available()
        self.devices = device_map(plan, fast)
        self.converted: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._memo: dict[tuple, object] = {}
        self.split_rows = False  # set by bind_weights from `rows_split`, before any dense matrix is placed
        self.layouts: dict[int, Layout] = {}
        hidden = getattr(model.config, "hidden_size", None)
        for ml in plan.moe_layers:
            layout = find_layout(model.get_submodule(ml.block), hidden)
            if layout is None or layout.name != ml.layout:
                raise ArtifactError(f"{ml.block} is no longer a {ml.layout} MoE block: recompile")
            self.layouts[ml.layer] = layout
        self.expert_names = {
            f"{ml.block}.{name}"
            for ml in plan.moe_layers
            for name in self.layouts[ml.layer].expert_params(model.get_submodule(ml.block))
        }

    # -- kernel choices, measured once per shape on this machine (cached by fiddlerc.runtime.kernels)

    # Caches held by the binder itself (not functools.cache on the methods, which would keep every binder,
    # and the model it bound, alive after its load).

    def kernel_for(self, shape: tuple[int, int], dtype: torch.dtype, packing: bool = True) -> str:
        """The kernel for a CPU weight; `packing` False: among those that read the weight as bound."""
        key = ("kernel", shape, dtype, packing)
        if key not in self._memo:
            among = kernels.KERNELS if packing else tuple(k for k in kernels.KERNELS if k != "packed")
            self._memo[key] = kernels.resolve(self.kernel_mode, shape, dtype, among)
        return self._memo[key]

    def native_tokens(self, w: torch.Tensor) -> int:
        """The most tokens a call of native weight `w` runs in the C product: measured under auto
        (kernels.native_tokens), matvec.MAX_TOKENS under native."""
        if self.kernel_mode != "auto":
            return matvec.MAX_TOKENS
        key = ("native-tokens", tuple(w.shape), w.dtype)
        if key not in self._memo:
            self._memo[key] = kernels.native_tokens(tuple(w.shape), w.dtype)
        return self._memo[key]

    def spread_for(self, shape: tuple[int, int], dtype: torch.dtype, kernel: str) -> bool:
        key = ("spread", shape, dtype, kernel)
        if key not in self._memo:
            self._memo[key] = kernels.spread_experts(shape, dtype, kernel)
        return self._memo[key]

    # -- steps

    def bind_dense(self) -> None:
        """Every tensor that is not a routed expert, on the fast device; computed buffers (rotary tables)
        follow."""
        buffers = dict(self.model.named_buffers())
        for name, src in self.sources.items():
            if name in self.expert_names:
                continue
            assert isinstance(src, DirectSource)
            want = buffers[name].dtype if name in buffers else self.dtype
            key = (src.key, self.fast)
            if key not in self.converted:
                self.converted[key] = self.reader.get(src.key).to(device=self.fast, dtype=want)
            _set_tensor(self.model, name, self.converted[key])
        for name, buf in self.model.named_buffers():
            if name not in self.sources:
                _set_tensor(self.model, name, buf.to(self.fast))

    def bind_experts(self, ml: MoeLayer) -> PlacedExperts:
        """One MoE layer's experts, each where the plan puts it, installed in its block."""
        block, layout = self.model.get_submodule(ml.block), self.layouts[ml.layer]
        placement = self.plan.placement(ml.layer)
        fetch = tuple(
            e.fetch_min_tokens for e in sorted(self.plan.experts, key=lambda e: e.expert) if e.layer == ml.layer
        )
        # Packed where an expert runs on the CPU and is never fetched. Under "auto", only beside a GPU: on a
        # CPU-only machine both tiers run at once, each on its own core, where MKL's single-threaded
        # matrix-vector product measured as fast as packed (fiddlerc.runtime.kernels).
        alone = self.fast.type != "cpu" or self.kernel_mode == "packed"
        # CPU-only under "auto", experts that can run as one C call per token (kernels.GroupedExperts) are
        # bound for it, whatever one product alone measured: the call saves some twenty ops per expert.
        math = layout.math(block)
        grouping = self.fast.type == "cpu" and self.kernel_mode == "auto" and groupable(math)
        weights = []
        for e, dev in enumerate(placement):
            w = ExpertWeights(*self.experts.expert(layout, ml.block, ml.experts_module, e))
            if self.fmt is not None and dev == CPU:
                weights.append(self.quantized_expert(ml.layer, e, w))
                continue
            on_host = self.devices[dev].type == "cpu"
            stays_on_cpu = on_host and (self.fast.type == "cpu" or fetch[e] is None)
            packing = alone and stays_on_cpu

            def kernel(m: torch.Tensor) -> str:
                if grouping and kernels.can_native(self.dtype):
                    return "native"
                return self.kernel_for(tuple(m.shape), self.dtype, packing)

            kinds = {kernel(m) for m in w.matrices}
            if packing and kinds == {"packed"}:
                w = w.to(self.devices[dev], self.dtype).packed(self.reader.release)
            elif on_host and self.huge_pages and any(m.dtype != self.dtype for m in w.matrices):
                w = w.in_host_memory(self.dtype, self.reader.release)
            else:
                w = w.to(self.devices[dev], self.dtype)
            if on_host and "native" in kinds:  # a fetch reads the tensors underneath
                w = w.native(lambda m: self.native_tokens(m) if kernel(m) == "native" and matvec.supports(m) else 0)
            weights.append(w)
        # CPU-only with kernels that use every core themselves (quantized, native): the cpu tier runs on the
        # calling thread
        native = any(type(m) is NativeWeight for w in weights for m in w.matrices)
        own_threads = self.fmt is not None or native
        worker = InlineWorker() if own_threads and self.fast.type == "cpu" else self.worker
        module = PlacedExperts(weights, tuple(d == CPU for d in placement), math, self.fast, worker, ml.layer, fetch)
        if self.fast.type == "cpu" and not own_threads:
            biggest = max(weights[0].matrices, key=lambda m: m.numel())
            kernel = "packed" if biggest.is_mkldnn else "reference"
            module.spread = self.spread_for(tuple(biggest.shape), biggest.dtype, kernel)
        layout.install(block, module)
        return module

    def route_in_c(self, path: str, placed: PlacedExperts) -> None:
        """CPU load under auto/native: a MoE block of a plain kind whose experts run as one grouped call is
        replaced by a `routing.OneTokenMoe` that routes one token in C (the last step: names of the block's
        parameters change under it)."""
        block = self.model.get_submodule(path)
        gate = getattr(block, "gate", None)
        router, top_k = getattr(gate, "weight", None), getattr(gate, "top_k", None)
        if self.fast.type != "cpu" or self.kernel_mode not in ("auto", "native") or not isinstance(top_k, int):
            return
        if type(block).__name__ not in routing.PLAIN_BLOCKS or placed.grouped is None or not placed.grouped.holds_all:
            return
        if not routing.OneTokenMoe.accepts(router):
            return
        key = ("router", type(gate), top_k)  # every layer's router is of one class and config: probed once
        if key not in self._memo:
            self._memo[key] = routing.router_form(gate, self.model.config, top_k)
        normalise = self._memo[key]
        if normalise is not None:
            parent, _, leaf = path.rpartition(".")
            setattr(self.model.get_submodule(parent), leaf, routing.OneTokenMoe(block, top_k, normalise, placed))

    def quantized_expert(self, layer: int, e: int, stored: ExpertWeights) -> ExpertWeights:
        """A cpu-tier expert's matrices from QUANTIZED_FILE (memory-mapped, quantized at compile time); its
        biases from the model folder, in the compute dtype."""

        def matrix(part: str, like: torch.Tensor) -> QuantizedWeight:
            key = matrix_key(layer, e, part)
            qw = QuantizedWeight(
                self.fmt, self.quantized.get(f"{key}.data"), self.quantized.get(f"{key}.scales"), self.dtype
            )
            if qw.shape != tuple(like.shape):
                raise ArtifactError(
                    f"{key} in {QUANTIZED_FILE} is {qw.shape}, the model's is {tuple(like.shape)}: recompile"
                )
            return qw

        def convert(b: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
            return None if b is None else tuple(t.to(dtype=self.dtype) for t in b)

        w_in = tuple(matrix(f"in{i}", m) for i, m in enumerate(stored.w_in))
        b_out = None if stored.b_out is None else stored.b_out.to(dtype=self.dtype)
        return ExpertWeights(w_in, convert(stored.b_in), matrix("out", stored.w_out), b_out)

    def quantized_dense(self, module: str) -> QuantizedWeight | None:
        """The quantized weight of the dense `nn.Linear` at `module`, where the compile quantized it and the
        dense weights run on the CPU here."""
        key = dense_key(module)
        if self.dense_fmt is None or f"{key}.data" not in self.quantized.folder.tensors:
            return None
        data, scales = self.quantized.get(f"{key}.data"), self.quantized.get(f"{key}.scales")
        return QuantizedWeight(self.dense_fmt, data, scales, self.dtype)

    def rows_split(self, placed: tuple[PlacedExperts, ...]) -> bool:
        """CPU-only decode: where a token's experts spread over both threads (two one-token products at once
        beat one after the other), each big one-token dense product splits its rows over them too
        (kernels.RowSplit)."""
        return self.fast.type == "cpu" and self.kernel_mode == "auto" and any(p.spread for p in placed)

    def place(self, w: torch.Tensor) -> torch.Tensor | kernels.RowSplit | NativeWeight:
        """A dense matrix as its kernel reads it: row-split over this thread and the CPU worker, packed,
        native, or plain; a copy binding made (a dtype conversion, fused rows) moves into huge pages. Mapped source
        pages are released when a copy was made."""
        if w.device.type != "cpu" or w.ndim != 2:
            return w
        split = self.split_rows and w.numel() * w.element_size() >= kernels.MIN_AUTO_BYTES
        kernel = self.kernel_for(tuple(w.shape), w.dtype)
        out = w
        if not split and kernel == "packed":
            out = kernels.pack(w)
        elif self.huge_pages and not self.reader.maps(w):
            out = host_copy(w)
        if out is not w:
            self.reader.release(w)
        if split:
            return kernels.RowSplit(out, self.worker)
        return NativeWeight(out, self.native_tokens(out)) if kernel == "native" and matvec.supports(out) else out

    def bind_attention(self, path: str) -> AttentionWeights:
        """A generated attention layer's fused weights, in place of the Hugging Face module at `path`."""
        module = self.model.get_submodule(path)
        projections = [getattr(module, p) for p in PROJECTIONS]
        quantized = tuple(self.quantized_dense(f"{path}.{p}") for p in PROJECTIONS)
        use = quantized if all(q is not None for q in quantized) else None
        weights = fuse_qkv(*projections, self.place, self.reader.release, use, head_norm_rows(module))
        parent, _, leaf = path.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, weights)
        return weights

    def bind_linears(self) -> None:
        """Give each CPU `nn.Linear` its weight as `place` returns it: packed or row-split (the module becomes
        a KernelLinear), copied into huge pages, or as it is. A weight that another module shares (tied
        embeddings) stays as it is: its pages could not be released."""
        seen: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
        for name, module in list(self.model.named_modules()):
            if type(module) is not nn.Linear or module.weight.device.type == "meta":
                continue
            w = module.weight.detach()
            if seen.get(w.data_ptr(), 0) > 1:
                continue
            if (qw := self.quantized_dense(name)) is not None:
                self.reader.release(w)
                parent, _, leaf = name.rpartition(".")
                bias = None if module.bias is None else module.bias.detach()
                setattr(self.model.get_submodule(parent), leaf, kernels.KernelLinear(qw, bias))
                continue
            if (placed := self.place(w)) is w:
                continue
            if type(placed) in (kernels.RowSplit, NativeWeight) or placed.is_mkldnn:
                parent, _, leaf = name.rpartition(".")
                bias = None if module.bias is None else module.bias.detach()
                setattr(self.model.get_submodule(parent), leaf, kernels.KernelLinear(placed, bias))
            else:
                module.weight = nn.Parameter(placed, requires_grad=False)

    def finish(self) -> None:
        """Give back what binding copied and dropped, and check that every parameter was bound. The collector
        runs only where dtype conversions were made, as the replaced Hugging Face modules holding them sit in
        reference cycles."""
        collect = any(t.device.type == "cpu" and not self.reader.maps(t) for t in self.converted.values())
        self.converted.clear()
        self._memo.clear()
        self.experts.clear()
        return_freed_heap(collect)
        self.reader.close()
        if self.quantized is not None:
            self.quantized.close()
        leftover = [n for n, p in self.model.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise ArtifactError(
                f"weights {leftover[:3]} were not bound: the model folder does not match the plan; recompile"
            )

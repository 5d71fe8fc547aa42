"""Binding weights: every parameter of the meta model gets its tensor, where the plan puts it, as the
kernel that runs it reads it."""

from __future__ import annotations

import functools

import torch
from torch import nn

from fiddlerc.errors import ArtifactError
from fiddlerc.loader.devices import device_map
from fiddlerc.model.families import find_layout
from fiddlerc.model.folder import ModelFolder
from fiddlerc.model.quant import Mxfp4Source, dequantize_mxfp4
from fiddlerc.model.weights import DirectSource, WeightReader, resolve_sources
from fiddlerc.plan import CPU, Plan
from fiddlerc.runtime import kernels
from fiddlerc.runtime.attention import GENERATED, AttentionWeights
from fiddlerc.runtime.attention import fuse as fuse_attention
from fiddlerc.runtime.experts import PlacedExperts
from fiddlerc.runtime.host_memory import host_copy, return_freed_heap
from fiddlerc.runtime.worker import CpuWorker
from fiddlerc.units import parse_dtype

# ---------------------------------------------------------------------------------------------
# Binding weights


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    owner = model.get_submodule(path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def bind_weights(
    model: nn.Module,
    folder: ModelFolder,
    plan: Plan,
    fast: torch.device,
    worker: CpuWorker,
    kernel_mode: str = "reference",
    huge_pages: bool = False,
    sources: dict | None = None,
) -> tuple[list[PlacedExperts], dict[int, AttentionWeights]]:
    """Put every weight where the plan says, memory-mapped from safetensors (copied only to change device
    or dtype, to fuse QKV rows, or to pack a CPU weight for the kernel `kernel_mode` picks:
    fiddlerc.runtime.kernels). With `huge_pages`, the CPU matrices copied anyway land in huge pages
    (fiddlerc.runtime.host_memory); a weight that needs no copy stays mapped.
    Returns the placed experts and, per generated attention layer, its fused weights (which take the
    place of the Hugging Face attention module in `model`)."""
    dtype = parse_dtype(plan.model.dtype)
    sources = sources if sources is not None else resolve_sources(model, folder)
    reader = WeightReader(folder)
    converted: dict[tuple[str, torch.device], torch.Tensor] = {}  # tied weights share one tensor

    def tensor(key: str, device: torch.device, want: torch.dtype) -> torch.Tensor:
        if (key, device) not in converted:
            converted[(key, device)] = reader.get(key).to(device=device, dtype=want)
        return converted[(key, device)]

    @functools.cache
    def fused(key: str) -> torch.Tensor:  # one memory map per fused [E, ...] tensor
        return reader.get(key)

    devices = device_map(plan, fast)
    hidden = getattr(model.config, "hidden_size", None)
    layouts = {ml.layer: find_layout(model.get_submodule(ml.block), hidden) for ml in plan.moe_layers}
    for ml in plan.moe_layers:
        if layouts[ml.layer] is None or layouts[ml.layer].name != ml.layout:
            raise ArtifactError(f"{ml.block} is no longer a {ml.layout} MoE block: recompile")
    expert_names = {
        f"{ml.block}.{name}"
        for ml in plan.moe_layers
        for name in layouts[ml.layer].expert_params(model.get_submodule(ml.block))
    }

    @functools.cache
    def kernel_for(shape: tuple[int, int], dt: torch.dtype) -> str:
        return kernels.resolve(kernel_mode, shape, dt)

    @functools.cache
    def spread_for(shape: tuple[int, int], dt: torch.dtype, kernel: str) -> bool:
        return kernels.spread_experts(shape, dt, kernel)

    split_rows = False  # decided once the experts are bound (below)

    def place(w: torch.Tensor) -> torch.Tensor | kernels.RowSplit:
        """A dense matrix as its kernel reads it: row-split over this thread and the CPU worker where
        `split_rows` (set once the experts are bound) says so, packed, or plain; with `huge_pages`, a copy
        binding made (a dtype conversion, fused rows) moves into huge pages. Mapped source pages are
        released when a copy was made."""
        if w.device.type != "cpu" or w.ndim != 2:
            return w
        split = split_rows and w.numel() * w.element_size() >= kernels.MIN_AUTO_BYTES
        out = w
        if not split and kernel_for(tuple(w.shape), w.dtype) == "packed":
            out = kernels.pack(w)
        elif huge_pages and not reader.maps(w):
            out = host_copy(w)
        if out is not w:
            reader.release(w)
        return kernels.RowSplit(out, worker) if split else out

    buffers = dict(model.named_buffers())
    for name, src in sources.items():
        if name in expert_names:
            continue
        assert isinstance(src, DirectSource)
        want = buffers[name].dtype if name in buffers else dtype
        _set_tensor(model, name, tensor(src.key, fast, want))
    for name, buf in model.named_buffers():  # computed buffers (rotary tables) follow the dense weights
        if name not in sources:
            _set_tensor(model, name, buf.to(fast))

    placed = []
    for ml in plan.moe_layers:
        block, layout = model.get_submodule(ml.block), layouts[ml.layer]
        experts_module = model.get_submodule(ml.experts_module)
        math = layout.math(block)

        def parts(
            name: str, e: int, block_path: str = ml.block, experts_module=experts_module
        ) -> tuple[torch.Tensor, ...]:
            src = sources[f"{block_path}.{name}"]
            if isinstance(src, DirectSource):  # fused on disk: a view of expert e's slice
                return (fused(src.key)[e],)
            if isinstance(src, Mxfp4Source):  # dequantized exactly, one expert at a time, in the stored layout
                w = dequantize_mxfp4(fused(src.blocks)[e], fused(src.scales)[e], dtype)  # [out, in]
                return (w.t() if getattr(experts_module, "is_transposed", False) else w,)
            return tuple(reader.get(k) for k in src.keys[e])

        def whole(name: str, block_path: str = ml.block) -> torch.Tensor:
            src = sources[f"{block_path}.{name}"]
            assert isinstance(src, DirectSource)
            return fused(src.key)

        fetch = tuple(e.fetch_min_tokens for e in sorted(plan.experts, key=lambda e: e.expert) if e.layer == ml.layer)
        weights = []
        for e, dev in enumerate(plan.placement(ml.layer)):
            w = layout.weights(block, e, parts, whole)
            # Packed where it runs on the CPU and is never fetched. Under "auto", only beside a GPU: on a
            # CPU-only machine both tiers run at once, each on its own core, where MKL's single-threaded
            # matrix-vector product side by side measured as fast as packed (docs in runtime/kernels.py).
            # A CPU expert whose dtype changes is converted straight into huge pages with `huge_pages`.
            alone = fast.type != "cpu" or kernel_mode == "packed"
            on_host = devices[dev].type == "cpu"
            stays_on_cpu = on_host and (fast.type == "cpu" or fetch[e] is None)
            if alone and stays_on_cpu and all(kernel_for(tuple(m.shape), dtype) == "packed" for m in w.matrices):
                w = w.to(devices[dev], dtype).packed(reader.release)
            elif on_host and huge_pages and any(m.dtype != dtype for m in w.matrices):
                w = w.in_host_memory(dtype, reader.release)
            else:
                w = w.to(devices[dev], dtype)
            weights.append(w)
        on_cpu = tuple(dev == CPU for dev in plan.placement(ml.layer))
        module = PlacedExperts(weights, on_cpu, math, fast, worker, ml.layer, fetch)
        if fast.type == "cpu":
            biggest = max(weights[0].matrices, key=lambda m: m.numel())
            kernel = "packed" if biggest.is_mkldnn else "reference"
            module.spread = spread_for(tuple(biggest.shape), biggest.dtype, kernel)
        layout.install(block, module)
        placed.append(module)
    # CPU-only: where a token's experts spread over both threads (two one-token products at once beat one
    # after the other), each big one-token dense product splits its rows over them too (kernels.RowSplit).
    split_rows = fast.type == "cpu" and kernel_mode == "auto" and any(p.spread for p in placed)
    dense = {}
    for a in plan.attention:
        if a.path == GENERATED:
            dense[a.layer] = fuse_attention(model.get_submodule(a.module), place, reader.release)
            parent, _, leaf = a.module.rpartition(".")
            setattr(model.get_submodule(parent), leaf, dense[a.layer])
    _place_dense_linears(model, place)
    # Give back what binding copied and dropped (fused rows, conversions moved on): the collector runs only
    # where dtype conversions were made, as the replaced Hugging Face modules holding them sit in cycles.
    collect = any(t.device.type == "cpu" and not reader.maps(t) for t in converted.values())
    converted.clear()
    return_freed_heap(collect)
    reader.close()
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise ArtifactError(
            f"weights {leftover[:3]} were not bound: the model folder does not match the plan; recompile"
        )
    return placed, dense


def _place_dense_linears(model: nn.Module, place) -> None:
    """Give each CPU `nn.Linear` its weight as `place` returns it: packed or row-split (the module becomes
    a KernelLinear), copied into huge pages, or as it is. A weight that another module shares (tied
    embeddings) stays as it is: its pages could not be released."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module.weight.device.type == "meta":
            continue
        w = module.weight.detach()
        if seen.get(w.data_ptr(), 0) > 1 or (placed := place(w)) is w:
            continue
        if type(placed) is kernels.RowSplit or placed.is_mkldnn:
            parent, _, leaf = name.rpartition(".")
            setattr(
                model.get_submodule(parent),
                leaf,
                kernels.KernelLinear(placed, None if module.bias is None else module.bias.detach()),
            )
        else:
            module.weight = nn.Parameter(placed, requires_grad=False)

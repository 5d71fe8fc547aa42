"""load(OUT): verify the manifest, regenerate and compare module.py, bind weights, run.

Nothing from a compiled folder is executed unless it equals what this fiddlerc generates from the
plan; weights are memory-mapped from the model folder and bound where the plan puts them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fiddlerc import __version__
from fiddlerc.capture import cache_class, capture, new_cache
from fiddlerc.codegen import generate_module, load_module
from fiddlerc.errors import ArtifactError, BudgetError, OptionError
from fiddlerc.families import find_layout
from fiddlerc.model_io import (
    DirectSource,
    ModelFolder,
    WeightReader,
    build_meta_model,
    load_config,
    open_model_folder,
    resolve_sources,
    sources_from_json,
)
from fiddlerc.options import format_size, parse_dtype
from fiddlerc.pipeline import annotate_from_plan, config_sha256
from fiddlerc.plan import CPU, Plan, plan_from_json
from fiddlerc.quant import Mxfp4Source, dequantize_mxfp4
from fiddlerc.runtime import kernels
from fiddlerc.runtime.attention import GENERATED, AttentionWeights
from fiddlerc.runtime.attention import fuse as fuse_attention
from fiddlerc.runtime.experts import PlacedExperts
from fiddlerc.runtime.generate import MicroBatchCache
from fiddlerc.runtime.generate import beam_search as _beam_search
from fiddlerc.runtime.generate import generate as _generate
from fiddlerc.runtime.host_memory import host_copy, huge_pages_available, return_freed_heap
from fiddlerc.runtime.kernels import MODES as KERNEL_MODES
from fiddlerc.runtime.trace import MAIN, Tracer
from fiddlerc.runtime.worker import CpuWorker

log = logging.getLogger(__name__)

PLAN_FILE, MODULE_FILE, MANIFEST_FILE = "plan.json", "module.py", "manifest.json"
SOURCES_FILE = "sources.json"  # where each weight is in the model folder (transformers' conversion rules, resolved)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def software_versions() -> dict[str, str]:
    import transformers

    return {"fiddlerc": __version__, "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}


def make_manifest(plan: Plan, plan_text: str, module_text: str, sources_text: str, folder: ModelFolder) -> dict:
    return {
        "versions": software_versions(),
        "model_dir": str(folder.path),
        "files": {
            PLAN_FILE: sha256_bytes(plan_text.encode()),
            MODULE_FILE: sha256_bytes(module_text.encode()),
            SOURCES_FILE: sha256_bytes(sources_text.encode()),
        },
        "weights": folder.fingerprint(),
        "hardware": None
        if plan.target.hardware is None
        else {"name": plan.target.hardware, "sha256": plan.target.hardware_sha256},
    }


def regenerate_module(folder: ModelFolder, plan: Plan) -> tuple[str, nn.Module]:
    """module.py text for a plan, from a fresh capture of the model (and that meta model)."""
    config = load_config(folder)
    if config_sha256(folder.config_json) != plan.model.config_sha256:
        raise ArtifactError(f"{folder.path}/config.json changed since this model was compiled: recompile")
    model = build_meta_model(config, parse_dtype(plan.model.dtype))
    gm = capture(model)
    annotate_from_plan(gm, plan)
    return generate_module(gm, plan), model


def read_manifest(data: bytes, where: Path | str = MANIFEST_FILE) -> dict:
    """Parse manifest.json, checking its shape; any malformed input is an ArtifactError."""
    try:
        manifest = json.loads(data)
        ok = isinstance(manifest, dict) and all(
            isinstance(manifest.get(k), t)
            for k, t in (("files", dict), ("versions", dict), ("model_dir", str), ("weights", dict))
        )
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        ok = False
    if not ok:
        raise ArtifactError(f"{where} is corrupt: recompile")
    return manifest


@dataclass(frozen=True)
class Artifact:
    """A verified compiled folder."""

    path: Path
    plan: Plan
    manifest: dict
    folder: ModelFolder
    module_text: str
    sources: dict | None = None  # parameter name -> its Source in the model folder (sources.json)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: {what}; recompile with `fiddlerc compile`") from None


def verify_artifact(out_dir: str | Path, model_dir: str | Path | None = None) -> tuple[Artifact, nn.Module]:
    """Check a compiled folder against its manifest, its model's weights and a fresh codegen."""
    out = Path(out_dir)
    if not out.is_dir():
        raise ArtifactError(f"{out} is not a compiled folder (run `fiddlerc compile MODEL_DIR -o {out}` first)")
    manifest = read_manifest(_read(out / MANIFEST_FILE, "the compiled folder is incomplete"), out / MANIFEST_FILE)
    files, versions, recorded_dir, weights = (
        manifest["files"],
        manifest["versions"],
        manifest["model_dir"],
        manifest["weights"],
    )

    now = software_versions()
    for name in ("fiddlerc", "torch", "transformers"):  # each shapes the generated code
        if versions.get(name) != now[name]:
            raise ArtifactError(
                f"{out} was compiled with {name} {versions.get(name)}, this is {now[name]}: recompile it with this version"
            )
    plan_bytes = _read(out / PLAN_FILE, "the compiled folder is incomplete")
    if sha256_bytes(plan_bytes) != files.get(PLAN_FILE):
        raise ArtifactError(f"{out / PLAN_FILE} was changed after compiling (hash mismatch): recompile")
    plan = plan_from_json(plan_bytes)

    folder = open_model_folder(model_dir if model_dir is not None else recorded_dir)
    if folder.fingerprint() != weights:
        raise ArtifactError(
            f"the weights in {folder.path} are not the ones {out} was compiled for (safetensors headers differ): recompile"
        )
    module_text, meta_model = regenerate_module(folder, plan)
    on_disk = _read(out / MODULE_FILE, "the compiled folder is incomplete")
    if on_disk != module_text.encode() or sha256_bytes(on_disk) != files.get(MODULE_FILE):
        raise ArtifactError(
            f"{out / MODULE_FILE} differs from what this fiddlerc generates from plan.json (edited?); "
            "it was not run: recompile"
        )
    sources_bytes = _read(out / SOURCES_FILE, "the compiled folder is incomplete")
    if sha256_bytes(sources_bytes) != files.get(SOURCES_FILE):
        raise ArtifactError(f"{out / SOURCES_FILE} was changed after compiling (hash mismatch): recompile")
    sources = sources_from_json(sources_bytes, meta_model, folder)
    return Artifact(out, plan, manifest, folder, module_text, sources), meta_model


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


_ATTENTION = re.compile(r"\.layers\.(\d+)\.(?:[A-Za-z_]+\.)?(self_attn|attention|attn)$")


def _trace_attention(model: nn.Module, tracer: Tracer) -> None:
    """A slice on the main track for each decoder layer's attention call."""
    for name, module in model.named_modules():
        m = _ATTENTION.search(name)
        if m is None:
            continue
        label = f"L{m.group(1)} attention"
        starts: list[float] = []
        module.register_forward_pre_hook(lambda mod, args, starts=starts: starts.append(tracer.now_us()))
        module.register_forward_hook(
            lambda mod, args, out, starts=starts, label=label: tracer.add(label, MAIN, starts.pop(), tracer.now_us())
        )


def _trace_generated_attention(forward: nn.Module, tracer: Tracer) -> None:
    """The same slices for the generated attention method of module.py."""
    inner = forward.attention

    def traced(layer, *args):
        start = tracer.now_us()
        try:
            return inner(layer, *args)
        finally:
            tracer.add(f"L{layer} attention", MAIN, start, tracer.now_us())

    forward.attention = traced


def device_map(plan: Plan, fast: torch.device) -> dict[str, torch.device]:
    """The plan's devices on this machine: its first GPU on `fast`; further GPUs on the CUDA devices
    of the same names (which must exist), or all on the CPU when `fast` is the CPU."""
    out = {CPU: torch.device(CPU), plan.target.device: fast}
    for name in plan.target.more_gpus:
        if fast.type == CPU:
            out[name] = fast
            continue
        index = int(name.split(":")[1])
        if index >= torch.cuda.device_count():
            raise OptionError(
                f"the plan places experts on {name}, but this machine has {torch.cuda.device_count()} GPU(s): "
                "recompile for this machine's GPUs, or load with device='cpu'"
            )
        out[name] = torch.device("cuda", index)
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The fast device at load time: the GPU if there is one, else the CPU (with a warning)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        log.warning("no CUDA device: experts placed on the GPU tier run on the CPU in the main thread")
        return torch.device(CPU)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"unknown device {device!r}: use cpu or cuda:N") from None
    if dev.type == "cuda":
        index = dev.index or 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise OptionError(f"device {device} is not available on this machine: use --device cpu")
        return torch.device("cuda", index)
    if dev.type != CPU:
        raise OptionError(f"unsupported device {device!r}: use cpu or cuda:N")
    return dev


class CompiledModel:
    """A loaded, placed model: call it for logits, `generate` for tokens."""

    def __init__(
        self,
        artifact: Artifact,
        meta_model: nn.Module,
        device: torch.device,
        num_threads: int | None = None,
        trace: str | Path | None = None,
        kernels: str = "auto",
    ) -> None:
        self.artifact = artifact
        self.plan = artifact.plan
        self.device = device
        self.config = meta_model.config
        if device.type == "cuda":
            _check_gpu_memory(self.plan, device)
        _check_host_memory(self.plan, device)
        self._worker = CpuWorker(num_threads)
        self._finalizer = weakref.finalize(self, self._worker.close)  # no thread outlives the model
        self._lock = threading.Lock()
        try:
            self._placed, dense = bind_weights(
                meta_model,
                artifact.folder,
                self.plan,
                device,
                self._worker,
                kernels,
                huge_pages_available(),
                artifact.sources,
            )
        except BaseException:
            self._finalizer()
            raise
        self.hf_model = meta_model
        self.tracer: Tracer | None = None
        self._trace_path = Path(trace) if trace is not None else None
        if trace is not None:
            self.tracer = Tracer()
            _trace_attention(meta_model, self.tracer)
            for placed in self._placed:
                placed.tracer = self.tracer
        module = load_module(artifact.module_text, str(artifact.path / MODULE_FILE))
        self._forward = module.CompiledForward(meta_model, meta_model.config)
        self._forward.placed = {p.layer: p for p in self._placed}
        self._forward.dense = dense
        if self.tracer is not None and dense:
            _trace_generated_attention(self._forward, self.tracer)
        # Generated attention writes into a static cache sized for the compiled context.
        self._static_cache = bool(dense)
        self._cache_class = cache_class(meta_model)
        gen = getattr(meta_model, "generation_config", None)
        self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None) or self.config.eos_token_id)
        pad = getattr(gen, "pad_token_id", None) or getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    def new_cache(self):
        def one():
            if self._static_cache:
                from transformers import StaticCache

                return StaticCache(config=self.config, max_cache_len=self.plan.target.context_tokens)
            return new_cache(self._cache_class, self.config)

        micro = self.plan.target.micro_batches
        return MicroBatchCache([one() for _ in range(micro)]) if micro > 1 else one()

    def _run(self, input_ids, cache, attention_mask, position_ids) -> torch.Tensor:
        if isinstance(cache, MicroBatchCache):
            micro = len(cache.caches)
            if cache.split is None:  # the prefill decides; decode steps follow it
                cache.split = input_ids.shape[0] >= micro and input_ids.shape[0] % micro == 0
            if cache.split:
                return self._forward.forward_micro(input_ids, cache.caches, attention_mask, position_ids)
            cache = cache.caches[0]
        return self._forward(input_ids, cache, attention_mask, position_ids)

    def _check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> None:
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.ndim != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise OptionError("input_ids must be an integer tensor of shape [batch, tokens]")
        context = self.plan.target.context_tokens
        if input_ids.shape[1] + new_tokens > context:
            raise OptionError(
                f"{input_ids.shape[1]} prompt tokens + {new_tokens} new tokens exceed the context of {context} tokens "
                f"this model was compiled for: shorten the prompt or recompile with --context {input_ids.shape[1] + new_tokens}"
            )

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of a full forward pass from an empty cache (as Hugging Face's model(...) computes)."""
        self._check_input(input_ids)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=self.device)[None, :]
        with self._lock:
            return self._run(input_ids, self.new_cache(), attention_mask, position_ids.to(self.device))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
        on_token=None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
    ) -> torch.Tensor:
        """Prompt + new tokens [B, T + n]: greedy unless do_sample, beam search with num_beams > 1 (as
        Hugging Face's, with its length_penalty and early_stopping); stops at EOS unless ignore_eos."""
        self._check_input(input_ids, max_new_tokens)
        eos = () if ignore_eos else (_as_ids(eos_token_id) if eos_token_id is not None else self.eos_token_ids)
        if num_beams > 1:
            if do_sample or on_token is not None:
                raise OptionError("beam search is deterministic here: drop do_sample and on_token, or use num_beams=1")
            if max_new_tokens < 1:
                raise OptionError("beam search needs max_new_tokens >= 1")
            with self._lock:
                return _beam_search(
                    self._run,
                    self.new_cache,
                    input_ids.to(self.device),
                    None if attention_mask is None else attention_mask.to(self.device),
                    max_new_tokens,
                    num_beams,
                    eos_token_ids=eos,
                    pad_token_id=self.pad_token_id,
                    length_penalty=length_penalty,
                    early_stopping=early_stopping,
                )
        with self._lock:
            out = _generate(
                self._run,
                self.new_cache,
                input_ids.to(self.device),
                attention_mask,
                max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                eos_token_ids=eos,
                pad_token_id=self.pad_token_id,
                seed=seed,
                on_token=on_token,
            )
        return out

    def routing_stats(self) -> dict:
        """Routed (token, expert) pairs since load, per MoE layer and in total: served by resident experts
        on the fast device ("fast"), by the CPU worker ("cpu"), or by cpu-tier experts whose weights were
        fetched for a big call ("fetched"); per expert; and the resident hit rate."""

        def summary(fast: int, cpu: int, fetched: int) -> dict:
            total = fast + cpu + fetched
            return {"fast": fast, "cpu": cpu, "fetched": fetched, "hit_rate": fast / total if total else 0.0}

        layers = {
            p.layer: {**summary(p.tokens_fast, p.tokens_cpu, p.tokens_fetched), "per_expert": list(p.expert_tokens)}
            for p in self._placed
        }
        totals = [sum(v[k] for v in layers.values()) for k in ("fast", "cpu", "fetched")]
        return {"layers": layers, **summary(*totals)}

    def close(self) -> None:
        """Stop the CPU worker thread (also done when the model is garbage-collected); write the trace
        if one was asked for."""
        self._finalizer()
        if self.tracer is not None and self._trace_path is not None:
            self.tracer.save(self._trace_path)
            self._trace_path = None

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_gpu_memory(plan: Plan, device: torch.device) -> None:
    """Refuse to start when a GPU has less free memory than the plan puts on it."""
    mem = plan.memory
    for name, dev in device_map(plan, device).items():
        if dev.type != "cuda":
            continue
        need = mem.expert_bytes.get(name, 0)
        if name == plan.target.device:
            need += mem.dense_bytes + mem.kv_reserve_bytes
        free, _ = torch.cuda.mem_get_info(dev)
        if need > free:
            raise BudgetError(
                f"the plan puts {format_size(need)} on {dev} but only {format_size(free)} is free there: "
                "free the GPU, or recompile with a smaller --gpu-memory"
            )


def available_host_memory() -> int | None:
    """Bytes the kernel says a new workload can use without swapping (Linux MemAvailable), if known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_host_memory(plan: Plan, device: torch.device) -> None:
    """Warn when the weights this run reads from host memory exceed what the host has free: they are
    memory-mapped, so the run still works, paging from disk at disk speed."""
    mem = plan.memory
    need = mem.expert_bytes.get(CPU, 0)
    if device.type == "cpu":  # everything runs from host memory
        need = mem.dense_bytes + mem.kv_reserve_bytes + sum(mem.expert_bytes.values())
    free = available_host_memory()
    if free is not None and need > free:
        log.warning(
            "this run reads %s of weights from host memory but only %s is available: it will page from disk "
            "and run at disk speed; free memory, or recompile with a larger --gpu-memory (fewer CPU experts)",
            format_size(need),
            format_size(free),
        )


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load(
    out_dir: str | Path,
    device: str | None = None,
    model_dir: str | Path | None = None,
    num_threads: int | None = None,
    trace: str | Path | None = None,
    kernels: str = "auto",
) -> CompiledModel:
    """Verify a compiled folder and load it onto this machine's devices. With `trace`, record a
    Chrome/Perfetto timeline of every call and write it there on `close()`.

    `kernels` picks the CPU matrix kernels (fiddlerc.runtime.kernels): "auto" measures, once per
    weight shape on this machine, whether a packed copy is faster than the plain weight (and on a
    CPU-only machine whether one-token products split over two threads); "reference" computes exactly as
    Hugging Face does; "packed" packs wherever this CPU can."""
    if kernels not in KERNEL_MODES:
        raise OptionError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_MODES)}")
    fast = resolve_device(device)
    artifact, meta_model = verify_artifact(out_dir, model_dir)
    return CompiledModel(artifact, meta_model, fast, num_threads, trace, kernels)

"""Calibration: measure this machine for a model and write a hardware profile.

CPU: time one expert (the model's real shape and dtype, stored in the format its CPU tier will be:
quantized, or with the float kernel the loader measures fastest for its shape) at 1..128 tokens,
through the runtime's own kernels, cycling through a pool of experts larger than the caches
(fiddlerc.measure.POOL_BYTES), and fit the
roofline the cost model uses, flat then linear where the curve bends; the profile keeps the
bandwidth and throughput it implies, the measurements, and the fit's worst relative error. With
CUDA, the same for the GPU plus pinned host<->device copy bandwidth.

Fixed costs: decode a width-reduced copy of the model (its own family and modeling code, hidden
size 64, random weights, two layer counts) through fiddlerc's own compile and runtime; the
difference per layer is the per-layer overhead (dispatch, launches, the routing sync), the rest the
per-step overhead. A family whose config cannot be narrowed is measured on a Mixtral-shaped one.
Disk: sequential read of a fresh file after dropping it from the page cache (paging estimates).

Results are cached per machine, model family and expert shape, so a second compile does not
measure again.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fiddlerc import quant_format
from fiddlerc.hardware import CpuSpec, GpuSpec, HardwareProfile, cache_dir, cpu_name, profile_from_json
from fiddlerc.measure import cache_path, cached, median_seconds, pool_size
from fiddlerc.plan import MXFP4
from fiddlerc.progress import progress
from fiddlerc.runtime import kernels, quant
from fiddlerc.runtime.matvec import NativeWeight

log = logging.getLogger(__name__)

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
LINEAR = 1.9  # time ratio per doubling of the tokens that counts as compute-bound


def _cpu_matrix(w: torch.Tensor, dtype: torch.dtype, fmt: str | None, g: torch.Generator):
    """A random CPU expert matrix as the loader would bind it: in `fmt`, or with the kernel it picks."""
    if fmt == MXFP4:  # as a checkpoint stores it: every E2M1 code, scales near 2^-6
        rows, cols = w.shape
        blocks = torch.randint(0, 256, (rows, cols // quant_format.GROUP, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 124, (rows, cols // quant_format.GROUP), dtype=torch.uint8, generator=g)
        q = quant_format.from_mxfp4(blocks, scales)
    elif fmt is not None:
        q = quant_format.quantize(w, fmt)
    if fmt is not None:
        return quant_format.QuantizedWeight(fmt, q.data, q.scales, dtype)
    w = w.to(dtype)
    # CPU-only, experts are never packed (the loader keeps them as bound: fiddlerc.loader.bind)
    among = kernels.KERNELS if torch.cuda.is_available() else tuple(k for k in kernels.KERNELS if k != "packed")
    kernel = kernels.choose(tuple(w.shape), dtype, among)
    return kernels.pack(w) if kernel == "packed" else NativeWeight(w) if kernel == "native" else w


def _stored(m) -> int:
    return m.nbytes if isinstance(m, quant_format.QuantizedWeight) else m.numel() * m.dtype.itemsize


def _expert_call(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """One SwiGLU expert as the runtime computes it (fiddlerc.runtime.experts): a quantized expert's
    gate and up read its input quantized once."""
    xin = kernels.shared_input(x, (gate, up))
    return kernels.linear(F.silu(kernels.linear(xin, gate)) * kernels.linear(xin, up), down)


def _time_expert(
    hidden: int, inter: int, dtype: torch.dtype, device: torch.device, repeats: int, fmt: str | None = None
) -> tuple[list[tuple[int, float]], int]:
    """(tokens, median ms) per expert call for TOKEN_COUNTS, and the bytes an expert reads; weights cycle
    through a pool larger than the caches. Once two doublings of the tokens have each doubled the time,
    the call is compute-bound and linear from there (the cost model extends the last slope), so larger
    counts are not timed: that keeps a big expert whose small calls are already compute-bound (bf16
    without native support) from taking minutes. `fmt` (CPU only): the experts' quantized format."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))

    def expert() -> list:  # gate, up, down as the runtime reads them on `device`
        ms = [torch.randn(s, generator=g) * 0.02 for s in shapes]
        if device.type == "cpu":
            return [_cpu_matrix(m, dtype, fmt, g) for m in ms]
        return [m.to(device=device, dtype=dtype) for m in ms]

    weights = [expert()]
    expert_bytes = sum(_stored(m) for m in weights[0])
    weights += [expert() for _ in range(min(pool_size(expert_bytes, minimum=2), 64) - 1)]
    pool = len(weights)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    curve: list[tuple[int, float]] = []
    k = 0
    for n in progress(TOKEN_COUNTS, f"calibrating on {device.type}"):
        x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            gate, up, down = weights[k % pool]
            k += 1
            sync()
            t0 = time.perf_counter()
            _expert_call(x, gate, up, down)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        curve.append((n, statistics.median(times[1:])))  # the first call warms up
        if len(curve) >= 4 and all(curve[-i][1] >= LINEAR * curve[-i - 1][1] for i in (1, 2)):
            break
    return curve, expert_bytes


def fit_roofline(token_counts, ms, expert_bytes: int, flops_per_token: int) -> tuple[float, float, float]:
    """(bandwidth GB/s, throughput TFLOP/s, worst relative error) of t(n) = max(bytes/bw, n*flops/tput).

    The memory piece comes from the 1-token call (decode, what matters most), the compute piece
    from the slope between the two largest token counts, where the curve has bent into a line.
    Kernels whose small-n time is not flat (fp32 MKL without pre-packing) show as fit error.
    """
    ns = list(token_counts)
    t_mem = ms[0]
    slope = max((ms[-1] - ms[-2]) / (ns[-1] - ns[-2]), 1e-6)
    bw = expert_bytes / (t_mem * 1e6)
    tput = flops_per_token / (slope * 1e9)
    model = [max(expert_bytes / (bw * 1e6), n * flops_per_token / (tput * 1e9)) for n in ns]
    error = max(abs(p - m) / m for p, m in zip(model, ms, strict=True))
    return round(bw, 3), round(tput, 4), error


_NARROW = {  # config fields that set widths, and the width a calibration copy uses
    "hidden_size": 64,
    "intermediate_size": 32,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "ffn_hidden_size": 32,
    "head_dim": 16,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "vocab_size": 256,
}
SPAN = 4  # layers between the two measured copies
_MAX_NARROW_PARAMS = 50_000_000  # a narrowed copy bigger than this kept a width we did not narrow


def narrow_config(config, layers: int):
    """A copy of `config` with every width small and `layers` decoder layers; same family and routing."""
    d = config.to_dict()
    n_layers = config.num_hidden_layers
    for key, width in _NARROW.items():
        if isinstance(d.get(key), int) and not isinstance(d[key], bool) and d[key] > 0:
            d[key] = min(d[key], width)
    heads = d.get("num_attention_heads")
    if isinstance(heads, int):
        kv = d.get("num_key_value_heads") or heads
        d["num_attention_heads"] = 4
        d["num_key_value_heads"] = 4 if kv == heads else 2  # keep grouped-query attention grouped
    if "kv_lora_rank" in d:  # MLA: head_dim and qk_head_dim are derived from the ranks
        d.pop("head_dim", None)
        d.pop("qk_head_dim", None)
    for key, value in list(d.items()):  # per-layer lists (attention kinds, MoE pattern) follow the layer count
        if isinstance(value, list) and len(value) == n_layers and key != "architectures":
            d[key] = [value[i % n_layers] for i in range(layers)]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(d.get(key), int) and d[key] >= d.get("vocab_size", 256):
            d[key] = 0
    d["num_hidden_layers"] = layers
    d.pop("quantization_config", None)  # the copy has random full-precision weights
    return type(config).from_dict(d)


def _moe_prefix(config) -> int:
    """How many leading decoder layers are dense (no MoE) in this family's config."""
    for key in ("first_k_dense_replace", "first_k_dense"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 0


def _decode_ms(config, dtype: torch.dtype, device: str, threads: int, tokens: int = 48, rounds: int = 3) -> float:
    """Median ms per decode step of a random-weight model of `config`, compiled and run by fiddlerc."""
    from transformers.utils import logging as hf_logging

    from fiddlerc.artifact import compile_model  # calibration measures our own compiler's runtime
    from fiddlerc.compiler.options import CompileOptions, parse_target
    from fiddlerc.loader import load
    from fiddlerc.model.folder import open_model_folder
    from fiddlerc.model.meta import build_meta_model, meta_model_of
    from fiddlerc.tools.demo import write_model

    n_params = sum(p.numel() for p in build_meta_model(config, dtype).parameters())
    if n_params > _MAX_NARROW_PARAMS:
        raise ValueError(f"the narrowed model still has {n_params} parameters")
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    try:
        with tempfile.TemporaryDirectory(prefix="fiddlerc-calibrate-") as tmp:
            src, out = write_model(config, Path(tmp) / "model", seed=0), Path(tmp) / "out"
            folder, name = open_model_folder(src), str(dtype).removeprefix("torch.")

            def compile_with(fast_experts: int | None):
                target = parse_target("1TiB", context=tokens + 16, fast_experts=fast_experts)
                return compile_model(folder, *meta_model_of(folder, name), target, CompileOptions(), out)

            compile_with(len(compile_with(None).plan.experts) // 2)  # half on each tier, as in a real run
            ids = torch.randint(3, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
            with load(out, device=device, num_threads=threads) as model:

                def run(n: int):
                    return lambda: model.generate(ids, max_new_tokens=n, ignore_eos=True)

                run(4)()  # warm up
                long = median_seconds(run(tokens + 1), rounds, warmup=0)
                short = median_seconds(run(1), rounds, warmup=0)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return 1e3 * (long - short) / tokens


def measure_overheads(config, dtype: torch.dtype, device: str, threads: int) -> tuple[float, float, str]:
    """(per-layer ms, per-step ms, what was measured) of fiddlerc's decode on this machine."""
    from transformers import MixtralConfig

    what = f"a width-reduced {config.model_type} model"
    try:
        base = _moe_prefix(config) + 1
        small, big = (_decode_ms(narrow_config(config, n), dtype, device, threads) for n in (base, base + SPAN))
    except Exception as e:  # noqa: BLE001 - any family whose config cannot be narrowed falls back
        log.info("calibrating overheads on a Mixtral-shaped model: %s cannot be narrowed (%s)", config.model_type, e)
        ref = MixtralConfig(num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
        what, base = "a width-reduced Mixtral-shaped model (the family's own config could not be narrowed)", 1
        small, big = (_decode_ms(narrow_config(ref, n), dtype, device, threads) for n in (base, base + SPAN))
    per_layer = max(0.0, (big - small) / SPAN)
    per_step = max(0.0, small - base * per_layer)
    return round(per_layer, 4), round(per_step, 4), what


def disk_gbps(folder: Path, n_bytes: int = 256 * 2**20) -> float:
    """Sequential read bandwidth of a fresh file in `folder`, dropped from the page cache first."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".fiddlerc-disk-")
    try:
        block = os.urandom(16 * 2**20)
        with os.fdopen(fd, "wb") as fh:
            for _ in range(n_bytes // len(block)):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        rd = os.open(name, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(rd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            while os.read(rd, len(block)):
                pass
            return round(n_bytes / (time.perf_counter() - t0) / 1e9, 3)
        finally:
            os.close(rd)
    finally:
        os.unlink(name)


def _copy_gbps(n_bytes: int, to_device: bool) -> float:
    host = torch.empty(n_bytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")

    def copy() -> None:
        (dev.copy_(host, non_blocking=True) if to_device else host.copy_(dev, non_blocking=True))

    return round(n_bytes / median_seconds(copy, 3, sync=torch.cuda.synchronize) / 1e9, 3)


def calibrate(
    hidden: int,
    inter: int,
    dtype: torch.dtype,
    *,
    config=None,
    threads: int | None = None,
    repeats: int = 5,
    use_cache: bool = True,
    expert_format: str | None = None,
) -> tuple[HardwareProfile, Path]:
    """Measure (or read from the cache) this machine's profile for one expert shape, its CPU tier stored
    in `expert_format` (a quantized format, None: the compute dtype); with the model's `config`, also the
    framework's fixed costs for its family."""
    threads = threads or torch.get_num_threads()
    cuda = torch.cuda.is_available()
    family = None if config is None else config.model_type
    key = ["v4", threads, hidden, inter, str(dtype), cuda, family, expert_format, quant.build()]
    path = cache_path("calibrated", key)  # the C kernels' build too: their speed is what it measures
    name = path.stem

    def read(text: bytes) -> HardwareProfile:
        return profile_from_json(text, str(path))

    def measure() -> str:
        return _measure(name, hidden, inter, dtype, config, threads, repeats, cuda, expert_format).to_json()

    return cached(path, measure, read, use_cache=use_cache), path


def _measure(name, hidden, inter, dtype, config, threads, repeats, cuda, fmt) -> HardwareProfile:
    """Measure this machine into the profile `calibrate` caches (see the module docstring)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        expert_bytes, flops = 3 * hidden * inter * dtype.itemsize, 2 * 3 * hidden * inter
        measured, read = _time_expert(hidden, inter, dtype, torch.device("cpu"), repeats, fmt)
        bw, tflops, err = fit_roofline([n for n, _ in measured], [t for _, t in measured], read, flops)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        curve = tuple((n, round(t, 4)) for n, t in measured)
        cache_dir().mkdir(parents=True, exist_ok=True)
        disk = disk_gbps(cache_dir())
        cpu = CpuSpec(
            cpu_name()[:100] or "cpu", threads, bw, tflops, 0.0, memory, curve, expert_bytes, fmt or "", disk_gbps=disk
        )
        when = time.strftime("%Y-%m-%d")
        shown = ", ".join(f"{n}: {t:.2f}" for n, t in measured)
        sources = {
            "cpu.mem_bw_gbps": (
                f"fiddlerc calibrate {when}: a {hidden}x{inter} {dtype} expert{' in ' + fmt if fmt else ''} on "
                f"{threads} threads, ms by tokens {{{shown}}}, in the bytes it reads; roofline fit error {err:.1%}"
            ),
            "cpu.matmul_tflops": f"fiddlerc calibrate {when}: slope of the same measurements at the largest token counts",
            "cpu.memory_bytes": "this machine's physical memory",
            "cpu.disk_gbps": f"fiddlerc calibrate {when}: a 256 MiB file in {cache_dir()}, read after dropping it from the page cache",
        }
        gpu = None
        if cuda:  # pragma: no cover - needs a GPU
            gms, _ = _time_expert(hidden, inter, dtype, torch.device("cuda"), repeats)
            gbw, gtf, gerr = fit_roofline([n for n, _ in gms], [t for _, t in gms], expert_bytes, flops)
            props = torch.cuda.get_device_properties(0)
            gpu = GpuSpec(
                props.name[:100],
                int(props.total_memory),
                gbw,
                gtf,
                _copy_gbps(256 * 2**20, True),
                _copy_gbps(256 * 2**20, False),
                0.0,
            )
            sources["gpu.mem_bw_gbps"] = (
                f"fiddlerc calibrate {when}: the same expert on the GPU, roofline fit error {gerr:.1%}"
            )
            sources["gpu.h2d_gbps"] = f"fiddlerc calibrate {when}: pinned 256 MiB copies"
        if config is not None:  # the fixed costs land on the fast tier: the GPU when there is one
            layer_ms, step_ms, what = measure_overheads(config, dtype, "cuda" if cuda else "cpu", threads)
            tier = "gpu" if gpu is not None else "cpu"
            if gpu is not None:  # pragma: no cover - needs a GPU
                gpu = replace(gpu, layer_overhead_ms=layer_ms, step_overhead_ms=step_ms)
            else:
                cpu = replace(cpu, layer_overhead_ms=layer_ms, step_overhead_ms=step_ms)
            sources[f"{tier}.layer_overhead_ms"] = (
                f"fiddlerc calibrate {when}: decode of {what} through fiddlerc, {threads} threads: "
                "ms per step difference per added layer"
            )
            sources[f"{tier}.step_overhead_ms"] = f"fiddlerc calibrate {when}: the same measurement, the rest of a step"
        log.info("calibrated in %.1f s", time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
    return HardwareProfile(
        name=name,
        description=f"this machine ({cpu_name()}, {threads} threads{', ' + gpu.name if gpu else ', no GPU'}), measured for a {hidden}x{inter} {dtype} expert{' in ' + fmt if fmt else ''}",
        cpu=cpu,
        gpu=gpu,
        sources=sources,
    )

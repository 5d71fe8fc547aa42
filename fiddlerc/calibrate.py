"""Calibration: measure this machine for a model's expert shape and write a hardware profile.

CPU: time one expert (the model's real shape and dtype) at 1..128 tokens, cycling through a pool of
experts larger than the caches (reusing one expert looks 1.7x faster, DESIGN.md), and fit the
roofline the cost model uses, flat then linear where the curve bends; the profile keeps the
bandwidth and throughput it implies, the measurements, and the fit's worst relative error. With CUDA, the same for the GPU
plus pinned host<->device copy bandwidth. Results are cached per machine and expert shape, so a
second compile does not measure again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fiddlerc.hardware import CpuSpec, GpuSpec, HardwareProfile, profile_from_json

log = logging.getLogger(__name__)

TOKEN_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
POOL_BYTES = 512 * 2**20  # cycle through this much expert weight: larger than any cache


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fiddlerc" / "calibration"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_expert(hidden: int, inter: int, dtype: torch.dtype, device: torch.device, repeats: int) -> list[float]:
    """Median ms per expert call at each of TOKEN_COUNTS; weights cycle through a pool larger than the caches."""
    expert_bytes = 3 * hidden * inter * dtype.itemsize
    pool = min(max(2, -(-POOL_BYTES // expert_bytes)), 64)
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
    weights = [
        [(torch.randn(s, generator=g) * 0.02).to(device=device, dtype=dtype) for s in shapes] for _ in range(pool)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    medians = []
    k = 0
    for n in TOKEN_COUNTS:
        x = torch.randn(n, hidden, generator=g).to(device=device, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            gate, up, down = weights[k % pool]
            k += 1
            sync()
            t0 = time.perf_counter()
            F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        medians.append(statistics.median(times[1:]))  # the first call warms up
    return medians


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


def _copy_gbps(n_bytes: int, to_device: bool) -> float:
    host = torch.empty(n_bytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(4):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        (dev.copy_(host, non_blocking=True) if to_device else host.copy_(dev, non_blocking=True))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return round(n_bytes / statistics.median(times[1:]) / 1e9, 3)


def calibrate(
    hidden: int, inter: int, dtype: torch.dtype, *, threads: int | None = None, repeats: int = 5, use_cache: bool = True
) -> tuple[HardwareProfile, Path]:
    """Measure (or read from the cache) this machine's profile for one expert shape."""
    threads = threads or torch.get_num_threads()
    cuda = torch.cuda.is_available()
    key_text = json.dumps(
        ["v2", platform.node(), _cpu_name(), threads, hidden, inter, str(dtype), torch.__version__, cuda]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:12]
    path = cache_dir() / f"calibrated-{key}.json"
    if use_cache and path.is_file():
        return profile_from_json(path.read_bytes(), str(path)), path

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        expert_bytes, flops = 3 * hidden * inter * dtype.itemsize, 2 * 3 * hidden * inter
        ms = _time_expert(hidden, inter, dtype, torch.device("cpu"), repeats)
        bw, tflops, err = fit_roofline(TOKEN_COUNTS, ms, expert_bytes, flops)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        curve = tuple((n, round(t, 4)) for n, t in zip(TOKEN_COUNTS, ms, strict=True))
        cpu = CpuSpec(_cpu_name()[:100] or "cpu", threads, bw, tflops, 0.0, memory, curve, expert_bytes)
        when = time.strftime("%Y-%m-%d")
        shown = ", ".join(f"{n}: {t:.2f}" for n, t in zip(TOKEN_COUNTS, ms, strict=True))
        sources = {
            "cpu.mem_bw_gbps": (
                f"fiddlerc calibrate {when}: a {hidden}x{inter} {dtype} expert on {threads} threads, "
                f"ms by tokens {{{shown}}}; roofline fit error {err:.1%}"
            ),
            "cpu.matmul_tflops": f"fiddlerc calibrate {when}: slope of the same measurements at the largest token counts",
            "cpu.memory_bytes": "this machine's physical memory",
        }
        gpu = None
        if cuda:  # pragma: no cover - needs a GPU
            gms = _time_expert(hidden, inter, dtype, torch.device("cuda"), repeats)
            gbw, gtf, gerr = fit_roofline(TOKEN_COUNTS, gms, expert_bytes, flops)
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
        log.info("calibrated in %.1f s", time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old_threads)
    profile = HardwareProfile(
        name=f"calibrated-{key}",
        description=f"this machine ({_cpu_name()}, {threads} threads{', ' + gpu.name if gpu else ', no GPU'}), measured for a {hidden}x{inter} {dtype} expert",
        cpu=cpu,
        gpu=gpu,
        sources=sources,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)
    return profile, path

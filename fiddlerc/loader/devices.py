"""The plan's devices on this machine, and the memory checks made before binding."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fiddlerc.errors import BudgetError, OptionError
from fiddlerc.plan import CPU, Plan
from fiddlerc.units import format_size

log = logging.getLogger(__name__)


def device_map(plan: Plan, fast: torch.device) -> dict[str, torch.device]:
    """The plan's devices on this machine: its first GPU on `fast`; further GPUs on the CUDA devices
    of the same names (which must exist), or all on the CPU when `fast` is the CPU."""
    out = {CPU: torch.device(CPU)} if plan.target.cpu_only else {CPU: torch.device(CPU), plan.target.device: fast}
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


def resolve_device(device: str | torch.device | None, cpu_only: bool = False) -> torch.device:
    """The fast device at load time: the GPU if there is one, else the CPU (with a warning). A CPU-only
    plan (`cpu_only`) runs on the CPU, and refuses a GPU."""
    if cpu_only:
        if device is not None and str(device).split(":")[0] != CPU:
            raise OptionError(
                f"this plan is CPU-only (no GPU tier), so it does not run on {device}: load it with device='cpu', "
                "or recompile with --gpu-memory for the GPU"
            )
        return torch.device(CPU)
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        log.warning("no CUDA device: the plan's GPU tier (cuda:0) runs on the CPU here")
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


def check_gpu_memory(plan: Plan, device: torch.device) -> None:
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


def check_host_memory(plan: Plan, device: torch.device) -> None:
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

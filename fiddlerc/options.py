"""Compile options: sizes, dtypes, the target's budgets. Parsed once, validated, frozen."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile
from fiddlerc.popularity import Popularity

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
_MAX_BYTES = 2**60  # 1 EiB: anything larger is a typo, not a machine

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def parse_size(text: str | int) -> int:
    """Parse `24GiB`, `512MiB`, `24GB` (decimal) or a bare byte count into bytes."""
    if isinstance(text, bool):
        raise OptionError(f"invalid size {text!r}: give bytes or a size such as 24GiB")
    if isinstance(text, int):
        if text < 0:
            raise OptionError(f"invalid size {text}: sizes cannot be negative")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise OptionError(
            f"invalid size {text!r}: use a byte count or a number with one of "
            "B, KB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary), e.g. 24GiB"
        )
    value = float(m.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value > _MAX_BYTES:
        raise OptionError(f"invalid size {text!r}: larger than any machine (limit 1 EiB)")
    if unit == "" and "." in m.group(1):
        raise OptionError(f"invalid size {text!r}: a bare byte count must be a whole number")
    return int(value)


def format_size(n_bytes: int) -> str:
    """Human-readable binary size, e.g. 1.50 GiB."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise OptionError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise OptionError(f"unsupported dtype {dtype}: choose one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class CompileOptions:
    """What the user asked for. The target GPU is `target_device` (default `cuda:0`) with
    `gpu_budget_bytes`: it holds the dense weights, the KV reserve and experts; `more_gpus` are
    further GPUs (device -> budget) that hold experts only."""

    gpu_budget_bytes: int
    fast_experts: int | None = None  # force the best N experts onto the GPU (checked against the budget)
    context_tokens: int = 4096  # KV-cache reserve: tokens per sequence
    batch_size: int = 1  # KV-cache reserve: sequences
    dtype: str | None = None  # None: the checkpoint's dtype
    target_device: str = "cuda:0"
    hardware: HardwareProfile | None = None  # prices the plan (predict_speed); None: no prediction
    cpu_memory_bytes: int | None = None  # host memory for the run (--cpu-memory); None: the profile's, if any
    popularity: Popularity | None = None  # measured routing counts (--popularity); None: uniform
    more_gpus: tuple[tuple[str, int], ...] = ()  # further GPUs for experts: (cuda:N, budget bytes)
    micro_batches: int | None = None  # None: the cost model decides (schedule_overlap)

    def __post_init__(self) -> None:
        if self.gpu_budget_bytes < 0:
            raise OptionError("the GPU budget cannot be negative")
        if self.fast_experts is not None and self.fast_experts < 0:
            raise OptionError(f"--fast-experts must be >= 0, got {self.fast_experts}")
        if self.context_tokens <= 0:
            raise OptionError(f"--context must be a positive number of tokens, got {self.context_tokens}")
        if self.batch_size <= 0:
            raise OptionError(f"--batch must be a positive number of sequences, got {self.batch_size}")
        if self.dtype is not None:
            parse_dtype(self.dtype)
        if self.micro_batches is not None and not 1 <= self.micro_batches <= self.batch_size:
            raise OptionError(
                f"--micro-batches must be between 1 and --batch ({self.batch_size}), got {self.micro_batches}"
            )
        if not re.fullmatch(r"cuda:[0-9]+", self.target_device):
            raise OptionError(f"unknown target device {self.target_device!r}: use cuda:0, cuda:1, ...")
        seen = {self.target_device}
        for dev, budget in self.more_gpus:
            if not re.fullmatch(r"cuda:[0-9]{1,3}", dev) or dev in seen or budget < 0:
                raise OptionError(f"invalid GPU {dev!r} in --gpu-memory: name each cuda:N once, with a size")
            seen.add(dev)


def parse_gpu_memory(text: str | int) -> list[tuple[str, int]]:
    """`24GiB` (one GPU, cuda:0) or `cuda:0=20GiB,cuda:1=10GiB` (the first holds the dense weights)."""
    if isinstance(text, int) or "=" not in str(text):
        return [("cuda:0", parse_size(text))]
    out: list[tuple[str, int]] = []
    for part in str(text).split(","):
        dev, _, size = part.strip().partition("=")
        dev = dev.strip()
        if not re.fullmatch(r"cuda:[0-9]{1,3}", dev):
            raise OptionError(
                f"invalid --gpu-memory part {part.strip()!r}: write cuda:N=SIZE, e.g. cuda:0=20GiB,cuda:1=10GiB"
            )
        if dev in (d for d, _ in out):
            raise OptionError(f"--gpu-memory names {dev} twice")
        out.append((dev, parse_size(size)))
    return out

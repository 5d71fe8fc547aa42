"""Compile options: sizes, dtypes, the target's budgets. Parsed once, validated, frozen."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fiddlerc.errors import OptionError
from fiddlerc.hardware import HardwareProfile
from fiddlerc.popularity import Popularity
from fiddlerc.units import parse_dtype, parse_size


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

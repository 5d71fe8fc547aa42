"""Hardware profiles: what a target machine can do, as JSON with a source for every number.

Named profiles ship in `fiddlerc/profiles/` (the Fiddler paper's machines and common ones); a user
can pass a file of their own. A profile is an explicit compile input, recorded by name and hash.
A profile without a GPU is a CPU-only machine: both tiers share its cores and memory bus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

from fiddlerc.errors import OptionError

PROFILE_DIR = Path(__file__).parent / "profiles"


def cache_dir() -> Path:
    """Where measurements of this machine are cached (calibration profiles, kernel choices)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fiddlerc" / "calibration"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide which kernels run fast (fiddlerc's C kernels, MKL's and oneDNN's).
_KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx_vnni")


def cpu_features() -> str:
    """This CPU's kernel-relevant flags and usable core count, e.g. "avx2 fma f16c / 2 cores": part of every
    measurement's cache key, since cloud machines of different generations share one model name
    ("AMD EPYC") and host name (seen here: sessions on AVX2-only and on AVX512-BF16 machines alike)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return " ".join(f for f in _KERNEL_FLAGS if f in flags) + f" / {cores} cores"


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int
    mem_bw_gbps: float  # device memory read bandwidth, GB/s
    matmul_tflops: float  # dense matmul throughput in the compute dtype
    h2d_gbps: float  # pinned host-to-device copy bandwidth
    d2h_gbps: float  # pinned device-to-host copy bandwidth
    call_overhead_ms: float  # fixed cost of one expert call (launches, sync)
    # Fixed costs of the framework when this is the fast tier, beyond reading weights: per decoder
    # layer (kernel launches, the per-layer host sync, dispatch) and per decode step.
    layer_overhead_ms: float = 0.0
    step_overhead_ms: float = 0.0


@dataclass(frozen=True)
class CpuSpec:
    name: str
    cores: int
    mem_bw_gbps: float  # read bandwidth an expert call achieves with all cores
    matmul_tflops: float
    call_overhead_ms: float
    memory_bytes: int
    # Measured ms per expert call by token count, for experts of exactly `expert_curve_bytes` bytes in the
    # compute dtype, stored in `expert_curve_format` ("" the compute dtype, else a quantized format of
    # fiddlerc.quant_format): calibration writes them; the cost model interpolates the curve instead of
    # using the roofline for such experts.
    expert_curve: tuple[tuple[int, float], ...] = ()
    expert_curve_bytes: int = 0
    expert_curve_format: str = ""
    # As GpuSpec's, for a CPU-only machine (where the fast tier is the CPU itself).
    layer_overhead_ms: float = 0.0
    step_overhead_ms: float = 0.0
    disk_gbps: float = 0.0  # sequential read from the disk holding the weights (paging); 0: unknown


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    cpu: CpuSpec
    gpu: GpuSpec | None  # None: CPU-only, both tiers run on the CPU and share it
    sources: dict[str, str]

    @property
    def cpu_only(self) -> bool:
        return self.gpu is None

    def cpu_side(self) -> HardwareProfile:
        """This profile without its GPU: what a CPU-only plan is priced on."""
        if self.gpu is None:
            return self
        return replace(self, name=f"{self.name}-cpu", gpu=None, description=f"{self.description}, its CPU alone")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


def _spec(cls, data, where: str):
    if not isinstance(data, dict):
        raise OptionError(f"hardware profile {where}: expected an object")
    names = [f.name for f in fields(cls)]
    required = [f.name for f in fields(cls) if f.default is MISSING]
    if not set(required) <= set(data) <= set(names):
        raise OptionError(f"hardware profile {where}: fields must be exactly {names}")
    data = dict(data)
    for f in fields(cls):
        if f.name not in data:
            continue
        v = data[f.name]
        if f.name == "expert_curve":
            ok = isinstance(v, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and p[0] > 0
                and isinstance(p[1], (int, float)) and math.isfinite(p[1]) and p[1] > 0
                for p in v
            ) and [p[0] for p in v] == sorted({p[0] for p in v})  # fmt: skip
            data[f.name] = tuple((int(p[0]), float(p[1])) for p in v) if ok else v
        elif f.name == "expert_curve_bytes":
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
        elif f.name == "name":
            ok = isinstance(v, str) and 0 < len(v) <= 100
        elif f.name == "expert_curve_format":
            ok = isinstance(v, str) and len(v) <= 16 and (v == "" or v.isalnum())
        elif f.type in ("int",):
            ok = isinstance(v, int) and not isinstance(v, bool) and v > 0
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        if not ok:
            raise OptionError(f"hardware profile {where}.{f.name}: invalid value {v!r}")
    return cls(**data)


def profile_from_json(text: str | bytes, origin: str = "profile") -> HardwareProfile:
    """Parse and check a profile; any malformed input is an OptionError naming the field."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise OptionError(f"hardware profile {origin} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, dict) or set(data) != {f.name for f in fields(HardwareProfile)}:
        raise OptionError(f"hardware profile {origin}: expected the keys {[f.name for f in fields(HardwareProfile)]}")
    name, desc, sources = data["name"], data["description"], data["sources"]
    if not (isinstance(name, str) and name.replace("-", "").replace("_", "").isalnum() and len(name) <= 60):
        raise OptionError(f"hardware profile {origin}: name must be letters, digits, '-' or '_'")
    if (
        not isinstance(desc, str)
        or not isinstance(sources, dict)
        or not all(isinstance(v, str) for v in sources.values())
    ):
        raise OptionError(f"hardware profile {origin}: description and sources must be text")
    cpu = _spec(CpuSpec, data["cpu"], f"{origin}.cpu")
    gpu = None if data["gpu"] is None else _spec(GpuSpec, data["gpu"], f"{origin}.gpu")
    return HardwareProfile(name=name, description=desc, cpu=cpu, gpu=gpu, sources=dict(sources))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_file: str | Path) -> HardwareProfile:
    """A shipped profile by name, or a JSON file of one."""
    path = Path(name_or_file)
    if str(name_or_file) in profile_names():
        path = PROFILE_DIR / f"{name_or_file}.json"
    elif not path.is_file():
        raise OptionError(
            f"unknown hardware {str(name_or_file)!r}: give a profile file or one of {', '.join(profile_names())}"
        )
    return profile_from_json(path.read_bytes(), str(name_or_file))

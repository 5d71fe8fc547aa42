"""`fiddlerc bench OUT`: the compiled model beside Hugging Face on the same weights, threads and device.

Decode tokens/s, prefill tokens/s and time to first token, for the compiled model and, in the same
run, Hugging Face `generate`, alternating the two and taking medians (the machine is shared and
noisy); resident memory each adds when loaded; and a memory-bandwidth probe with the same thread
count, so decode speed is also stated as a fraction of the roofline: the bytes one decode step must
read (dense weights, the KV cache so far, and k experts per MoE layer) over the time it takes,
against the measured bandwidth. Startup is measured apart, in a fresh process (`Startup`): load and
first pass against reading the weight files once, and resident memory after every expert ran against
the weight bytes. Prints a table and ratios, and writes everything as JSON.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fiddlerc.errors import OptionError
from fiddlerc.measure import POOL_BYTES, median_seconds, seconds
from fiddlerc.progress import progress
from fiddlerc.quant_format import stored_bytes
from fiddlerc.units import parse_dtype


@dataclass
class Speed:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    time_to_first_token_s: float
    resident_bytes_added: int  # by loading the model


@dataclass
class Startup:
    """Load and a first forward pass, against reading the weight files once, in a fresh process. Measured
    after the files were read (page cache warm for both), after one earlier load on this machine (kernel
    choices, measured once per machine, are cached) and after importing the architecture's transformers
    code (timed apart: Hugging Face's own loader pays it as well)."""

    import_s: float  # importing the architecture's transformers code (any loader pays it; not in load_s)
    read_files_s: float  # every safetensors file read once, start to end
    load_s: float
    first_pass_s: float  # a forward pass over a prompt
    experts_touched: float  # fraction of (layer, expert) pairs that prompt was routed to
    resident_bytes: int  # resident memory added by the load, the first pass, and one call of every expert
    weight_bytes: int  # every weight, in the compute dtype

    @property
    def ratios(self) -> dict:
        return {
            "load_over_read": self.load_s / self.read_files_s,
            "startup_over_read": (self.load_s + self.first_pass_s) / self.read_files_s,
            "resident_over_weights": self.resident_bytes / self.weight_bytes,
        }


@dataclass
class ExpertKernel:
    """One-token expert calls on the CPU as the runtime makes them (`expert_kernel`): bytes of expert
    weights one pass over every CPU expert reads, and its median time."""

    bytes_read: int
    seconds: float
    top_k: int
    spread: bool  # a call's experts ran on the main thread and the CPU worker at once

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9


@dataclass
class BenchResult:
    machine: dict
    workload: dict
    read_gbps: float  # the probe: sequential read with the bench's thread count
    decode_bytes_per_token: int  # what one decode step must read (batch 1, mid-generation)
    fiddlerc: Speed
    hf: Speed | None = None
    ratios: dict = field(default_factory=dict)
    startup: Startup | None = None
    experts: ExpertKernel | None = None  # None: no expert runs on the CPU
    notes: list[str] = field(default_factory=list)  # what the table leaves out, and why

    @property
    def roofline(self) -> dict:
        """Fraction of the memory roofline each decode reaches."""
        out = {}
        for name, speed in (("fiddlerc", self.fiddlerc), ("hf", self.hf)):
            if speed is not None:
                steps_per_s = speed.decode_tokens_per_s / self.workload["batch"]  # a step reads the weights once
                achieved = self.decode_bytes_per_token * steps_per_s / 1e9
                out[name] = achieved / self.read_gbps
        return out

    def to_json(self) -> str:
        extra = {"startup_ratios": self.startup.ratios} if self.startup is not None else {}
        if self.experts is not None:
            extra["expert_kernel_of_read_bandwidth"] = self.experts.gbps / self.read_gbps
        return json.dumps({**asdict(self), "roofline": self.roofline, **extra}, indent=1) + "\n"


def read_bandwidth_gbps(device: torch.device, rounds: int = 5) -> float:
    """Median GB/s of summing a buffer larger than the caches (what a memory-bound kernel can read)."""
    x = torch.ones(POOL_BYTES // 4, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    return POOL_BYTES / median_seconds(x.sum, rounds, sync=sync) / 1e9


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def decode_bytes_per_token(plan, position: int) -> int:
    """Bytes one decode step of one sequence reads at `position`: dense weights, the KV cache and the
    routed experts (k per MoE layer)."""
    mem = plan.memory
    kv_per_token = mem.kv_reserve_bytes // (plan.target.context_tokens * plan.target.batch_size)
    itemsize = parse_dtype(plan.model.dtype).itemsize
    experts = 0.0
    for ml in plan.moe_layers:  # a cpu-tier expert reads its stored (perhaps quantized) bytes
        cpu = sum(e.device == "cpu" for e in plan.experts if e.layer == ml.layer) / ml.num_experts
        cpu_bytes = stored_bytes(ml.bytes_per_expert, itemsize, plan.target.expert_dtype)
        experts += ml.top_k * (cpu * cpu_bytes + (1 - cpu) * ml.bytes_per_expert)
    return mem.dense_bytes + kv_per_token * position + round(experts)


def read_files_s(folder: Path) -> float:
    """Seconds to read every safetensors file of a model folder once, in 64 MiB pieces."""
    buf = bytearray(64 * 2**20)
    t0 = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


@torch.no_grad()
def _run_every_expert(model, dtype: torch.dtype) -> None:
    """Call every expert of every MoE layer once (one token each), as a forward pass would that routes
    to all of them: their weights (or packed copies) are then resident."""
    for placed in model.placed_experts:
        n, k = placed.num_experts, min(2, placed.num_experts)
        hidden = placed.weights[0].w_out.shape[0]
        x = torch.zeros(n, hidden, dtype=dtype, device=placed.fast_device)
        picks = (torch.arange(n)[:, None] + torch.arange(k)[None, :]) % n
        placed(x, picks.to(placed.fast_device), torch.full((n, k), 1 / k, dtype=dtype, device=placed.fast_device))


def startup_here(out_dir: str, device: str, threads: int) -> dict:
    """`Startup`'s numbers, measured in this process (which must not have loaded a model before)."""
    from fiddlerc.artifact import MANIFEST_FILE, PLAN_FILE
    from fiddlerc.loader import load
    from fiddlerc.plan_file import plan_from_json

    torch.set_num_threads(threads)
    plan = plan_from_json((Path(out_dir) / PLAN_FILE).read_text())
    model_dir = Path(json.loads((Path(out_dir) / MANIFEST_FILE).read_text())["model_dir"])
    t0 = time.perf_counter()
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model_dir))]  # imports the modeling file
    import_s = time.perf_counter() - t0
    read_s = read_files_s(model_dir)
    base = _rss()
    t0 = time.perf_counter()
    model = load(out_dir, device=device, num_threads=threads)
    t1 = time.perf_counter()
    vocab = model.config.vocab_size
    ids = torch.randint(
        3, max(4, vocab - 1), (1, min(64, plan.target.context_tokens)), generator=torch.Generator().manual_seed(1)
    )
    model(ids)
    t2 = time.perf_counter()
    layers = model.routing_stats()["layers"].values()
    touched = sum(sum(1 for n in v["per_expert"] if n) for v in layers) / max(
        1, sum(len(v["per_expert"]) for v in layers)
    )
    _run_every_expert(model, parse_dtype(plan.model.dtype))  # a prompt's routing rarely reaches them all
    resident = _rss() - base
    model.close()
    return asdict(Startup(import_s, read_s, t1 - t0, t2 - t1, touched, resident, stored_weight_bytes(plan, out_dir)))


def model_bytes(plan) -> int:
    """Every weight of the model in the compute dtype, as Hugging Face holds it."""
    return plan.memory.dense_bytes + sum(ml.num_experts * ml.bytes_per_expert for ml in plan.moe_layers)


def stored_weight_bytes(plan, out_dir: str | Path) -> int:
    """Every weight as this run holds it: the compute dtype's bytes, less those of the matrices the compiled
    folder quantized, plus the quantized file."""
    from fiddlerc.model.folder import open_weight_files
    from fiddlerc.model.quantize import QUANTIZED_FILE

    total = model_bytes(plan)
    if not plan.target.quantizes:
        return total
    itemsize = parse_dtype(plan.model.dtype).itemsize
    quantized = open_weight_files(out_dir, [QUANTIZED_FILE])
    for key, info in quantized.tensors.items():
        if key.endswith(".data"):  # int8: one byte a weight; int4: two weights a byte
            params = math.prod(info.shape) * (2 if info.dtype == "U8" else 1)
            total -= params * itemsize
    return total + (Path(out_dir) / QUANTIZED_FILE).stat().st_size


def measure_startup(out_dir: str | Path, device: torch.device, threads: int) -> Startup:
    """Startup of the compiled model (see `Startup`), in a fresh Python process, so that memory an earlier
    load freed cannot hide what this one adds; a first such run caches the kernel choices and pages."""
    code = "import json, sys; from fiddlerc.tools.bench import startup_here; print(json.dumps(startup_here(*sys.argv[1:3], int(sys.argv[3]))))"
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(out_dir), str(device), str(threads)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"measuring startup failed:\n{proc.stderr[-2000:]}")
    return Startup(**json.loads(proc.stdout.strip().splitlines()[-1]))


def expert_kernel(model, rounds: int = 5) -> ExpertKernel | None:
    """Time one-token calls over every CPU expert of every layer (more weights than the caches), `top_k` at
    a time, as the runtime makes them: on a CPU-only machine through the placed experts' decode path
    (spread over the main thread and the CPU worker where the loader chose that), beside a GPU the CPU
    worker's calls one after the other. Run after the timed generation: the calls count in routing_stats."""
    k = int(getattr(model.config, "num_experts_per_tok", 2) or 2)
    cpu_only = model.device.type == "cpu"
    calls, nbytes = [], 0
    for p in model.placed_experts:
        cpu = [e for e, w in enumerate(p.weights) if w.w_out.device.type == "cpu"]
        for i in range(0, len(cpu), k):
            picks = cpu[i : i + k]
            calls.append((p, picks))
            for e in picks:
                w = p.weights[e]
                nbytes += sum(t.nbytes for t in (*w.w_in, *(w.b_in or ()), w.w_out, w.b_out) if t is not None)
    if not calls:
        return None
    dtype = calls[0][0].weights[calls[0][1][0]].w_out.dtype
    x = torch.randn(1, model.config.hidden_size).to(dtype)

    def one_pass() -> None:
        with torch.no_grad():
            for p, picks in calls:
                weights = torch.full((1, len(picks)), 1 / len(picks), dtype=dtype)
                if cpu_only:
                    p(x, torch.tensor([picks]), weights)
                else:
                    p.run_cpu([(e, x, weights[:, :1]) for e in picks])

    return ExpertKernel(
        nbytes, median_seconds(one_pass, rounds), k, cpu_only and any(p.spread for p in model.placed_experts)
    )


def _speeds(generate, names: list[str], shape: tuple[int, int], new_tokens: int, rounds: int, rss: dict) -> dict:
    """Time to first token and full generations of each runner, alternating them round by round so that
    noise hits all alike; medians. Decode speed is what the tokens after the first took."""
    batch, prompt_tokens = shape
    for name in names:  # warm up
        generate(name, 2)
    full: dict[str, list[float]] = {n: [] for n in names}
    first: dict[str, list[float]] = {n: [] for n in names}
    for _ in progress(range(rounds), "bench rounds"):
        for name in names:
            first[name] += seconds(lambda name=name: generate(name, 1), 1, warmup=0)
            full[name] += seconds(lambda name=name: generate(name, new_tokens), 1, warmup=0)
    speeds = {}
    for name in names:
        ttft, total = statistics.median(first[name]), statistics.median(full[name])
        decode = batch * (new_tokens - 1) / max(total - ttft, 1e-9) if new_tokens > 1 else float("nan")
        speeds[name] = Speed(
            decode_tokens_per_s=decode,
            prefill_tokens_per_s=batch * prompt_tokens / ttft,
            time_to_first_token_s=ttft,
            resident_bytes_added=rss[name],
        )
    return speeds


def bench(
    out_dir: str | Path,
    *,
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    batch: int = 1,
    rounds: int = 3,
    threads: int | None = None,
    device: str | None = None,
    hf: bool = True,
) -> BenchResult:
    """Measure the compiled model in `out_dir` (and Hugging Face on its weights, unless `hf` is False)."""
    from fiddlerc.artifact import read_plan
    from fiddlerc.hardware import cpu_name
    from fiddlerc.loader import load
    from fiddlerc.loader.devices import resolve_device

    if min(prompt_tokens, new_tokens, batch, rounds) < 1:
        raise ValueError("prompt, new tokens, batch and rounds must be positive")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    dev = resolve_device(device, read_plan(out_dir).target.cpu_only)
    startup = measure_startup(out_dir, dev, threads)
    gc.collect()
    base = _rss()
    model = load(out_dir, device=str(dev), num_threads=threads)
    ours_rss = _rss() - base
    plan = model.plan
    vocab = model.config.vocab_size
    ids = torch.randint(3, max(4, vocab - 1), (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
    runners = {"fiddlerc": model}
    ref = None
    hf_rss = 0
    note = hf_fits(plan, dev) if hf else None
    if note is not None:
        hf = False
    if hf:
        from transformers import AutoModelForCausalLM

        base = _rss()
        try:
            ref = AutoModelForCausalLM.from_pretrained(
                model.artifact.folder.path, dtype=parse_dtype(plan.model.dtype)
            ).eval().to(dev)  # fmt: skip
        except ImportError as e:  # e.g. an MXFP4 checkpoint, which transformers loads only with accelerate
            raise OptionError(
                f"the Hugging Face baseline of this model cannot be loaded here ({e}): install what it names, "
                "or bench without it (--no-hf)"
            ) from None
        hf_rss = _rss() - base
        runners["hf"] = ref

    def generate(name: str, n: int) -> None:
        if name == "fiddlerc":
            model.generate(ids, max_new_tokens=n, ignore_eos=True)
            return
        with torch.no_grad():
            ref.generate(
                ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

    rss = {"fiddlerc": ours_rss, "hf": hf_rss}
    speeds = _speeds(generate, list(runners), ids.shape, new_tokens, rounds, rss)
    experts = expert_kernel(model)
    model.close()
    ref = runners = None
    gc.collect()
    result = BenchResult(
        machine={
            "cpu": cpu_name(),
            "threads": threads,
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "torch": torch.__version__,
        },
        workload={
            "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens,
            "batch": batch,
            "rounds": rounds,
            "dtype": plan.model.dtype,
        },  # fmt: skip
        read_gbps=read_bandwidth_gbps(dev),
        decode_bytes_per_token=decode_bytes_per_token(plan, prompt_tokens + new_tokens // 2),
        fiddlerc=speeds["fiddlerc"],
        hf=speeds.get("hf"),
        startup=startup,
        experts=experts,
        notes=[note] if note is not None else [],
    )
    if result.hf is not None:
        result.ratios = {  # each > 1 where fiddlerc is the faster
            "decode": result.fiddlerc.decode_tokens_per_s / result.hf.decode_tokens_per_s,
            "prefill": result.fiddlerc.prefill_tokens_per_s / result.hf.prefill_tokens_per_s,
            "time_to_first_token": result.hf.time_to_first_token_s / result.fiddlerc.time_to_first_token_s,
        }
    return result


def hf_fits(plan, dev: torch.device) -> str | None:
    """None where the Hugging Face baseline, loaded whole onto `dev` as it is measured, fits there; else the
    note that says why it is skipped (its whole model on one GPU is what fiddlerc exists to avoid)."""
    if dev.type != "cuda":
        return None
    need = model_bytes(plan)
    free, _ = torch.cuda.mem_get_info(dev)
    if need <= 0.9 * free:
        return None
    return (f"Hugging Face baseline skipped: the whole model ({need / 2**30:.1f} GiB) does not fit in the "
            f"{free / 2**30:.1f} GiB free on {dev}")  # fmt: skip


def bench_table(r: BenchResult) -> str:
    w = r.workload
    rows = [
        f"machine: {r.machine['cpu']}, {r.machine['threads']} threads, device {r.machine['device']}"
        + (f" ({r.machine['gpu']})" if r.machine["gpu"] else "")
        + f", torch {r.machine['torch']}; read bandwidth {r.read_gbps:.1f} GB/s",
        f"workload: {w['dtype']}, batch {w['batch']}, prompt {w['prompt_tokens']}, {w['new_tokens']} new tokens, "
        f"median of {w['rounds']} alternating rounds; a decode step reads {r.decode_bytes_per_token / 1e6:.0f} MB",
        f"{'':10} {'decode tok/s':>12} {'prefill tok/s':>13} {'TTFT s':>8} {'roofline':>9} {'memory added':>13}",
    ]
    roof = r.roofline
    for name, s in (("fiddlerc", r.fiddlerc), ("HF", r.hf)):
        if s is None:
            continue
        rows.append(
            f"{name:10} {s.decode_tokens_per_s:12.1f} {s.prefill_tokens_per_s:13.1f} {s.time_to_first_token_s:8.3f} "
            f"{roof['fiddlerc' if name == 'fiddlerc' else 'hf']:9.1%} {s.resident_bytes_added / 1e9:11.2f} GB"
        )
    if r.ratios:
        rows.append(
            f"fiddlerc vs HF (> 1: fiddlerc faster): decode {r.ratios['decode']:.2f}x, prefill {r.ratios['prefill']:.2f}x, "
            f"time to first token {r.ratios['time_to_first_token']:.2f}x"
        )
    if r.experts is not None:
        e = r.experts
        how = "spread over the main thread and the CPU worker" if e.spread else "one after the other"
        rows.append(
            f"expert kernel at 1 token: {e.gbps:.1f} GB/s = {e.gbps / r.read_gbps:.0%} of the read bandwidth "
            f"(every CPU expert, {e.top_k} per call, {how})"
        )
    if r.startup is not None:
        st, ratios = r.startup, r.startup.ratios
        rows.append(
            f"startup (fresh process, after {st.import_s:.1f} s importing the model's transformers code): "
            f"reading the weight files once {st.read_files_s:.2f} s; load {st.load_s:.2f} s "
            f"({ratios['load_over_read']:.2f}x), + first pass {st.first_pass_s:.2f} s ({ratios['startup_over_read']:.2f}x)"
        )
        rows.append(
            f"memory: resident after the first pass and one call of every expert {st.resident_bytes / 1e9:.2f} GB "
            f"for {st.weight_bytes / 1e9:.2f} GB of weights ({ratios['resident_over_weights']:.2f}x)"
        )
    rows += r.notes
    return "\n".join(rows) + "\n"

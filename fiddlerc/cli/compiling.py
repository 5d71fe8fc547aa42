"""compile, report, plan, verify, architectures: the commands that make a plan or read one."""

from __future__ import annotations

import argparse
import time

from fiddlerc.errors import OptionError
from fiddlerc.files import output_file, write_atomic
from fiddlerc.plan import DENSE_QUANTIZED, DTYPE_NAMES, EXPERT_DTYPES

DEFAULT_HARDWARE = "quadro-rtx6000-skylake48"  # what `plan` prices on without --hardware: the Fiddler paper's machine
MICRO_HELP = "split a batch into N micro-batches whose CPU experts overlap each other's GPU work (default: the cost model's choice)"
POPULARITY_HELP = (
    "measured routing counts (the JSON `fiddlerc popularity` writes) to place by instead of uniform routing"
)
EXPERT_DTYPE_HELP = (
    "store and compute the CPU-tier experts quantized in blocks of 32: int8 (8.5 bits per weight) or int4 (4.5); "
    "mxfp4 (4.25) is an MXFP4 checkpoint's own format, its default; compute: the compute dtype, the default "
    "otherwise (an MXFP4 checkpoint's experts dequantized exactly). GPU-tier experts keep the compute dtype"
)
CPU_MEMORY_HELP = (
    "host memory for the run, e.g. 64GiB (default: the hardware profile's); "
    "CPU-tier weights beyond it page from disk, and the prediction says so"
)


def _planning_options(args: argparse.Namespace) -> dict:
    keys = ("fast_experts", "context", "batch", "dtype", "hardware", "cpu_memory", "popularity", "micro_batches",
            "expert_dtype", "dense_dtype")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def _cmd_compile(args: argparse.Namespace) -> int:
    from fiddlerc.api import compile

    t0 = time.perf_counter()
    art = compile(args.model_dir, args.out, args.gpu_memory, **_planning_options(args))
    if art.plan.target.budget_note is not None and not art.plan.target.cpu_only:
        print(f"GPU budget: {art.plan.target.budget_note}")
    print(f"compiled {art.folder.path} -> {art.path} in {time.perf_counter() - t0:.2f} s: {_placement_line(art.plan)}")
    return 0


def _placement_line(plan) -> str:
    """Where the experts went, and what that means on this machine."""
    t = plan.target
    if t.cpu_only:
        why = t.budget_note or "--gpu-memory 0"
        return f"CPU-only plan ({why}): all {len(plan.experts)} experts and every other weight in host memory"
    import torch

    n_fast = sum(1 for e in plan.experts if e.device != "cpu")
    line = f"{n_fast} of {len(plan.experts)} experts on {' + '.join(t.gpus())}"
    if not torch.cuda.is_available():
        line += f" (planned for a GPU; this machine has none, so {t.device} runs on the CPU here)"
    return line


def _cmd_report(args: argparse.Namespace) -> int:
    from fiddlerc.artifact import verify_artifact
    from fiddlerc.compiler.report import report_html, report_json, report_text

    if args.output is not None and args.format != "html":
        raise OptionError("-o/--output is where --format html writes: add --format html, or drop -o")
    path = output_file(args.output, "--output") if args.output else None
    art, _ = verify_artifact(args.out, args.model)
    if args.format == "html":
        path = path or art.path / "report.html"
        write_atomic(path, report_html(art.plan))
        print(f"wrote {path}")
        return 0
    print(report_json(art.plan) if args.format == "json" else report_text(art.plan), end="")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from fiddlerc.hardware import load_profile, profile_names

    if args.list_hardware:  # one per line, name first
        for name in profile_names():
            print(f"{name}\t{load_profile(name).description}")
        return 0
    if not args.model:
        raise OptionError("plan needs CONFIG_OR_DIR (or --list-hardware)")
    from fiddlerc.api import plan_and_profile
    from fiddlerc.compiler.report import report_text
    from fiddlerc.compiler.simulate import Workload, simulate

    trace = output_file(args.trace, "--trace") if args.trace else None
    html = output_file(args.html, "--html") if args.html else None
    options = _planning_options(args)
    why = "given"
    if options["hardware"] is None:
        options["hardware"], why = (
            DEFAULT_HARDWARE,
            "the default, as no --hardware was given; see --list-hardware, or auto to measure this machine",
        )
    p, profile = plan_and_profile(args.model, args.gpu_memory, **options)
    print(f"hardware profile: {profile.name} ({why})")
    print(report_text(p), end="")
    work = Workload(args.prompt_tokens, args.output_tokens, batch=args.batch)
    run = simulate(p, profile, work, trace=bool(args.trace))
    if args.trace:
        write_atomic(trace, run.trace_json())
        print(f"wrote the simulated schedule to {args.trace} (open in https://ui.perfetto.dev)")
    busy = ", ".join(f"{name} {ms / 1000:.1f} s" for name, ms in run.busy_ms.items())
    if args.html:
        from fiddlerc.compiler.report import report_html

        write_atomic(html, report_html(p))
        print(f"wrote {args.html}")
    print(
        f"simulated on {p.target.hardware} (prompt {work.prompt_tokens}, output {work.output_tokens}, batch {work.batch}): "
        f"prefill {run.prefill_ms / 1000:.2f} s, decode {run.decode_tokens_per_s:.2f} tokens/s, "
        f"end to end {run.tokens_per_s:.2f} tokens/s; busy {busy}"
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from fiddlerc.artifact import verify_all

    art = verify_all(args.out, args.model)
    what = "plan, module, sources and the model's weight headers"
    if art.plan.target.quantizes:
        what += ", and every byte of its quantized weights"
    print(f"{args.out}: {what} verified")
    return 0


def _cmd_architectures(args: argparse.Namespace) -> int:
    from fiddlerc.model.families import supported_text

    print(supported_text())
    return 0


def _target_options(p: argparse.ArgumentParser) -> None:
    """What `compile` and `plan` both turn into the plan's target and compile options."""
    p.add_argument(
        "--gpu-memory",
        default=None,
        help="budget of the target GPU cuda:0, e.g. 24GiB, 512MiB, 24GB, or bytes; several as cuda:0=20GiB,cuda:1=10GiB; "
        "0: a CPU-only plan (no GPU tier). Default: cuda:0's free memory now less 10%% of its memory (at least 1 GiB), "
        "or a CPU-only plan on a machine without CUDA",
    )
    p.add_argument(
        "--fast-experts", type=int, default=None, metavar="N", help="put exactly the best N experts on the GPU"
    )
    p.add_argument(
        "--context", type=int, default=4096, help="tokens per sequence to reserve KV cache for (default 4096)"
    )
    p.add_argument("--batch", type=int, default=1, help="sequences to reserve KV cache for (default 1)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--cpu-memory", default=None, help=CPU_MEMORY_HELP)
    p.add_argument("--popularity", default=None, metavar="FILE", help=POPULARITY_HELP)
    p.add_argument("--micro-batches", type=int, default=None, metavar="N", help=MICRO_HELP)
    p.add_argument("--expert-dtype", choices=list(EXPERT_DTYPES), default=None, help=EXPERT_DTYPE_HELP)
    p.add_argument(
        "--dense-dtype",
        choices=list(DENSE_QUANTIZED),
        default=None,
        help="the same for the dense projections (attention, shared experts, lm_head) where they run on the CPU",
    )


def add_commands(sub) -> None:
    """compile, report, plan, verify and architectures, on the command's subparsers."""
    c = sub.add_parser("compile", help="compile a Hugging Face MoE model folder")
    c.add_argument("model_dir")
    c.add_argument("-o", "--out", required=True, help="output folder")
    _target_options(c)
    c.add_argument(
        "--hardware",
        default=None,
        help="price the plan on a hardware profile: a name (plan --list-hardware), a JSON file, or auto (this machine, calibrated)",
    )
    c.set_defaults(func=_cmd_compile)

    r = sub.add_parser("report", help="show the placement of a compiled model and why")
    r.add_argument("out")
    r.add_argument("--format", choices=["text", "json", "html"], default="text")
    r.add_argument("-o", "--output", default=None, help="with --format html: where to write (default OUT/report.html)")
    r.add_argument("--model", default=None, help="model folder, if it moved since compiling")
    r.set_defaults(func=_cmd_report)

    pl = sub.add_parser("plan", help="plan a model from its config alone and predict its decode speed")
    pl.add_argument("model", nargs="?", help="config.json or a folder holding one (weights not needed)")
    _target_options(pl)
    pl.add_argument(
        "--hardware",
        default=None,
        help=f"profile name, JSON file (see --list-hardware), or auto (this machine, calibrated); default {DEFAULT_HARDWARE}",
    )
    pl.add_argument("--list-hardware", action="store_true", help="list the shipped hardware profiles, one per line")
    pl.add_argument("--html", default=None, metavar="FILE", help="also write the HTML report of the plan there")
    pl.add_argument(
        "--trace", default=None, metavar="FILE", help="write the simulated schedule as a Chrome/Perfetto trace"
    )
    pl.add_argument("--prompt-tokens", type=int, default=128, help="simulated workload: prompt length (default 128)")
    pl.add_argument("--output-tokens", type=int, default=256, help="simulated workload: tokens generated (default 256)")
    pl.set_defaults(func=_cmd_plan)

    v = sub.add_parser("verify", help="check a compiled folder in full (load checks its large files cheaply)")
    v.add_argument("out")
    v.add_argument("--model", default=None, help="model folder, if it moved since compiling")
    v.set_defaults(func=_cmd_verify)

    a = sub.add_parser("architectures", help="list the MoE families checked end to end")
    a.set_defaults(func=_cmd_architectures)

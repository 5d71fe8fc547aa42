"""The `fiddlerc` command: compile, report, run, demo. A thin layer over the API."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from fiddlerc.plan import DENSE_QUANTIZED, DTYPE_NAMES, EXPERT_DTYPES
from fiddlerc.version import __version__

DEFAULT_HARDWARE = "quadro-rtx6000-skylake48"  # what `plan` prices on without --hardware: the Fiddler paper's machine
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
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

    art, _ = verify_artifact(args.out, args.model)
    if args.format == "html":
        path = Path(args.output) if args.output else art.path / "report.html"
        path.write_text(report_html(art.plan), encoding="utf-8")
        print(f"wrote {path}")
        return 0
    print(report_json(art.plan) if args.format == "json" else report_text(art.plan), end="")
    return 0


def _generate_text(
    model, tokenizer, prompt: str, max_new_tokens: int, temperature: float, seed: int | None, num_beams: int = 1
) -> tuple[str, int, float]:
    import torch

    ids = torch.tensor([tokenizer.encode(prompt)])
    if num_beams > 1:  # the best beam is known only at the end: no streaming
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
        text = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        print(text)
        return text, out.shape[1] - ids.shape[1], time.perf_counter() - t0
    shown = ""
    new: list[int] = []

    def on_token(tok) -> None:
        nonlocal shown
        if _interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt something swallowed: stop at this token
            raise KeyboardInterrupt
        new.append(int(tok[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        print(text[len(shown) :], end="", flush=True)
        shown = text

    t0 = time.perf_counter()
    model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        seed=seed,
        on_token=on_token,
    )
    print()
    return shown, len(new), time.perf_counter() - t0


def _cmd_run(args: argparse.Namespace) -> int:
    from fiddlerc.api import load
    from fiddlerc.model.tokenizer import load_tokenizer

    model = load(args.out, device=args.device, model_dir=args.model, trace=args.trace)
    try:
        tokenizer = load_tokenizer(model.artifact.folder.path)
        _, n, secs = _generate_text(
            model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.num_beams
        )
        stats = model.routing_stats()
        print(
            f"[{n} tokens in {secs:.2f} s, {n / secs if secs else 0:.1f} tokens/s; fast-tier hit rate {stats['hit_rate']:.1%}]",
            file=sys.stderr,
        )
    finally:
        model.close()
    if args.trace:
        print(f"trace written to {args.trace} (open in https://ui.perfetto.dev or chrome://tracing)", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fiddlerc.api import compile, load
    from fiddlerc.compiler.report import report_text
    from fiddlerc.model.tokenizer import load_tokenizer
    from fiddlerc.tools.demo import demo_config, write_model

    root = Path(args.dir)
    model_dir, out_dir = root / "model", root / "compiled"
    if not (model_dir / "config.json").is_file():
        print(f"writing a small random-weight Mixtral-shaped model to {model_dir}")
        write_model(demo_config(), model_dir, seed=0, router_scale=4.0, tokenizer=True)
    art = compile(model_dir, out_dir, args.gpu_memory, context=512)
    print(f"compiled to {out_dir}\n")
    print(report_text(art.plan))
    model = load(out_dir, device=args.device)
    try:
        tokenizer = load_tokenizer(model_dir)
        print(f"prompt: {args.prompt!r}\ncompletion (random weights, so gibberish): ", end="")
        _, n, secs = _generate_text(model, tokenizer, args.prompt, args.max_new_tokens, 0.0, None)
        stats = model.routing_stats()
        print(
            f"{n} tokens in {secs:.2f} s; routed token-expert pairs: {stats['fast']} fast tier, {stats['cpu']} CPU worker"
        )
    finally:
        model.close()
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from fiddlerc.hardware import load_profile, profile_names

    if args.list_hardware:  # one per line, name first
        for name in profile_names():
            print(f"{name}\t{load_profile(name).description}")
        return 0
    if not args.model:
        from fiddlerc.errors import OptionError

        raise OptionError("plan needs CONFIG_OR_DIR (or --list-hardware)")
    from fiddlerc.api import plan_and_profile
    from fiddlerc.compiler.report import report_text
    from fiddlerc.compiler.simulate import Workload, simulate

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
        Path(args.trace).write_text(run.trace_json())
        print(f"wrote the simulated schedule to {args.trace} (open in https://ui.perfetto.dev)")
    busy = ", ".join(f"{name} {ms / 1000:.1f} s" for name, ms in run.busy_ms.items())
    if args.html:
        from fiddlerc.compiler.report import report_html

        Path(args.html).write_text(report_html(p), encoding="utf-8")
        print(f"wrote {args.html}")
    print(
        f"simulated on {p.target.hardware} (prompt {work.prompt_tokens}, output {work.output_tokens}, batch {work.batch}): "
        f"prefill {run.prefill_ms / 1000:.2f} s, decode {run.decode_tokens_per_s:.2f} tokens/s, "
        f"end to end {run.tokens_per_s:.2f} tokens/s; busy {busy}"
    )
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from fiddlerc.api import expert_shape
    from fiddlerc.compiler.options import expert_format
    from fiddlerc.model.folder import checkpoint_dtype, load_config, open_config, stored_expert_format
    from fiddlerc.model.meta import build_meta_model
    from fiddlerc.tools.calibrate import calibrate
    from fiddlerc.units import parse_dtype

    folder = open_config(args.model)
    config = load_config(folder)
    dtype = parse_dtype(args.dtype) if args.dtype else checkpoint_dtype(folder, config)
    hidden, inter = expert_shape(build_meta_model(config, dtype), dtype)
    fmt = expert_format(args.expert_dtype, stored_expert_format(folder))
    t0 = time.perf_counter()
    profile, path = calibrate(
        hidden, inter, dtype, config=config, threads=args.threads, use_cache=not args.force, expert_format=fmt
    )
    print(f"{profile.name}: {profile.description} ({time.perf_counter() - t0:.1f} s)")
    for key in ("cpu.mem_bw_gbps", "gpu.mem_bw_gbps", "gpu.h2d_gbps", "cpu.layer_overhead_ms", "gpu.layer_overhead_ms"):
        if key in profile.sources:
            print(f"  {key}: {profile.sources[key]}")
    print(f"written to {path}; compile with --hardware auto (or --hardware {path})")
    return 0


def _cmd_popularity(args: argparse.Namespace) -> int:
    from fiddlerc.tools.count_routing import count_routing

    t0 = time.perf_counter()
    run = count_routing(
        args.model_dir,
        args.data,
        args.out,
        max_tokens=args.max_tokens,
        decode_tokens=args.decode_tokens,
        threads=args.threads,
    )
    how = "interrupted: kept the counts of" if run.interrupted else "counted"
    print(
        f"{how} {run.documents} documents ({run.tokens} prompt tokens) in {time.perf_counter() - t0:.1f} s "
        f"-> {run.path}; compile with --popularity {run.path}"
    )
    return EXIT_INTERRUPTED if run.interrupted else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fiddlerc.tools.bench import bench, bench_table

    result = bench(
        args.out,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        batch=args.batch,
        rounds=args.rounds,
        threads=args.threads,
        device=args.device,
        hf=not args.no_hf,
    )
    print(bench_table(result), end="")
    path = Path(args.json) if args.json else Path(args.out) / "bench.json"
    path.write_text(result.to_json())
    print(f"wrote {path}")
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


def _add_measuring_commands(sub) -> None:
    """calibrate, popularity and bench: the subcommands that measure this machine or a model on it."""
    cal = sub.add_parser("calibrate", help="measure this machine for a model's expert shape (cached)")
    cal.add_argument("model", help="model folder or config.json")
    cal.add_argument("--threads", type=int, default=None)
    cal.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None)
    cal.add_argument("--force", action="store_true", help="measure again even if cached")
    cal.add_argument(
        "--expert-dtype",
        choices=list(EXPERT_DTYPES),
        default=None,
        help="the CPU tier's format to measure (as compile)",
    )
    cal.set_defaults(func=_cmd_calibrate)

    pr = sub.add_parser(
        "popularity", aliases=["profile"], help="count where the routers send tokens on your text (expert popularity)"
    )
    pr.add_argument("model_dir")
    pr.add_argument("--data", required=True, help="text, one document per line, or a JSON list of prompts")
    pr.add_argument("-o", "--out", required=True, help="popularity JSON to write (compile --popularity reads it)")
    pr.add_argument("--max-tokens", type=int, default=None, help="stop after this many prompt tokens")
    pr.add_argument(
        "--decode-tokens", type=int, default=0, help="also generate N tokens per document, counted as decode"
    )
    pr.add_argument("--threads", type=int, default=None)
    pr.set_defaults(func=_cmd_popularity)

    b = sub.add_parser("bench", help="decode/prefill speed and memory of a compiled model beside Hugging Face")
    b.add_argument("out")
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    b.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    b.add_argument("--json", default=None, metavar="FILE", help="where to write the results (default OUT/bench.json)")
    b.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fiddlerc", description="Compile Mixture-of-Experts models to run with experts split between GPU and CPU."
    )
    p.add_argument("--version", action="version", version=f"fiddlerc {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = p.add_subparsers(dest="command", required=True)

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

    g = sub.add_parser("run", help="generate text with a compiled model")
    g.add_argument("out")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (as Hugging Face's)")
    g.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 if present, else cpu)")
    g.add_argument("--model", default=None, help="model folder, if it moved since compiling")
    g.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace of the run there")
    g.set_defaults(func=_cmd_run)

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

    _add_measuring_commands(sub)

    v = sub.add_parser("verify", help="check a compiled folder in full (load checks its large files cheaply)")
    v.add_argument("out")
    v.add_argument("--model", default=None, help="model folder, if it moved since compiling")
    v.set_defaults(func=_cmd_verify)

    a = sub.add_parser("architectures", help="list the MoE families checked end to end")
    a.set_defaults(func=_cmd_architectures)

    d = sub.add_parser("demo", help="build a small model, compile it under a budget, report, generate")
    d.add_argument("--dir", default="fiddlerc-demo", help="where to write the model and the compiled folder")
    d.add_argument("--gpu-memory", default="32MiB")
    d.add_argument("--prompt", default="Hello, fiddler!")
    d.add_argument("--max-new-tokens", type=int, default=16)
    d.add_argument("--device", default=None)
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from fiddlerc.errors import FiddlerError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fiddlerc: %(message)s")
    for noisy in ("transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _interrupted.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _on_sigint) if main_thread else None
    try:
        return args.func(args)
    except FiddlerError as e:
        print(f"fiddlerc: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fiddlerc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# Ctrl-C raises KeyboardInterrupt, as by default, and is also remembered: an exception raised while Python
# runs a finalizer or a weakref callback is printed and dropped, so a generation loop also checks the flag at
# each token (seen once in some ten runs of the test suite: a run that went on generating after Ctrl-C).
_interrupted = threading.Event()


def _on_sigint(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

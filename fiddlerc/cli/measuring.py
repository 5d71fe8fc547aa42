"""calibrate, popularity and bench: the commands that measure this machine or a model on it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fiddlerc.cli.common import EXIT_INTERRUPTED
from fiddlerc.files import output_file, write_atomic
from fiddlerc.plan import DTYPE_NAMES, EXPERT_DTYPES


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
        output_file(args.out, "-o"),
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
    from fiddlerc.artifact import read_plan
    from fiddlerc.tools.bench import bench, bench_table

    read_plan(args.out)  # a compiled folder, before the JSON's place is made
    path = output_file(args.json if args.json else Path(args.out) / "bench.json", "--json")
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
    write_atomic(path, result.to_json())
    print(f"wrote {path}")
    return 0


def add_commands(sub) -> None:
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

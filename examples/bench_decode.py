"""Compile, load and decode a ~1 GB Mixtral-shaped model; compare decode speed with Hugging Face.

    python examples/bench_decode.py [--dir /tmp/fiddlerc-bench] [--threads 2] [--device cpu]

Prints compile time, load time, peak resident memory during load (in a fresh process, against
the weight bytes), and decode tokens/s of the compiled model beside Hugging Face `generate` on
the same weights and threads, alternating the two and taking medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def bench_config():
    """Issue-specified shape: hidden 1024, intermediate 1024, 8 layers, 16/4 heads, 8 experts top-2, vocab 8192."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Unlike ru_maxrss it is not inherited across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _load_child(what: str, path: str, device: str, threads: int) -> None:
    """Runs in a fresh process: time one load (fiddlerc or Hugging Face) and its peak RSS."""
    import psutil

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (import cost is not load cost)

    import fiddlerc

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if what == "fiddlerc":
        model = fiddlerc.load(path, device=device, num_threads=threads)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    load_s = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "load_s": load_s,
                "rss_before": base,
                "peak_rss": _peak_rss_bytes(),
                "rss_after": psutil.Process().memory_info().rss,
            }
        )
    )
    del model


def _measure_load(what: str, path: Path, device: str, threads: int) -> dict:
    child = subprocess.run(
        [sys.executable, str(HERE), "--child", what, str(path), device, "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fiddlerc-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _load_child(args.child[0], args.child[1], args.child[2], args.threads)
        return

    import fiddlerc
    from fiddlerc.tools.demo import write_model

    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    model_dir, out = root / "model", root / "compiled"
    if not (model_dir / "config.json").is_file():
        write_model(bench_config(), model_dir, seed=0)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))

    compile_s = []
    for _ in range(2):  # the first call also imports the family's modeling code
        t0 = time.perf_counter()
        art = fiddlerc.compile(model_dir, out, gpu_memory="100GiB", context=256, fast_experts=32)  # half of 64 experts
        compile_s.append(time.perf_counter() - t0)

    load = _measure_load("fiddlerc", out, args.device, args.threads)
    hf_load = _measure_load("hf", model_dir, args.device, args.threads)

    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().to(args.device)
    model = fiddlerc.load(out, device=args.device, num_threads=args.threads)
    ids = torch.randint(3, 8000, (1, args.prompt), generator=torch.Generator().manual_seed(0))

    times = _alternate(model, ref, ids, args)
    same = torch.equal(
        model.generate(ids, max_new_tokens=16, ignore_eos=True).cpu(),
        ref.generate(ids.to(args.device), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0).cpu(),
    )
    model.close()
    # tokens/s over the whole generate call (prefill of the prompt + new tokens), as the Fiddler paper counts
    tps_ours, tps_hf = args.new / times["ours"], args.new / times["hf"]
    n_fast = sum(e.device != "cpu" for e in art.plan.experts)
    print(f"machine: {torch.get_num_threads()} threads, device {args.device}, torch {torch.__version__}")
    print(
        f"model: {weight_bytes / 1e9:.2f} GB fp32 safetensors; {n_fast}/{len(art.plan.experts)} experts on the fast tier"
    )
    print(f"compile: {compile_s[0]:.2f} s first in the process (imports the modeling code), {compile_s[1]:.2f} s again")
    for name, m in (("fiddlerc.load", load), ("HF from_pretrained", hf_load)):
        grown = m["peak_rss"] - m["rss_before"]
        print(f"{name}: {m['load_s']:.2f} s; peak RSS {m['peak_rss'] / 1e9:.2f} GB, of which {grown / 1e9:.2f} GB "
              f"({grown / weight_bytes:.2f}x weights) during load; after load {m['rss_after'] / 1e9:.2f} GB")  # fmt: skip
    _print_predictions(art.plan, args, times)
    print(f"decode ({args.prompt} prompt + {args.new} new, median of {args.rounds}): fiddlerc {tps_ours:.1f} tok/s, "
          f"HF generate {tps_hf:.1f} tok/s, ratio {tps_ours / tps_hf:.2f}x; greedy tokens equal: {same}")  # fmt: skip


def _alternate(model, ref, ids: torch.Tensor, args) -> dict[str, float]:
    """Median seconds of: our generate, HF's, ours with one new token (subtracted to isolate decode) and a
    128-token prefill; run in turn round by round, so machine noise hits them alike."""
    from fiddlerc.measure import seconds

    long_ids = torch.randint(3, 8000, (1, 128), generator=torch.Generator().manual_seed(1))

    def hf_generate() -> None:
        with torch.no_grad():
            ref.generate(
                ids.to(args.device), max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0
            )

    runs = {
        "ours": lambda: model.generate(ids, max_new_tokens=args.new, ignore_eos=True),
        "hf": hf_generate,
        "ours_one": lambda: model.generate(ids, max_new_tokens=1, ignore_eos=True),
        "prefill128": lambda: model.generate(long_ids, max_new_tokens=1, ignore_eos=True),
    }
    runs["ours"](), runs["hf"]()  # warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name] += seconds(run, 1, warmup=0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _print_predictions(plan, args, times: dict[str, float]) -> None:
    """The cost model's decode and prefill times beside the measured ones, on this machine calibrated."""
    from fiddlerc.compiler.cost import predict_decode
    from fiddlerc.compiler.simulate import Workload, simulate
    from fiddlerc.tools.calibrate import calibrate

    hidden = bench_config().hidden_size
    inter = plan.moe_layers[0].bytes_per_expert // (3 * hidden * 4)  # fp32, gated experts
    t0 = time.perf_counter()
    profile, _ = calibrate(hidden, inter, torch.float32, config=bench_config(), threads=args.threads)
    print(f"calibration: {time.perf_counter() - t0:.1f} s (0 if cached) -> {profile.name}")
    measured_ms = 1e3 * (times["ours"] - times["ours_one"]) / (args.new - 1)
    run = simulate(plan, profile, Workload(args.prompt, args.new))
    simulated_ms = run.decode_ms / (args.new - 1)
    analytic = predict_decode(plan, profile, position=args.prompt + args.new // 2).ms_per_token
    print(
        f"decode per token: measured {measured_ms:.2f} ms; simulated {simulated_ms:.2f} ms "
        f"(error {simulated_ms / measured_ms - 1:+.0%}), closed form {analytic:.2f} ms "
        f"(error {analytic / measured_ms - 1:+.0%}); busy {', '.join(f'{k} {v:.0f} ms' for k, v in run.busy_ms.items() if v)}"
    )
    measured_prefill = 1e3 * times["prefill128"]
    predicted_prefill = simulate(plan, profile, Workload(128, 1)).prefill_ms
    print(
        f"prefill of 128 tokens (+1 token): measured {measured_prefill:.1f} ms, simulated {predicted_prefill:.1f} ms "
        f"(error {predicted_prefill / measured_prefill - 1:+.0%})"
    )


if __name__ == "__main__":
    main()

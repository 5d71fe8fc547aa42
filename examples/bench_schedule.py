"""Overlap on this machine: the split schedule (CPU worker beside the main thread) against a serial one.

    python examples/bench_schedule.py [--dir /tmp/fiddlerc-bench] [--threads 2] [--rounds 5]

Compiles the ~1 GB Mixtral-shaped model of bench_decode.py three times: half of the experts on
the CPU worker (the schedule fiddlerc emits), the same split into 2 micro-batches (forced: the cost
model picks 1 on a CPU-only machine), and every expert on the fast tier, which on a CPU-only
machine runs them all in the main thread one after the other (serial). Decodes batch 1 and batch 4
with each, alternating, and prints tokens/s, the ratio, and the overlap fraction from a trace of the
split run. On a CPU-only machine both tiers share the cores and the memory bus, so overlap cannot
add speed: the split schedule should cost at most a few percent. With --device cuda:0 the fast tier
is the GPU and the same script shows what overlap buys there.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fiddlerc-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()

    import fiddlerc
    from fiddlerc.tools.demo import write_model

    sys.path.insert(0, str(HERE))
    from bench_decode import bench_config

    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    if not (root / "model" / "config.json").is_file():
        write_model(bench_config(), root / "model", seed=0)
    options = {"gpu_memory": "100GiB", "context": 256, "batch": 4}
    fiddlerc.compile(root / "model", root / "split", fast_experts=32, micro_batches=1, **options)
    fiddlerc.compile(root / "model", root / "micro", fast_experts=32, micro_batches=2, **options)
    fiddlerc.compile(root / "model", root / "serial", fast_experts=64, micro_batches=1, **options)
    names = ("split", "micro", "serial")
    models = {name: fiddlerc.load(root / name, device=args.device, num_threads=args.threads) for name in names}

    def decode_tps(model, batch: int) -> float:
        ids = torch.randint(3, 8000, (batch, 32), generator=torch.Generator().manual_seed(batch))
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new + 1, ignore_eos=True)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, ignore_eos=True)
        prefill = time.perf_counter() - t0
        return batch * args.new / (full - prefill)

    for batch in (1, 4):
        for m in models.values():
            decode_tps(m, batch)  # warm up
        runs = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():  # alternate
                runs[name].append(decode_tps(m, batch))
        split, micro, serial = (statistics.median(runs[n]) for n in names)
        print(
            f"batch {batch}: split {split:.1f} tokens/s, split + 2 micro-batches {micro:.1f}, serial {serial:.1f}; "
            f"split/serial {split / serial:.3f}, micro/split {micro / split:.3f}"
        )
    for m in models.values():
        m.close()

    for name in ("split", "micro"):
        trace = root / f"{name}-trace.json"
        with fiddlerc.load(root / name, device=args.device, num_threads=args.threads, trace=trace) as m:
            ids = torch.randint(3, 8000, (4, 32), generator=torch.Generator().manual_seed(4))
            m.generate(ids, max_new_tokens=args.new, ignore_eos=True)
        print(f"trace of the {name} run, batch 4: {trace}")
        subprocess.run([sys.executable, str(HERE / "trace_overlap.py"), str(trace)], check=True)
    print(f"machine: {args.threads} threads, device {args.device}, torch {torch.__version__}")


if __name__ == "__main__":
    main()

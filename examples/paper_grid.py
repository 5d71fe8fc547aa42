"""Predict the Fiddler paper's results grid from Mixtral-8x7B's config alone and compare per cell.

    python examples/paper_grid.py [--profile quadro-rtx6000-skylake48] [--env E1]

Plans Mixtral-8x7B (bf16) at 24 GiB for the profile, then for each (input, output) cell of
shared/data/fiddler-paper/results-v1.csv simulates output tokens / (prefill + decode time), batch 1,
and prints predicted vs paper with the ratio, and our simulated prefill beside the paper's
implied one (its total time minus our simulated decode time). No weights are needed.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from fiddlerc.api import plan
from fiddlerc.compiler.simulate import Workload, simulate
from fiddlerc.hardware import load_profile

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "tests" / "data" / "mixtral-8x7b-config.json"
PAPER = HERE.parent.parent / "shared" / "data" / "fiddler-paper" / "results-v1.csv"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="quadro-rtx6000-skylake48")
    ap.add_argument("--env", default="E1", help="the paper's environment column to compare with")
    ap.add_argument("--results", default=str(PAPER))
    args = ap.parse_args()
    profile = load_profile(args.profile)
    rows = [r for r in csv.DictReader(open(args.results)) if r["env"] == args.env]
    context = max(int(r["input_tokens"]) + int(r["output_tokens"]) for r in rows)
    p = plan(CONFIG, "24GiB", context=context, dtype="bfloat16", hardware=args.profile)
    n_fast = sum(e.device != "cpu" for e in p.experts)
    print(
        f"Mixtral-8x7B on {profile.name}: {n_fast} of {len(p.experts)} experts on the GPU (KV reserve for {context} tokens)"
    )
    print(
        f"{'input':>5} {'output':>6} {'paper':>6} {'predicted':>9} {'ratio':>6}  {'prefill s: ours':>15} {'paper*':>6}"
    )
    ratios = []
    for r in rows:
        i, o, paper = int(r["input_tokens"]), int(r["output_tokens"]), float(r["fiddler_tokens_per_s"])
        run = simulate(p, profile, Workload(i, o))
        pred = run.tokens_per_s
        ratios.append(pred / paper)
        # *the paper's prefill if its decode steps took as long as ours: its total time minus our decode time
        paper_prefill = o / paper - run.decode_ms / 1000
        flag = "  <- off by more than 30 %" if abs(pred / paper - 1) > 0.3 else ""
        print(f"{i:>5} {o:>6} {paper:>6.2f} {pred:>9.2f} {pred / paper:>6.2f}  {run.prefill_ms / 1000:>15.2f} "
              f"{paper_prefill:>6.1f}{flag}")  # fmt: skip
    print(f"mean paper {statistics.mean(float(r['fiddler_tokens_per_s']) for r in rows):.2f} tokens/s; "
          f"median ratio predicted/paper {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

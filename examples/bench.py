"""The issue's benchmark model through `fiddlerc bench`, in fp32 and bf16, on this machine.

    python examples/bench.py [--dir /tmp/fiddlerc-bench] [--threads 2] [--rounds 3] [--device cpu] [--prompt 32]

Writes the ~1 GB Mixtral-shaped model of bench_decode.py once (fp32 safetensors), compiles it in
each dtype with half of the experts on the CPU worker, and prints `fiddlerc bench`'s table for each:
decode and prefill tokens/s, time to first token, resident memory, roofline fraction, and the
ratios to Hugging Face `generate` measured in the same run. JSON lands beside each compiled model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fiddlerc-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (prefill is timed over them)")
    args = ap.parse_args()

    import fiddlerc
    from fiddlerc.tools.bench import bench, bench_table
    from fiddlerc.tools.demo import write_model

    sys.path.insert(0, str(HERE))
    from bench_decode import bench_config

    root = Path(args.dir)
    if not (root / "model" / "config.json").is_file():
        write_model(bench_config(), root / "model", seed=0)
    for dtype in ("float32", "bfloat16"):
        out = root / f"bench-{dtype}"
        fiddlerc.compile(root / "model", out, gpu_memory="100GiB", context=256, fast_experts=32, dtype=dtype)
        result = bench(out, threads=args.threads, rounds=args.rounds, device=args.device, prompt_tokens=args.prompt)
        (out / "bench.json").write_text(result.to_json())
        print(f"== {dtype} (python examples/bench.py; JSON in {out / 'bench.json'})")
        print(bench_table(result))


if __name__ == "__main__":
    main()

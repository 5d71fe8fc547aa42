"""GPU check at real width: a Mixtral-shaped model with 8 of Mixtral-8x7B's 32 layers at full width.

    python examples/gpu_bench.py [--dir /tmp/fiddlerc-gpu] [--layers 8] [--gpu-memory 8GiB] [--device cuda:0]

Writes the model once (bf16 random weights, Mixtral-8x7B's shapes: hidden 4096, intermediate
14336, 32/8 heads, 8 experts top-2; about 23 GB at 8 layers), compiles it at a budget that leaves
most experts on the CPU, checks the compiled model's logits against Hugging Face's (bf16, teacher
forced, within bf16 tolerance) on the same device, and prints `fiddlerc bench`'s table beside HF.
Sized for one H100 in a few minutes; `--hidden/--intermediate/--layers` shrink it for a dry run on
the CPU (`--device cpu --hidden 256 --intermediate 512 --layers 2 --gpu-memory 64MiB`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fiddlerc-gpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, MixtralConfig

    import fiddlerc
    from fiddlerc.tools.bench import bench, bench_table
    from fiddlerc.tools.demo import write_model

    root = Path(args.dir)
    model_dir = root / f"mixtral-{args.layers}x{args.hidden}"
    if not (model_dir / "config.json").is_file():
        t0 = time.perf_counter()
        config = MixtralConfig(
            vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8,
            num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096,
            tie_word_embeddings=False, dtype="bfloat16",
        )  # fmt: skip
        torch.set_default_dtype(torch.bfloat16)  # random init straight in bf16: half the memory and time
        try:
            write_model(config, model_dir, seed=0)
        finally:
            torch.set_default_dtype(torch.float32)
        print(f"wrote {model_dir} in {time.perf_counter() - t0:.0f} s")
    out = root / "compiled"
    art = fiddlerc.compile(model_dir, out, args.gpu_memory, context=512, hardware="auto")
    n_fast = sum(e.device != "cpu" for e in art.plan.experts)
    print(f"compiled: {n_fast} of {len(art.plan.experts)} experts on the GPU at {args.gpu_memory}")

    ids = torch.randint(3, 31000, (1, 64), generator=torch.Generator().manual_seed(0))
    with fiddlerc.load(out, device=args.device) as model:
        got = model(ids).float().cpu()
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(args.device)
    with torch.no_grad():
        want = ref(input_ids=ids.to(args.device)).logits.float().cpu()
    del ref
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    err = (got - want).abs().max().item() / want.abs().max().item()
    same = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(
        f"logits vs Hugging Face bf16: max error {err:.2%} of the largest logit; same argmax at {same:.0%} of positions"
    )
    result = bench(out, prompt_tokens=32, new_tokens=16, rounds=args.rounds, threads=args.threads, device=args.device)
    print(bench_table(result), end="")
    (out / "bench.json").write_text(result.to_json())


if __name__ == "__main__":
    main()

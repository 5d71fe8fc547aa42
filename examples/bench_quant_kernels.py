"""One-token products over a pool of expert matrices larger than the caches, against the read-bandwidth probe.

    python examples/bench_quant_kernels.py [--threads 2] [--rounds 5]

For each matrix of the two full-width slices (Mixtral-8x7B: 14336 x 4096 and 4096 x 14336;
Qwen3-30B-A3B: 768 x 2048 and 2048 x 768) and of GPT-OSS (5760 x 2880 and 2880 x 2880): fiddlerc's int8,
int4 and mxfp4 kernels (activations quantized once per token, as the runtime does for a token's
experts), and bf16 and fp32 weights by `F.linear` and by fiddlerc's C product (`native`, what
`load(kernels="auto")` picks where it measures faster), each cycling over
`fiddlerc.measure.POOL_BYTES` of copies so every call streams its weight from memory. Prints ms per
matrix, GB/s in the bytes the format reads, and that as a fraction of the probe. Random weights: for
speed only (their values do not change the work).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fiddlerc import quant_format
from fiddlerc.measure import median_seconds, pool_size
from fiddlerc.runtime import matvec, quant
from fiddlerc.tools.bench import read_bandwidth_gbps

SHAPES = [(14336, 4096), (4096, 14336), (768, 2048), (2048, 768), (5760, 2880), (2880, 2880)]


def _matrix(rows: int, cols: int, fmt: str) -> quant_format.QuantizedWeight:
    if fmt == "mxfp4":  # as an MXFP4 checkpoint stores it: random codes, scales near 2^-6
        blocks = torch.randint(0, 256, (rows, cols // quant_format.GROUP, 16), dtype=torch.uint8)
        return quant_format.from_mxfp4(blocks, torch.randint(118, 124, (rows, cols // quant_format.GROUP)))
    return quant_format.quantize(torch.randn(rows, cols) * 0.02, fmt)


def _quantized_pass(x: torch.Tensor, pool: list) -> None:
    xa = quant.quantize_activations(x)  # once, shared by the products that read it
    for w in pool:
        quant.matmul(xa, w)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    probe = read_bandwidth_gbps(torch.device("cpu"))
    print(f"read-bandwidth probe: {probe:.1f} GB/s, {args.threads} threads, AVX2 kernels: {quant.library().simd}")
    for rows, cols in SHAPES:
        x = torch.randn(1, cols, dtype=torch.bfloat16)
        runs = {}
        for fmt in quant_format.FORMATS:
            one = _matrix(rows, cols, fmt)
            pool = [
                quant_format.QuantizedWeight(fmt, one.data.clone(), one.scales.clone())
                for _ in range(pool_size(one.nbytes))
            ]
            runs[fmt] = (one.nbytes, pool, lambda pool=pool: _quantized_pass(x, pool))
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            w = torch.randn(rows, cols, dtype=dtype)
            nbytes = w.numel() * w.element_size()
            pool = [w.clone() for _ in range(pool_size(nbytes))]
            xd = x.to(dtype)
            runs[name] = (nbytes, pool, lambda pool=pool, xd=xd: [F.linear(xd, p) for p in pool])
            runs[f"{name} native"] = (nbytes, pool, lambda pool=pool, xd=xd: [matvec.matvec(xd, p) for p in pool])
        for name, (nbytes, pool, run) in runs.items():
            s = median_seconds(run, args.rounds) / len(pool)
            gbps = nbytes / s / 1e9
            print(
                f"{rows:>6} x {cols:<6} {name:11} {s * 1e3:7.3f} ms  {gbps:5.1f} GB/s  {gbps / probe:4.0%} of the probe"
            )


if __name__ == "__main__":
    main()

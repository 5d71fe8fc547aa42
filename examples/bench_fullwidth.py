"""Decode at real widths on the CPU: fiddlerc at bf16, int8 and int4 beside llama.cpp at BF16, Q8_0 and Q4_0
of the same safetensors, and Hugging Face generate at bf16; and on narrow models, the engines' fixed cost.

    python examples/bench_fullwidth.py [--slices mixtral,qwen3,narrow-mixtral,narrow-qwen3]
        [--dir /tmp/fiddlerc-fullwidth] [--threads 2] [--rounds 3] [--prompt 32] [--new-tokens N]
        [--llama-python PYTHON --llama-src DIR]   # llama.cpp: see the project's notes on building it
        [--errors]   # also: the error table of a small model trained here, each format against fp32

Slices of real models with random weights and a vocabulary of 8192 (random weights are for speed
only: every format does the same work on them):
- mixtral: Mixtral-8x7B layers (hidden 4096, 8 experts of 14336, top-2, 32/8 heads) x 2 layers;
- qwen3: Qwen3-30B-A3B layers (hidden 2048, 128 experts of 768, top-8, 32/4 heads, head_dim 128) x 4.
- bench: the ~1 GB benchmark model of bench_decode.py (hidden 1024, 8 experts of 1024, top-2, 8 layers),
  fp32; fiddlerc fp32 and bf16 beside llama.cpp F32 and BF16, 64 new tokens by default;
- narrow-mixtral, narrow-qwen3: hidden 64, 8 layers, the same routing (8 experts of 128, top-2; 128 of
  32, top-8), fp32, 128 new tokens by default: their weights read in microseconds, so the time per token
  is the engine's fixed cost (everything between the weights' reads). fiddlerc fp32 beside llama.cpp F32
  and Hugging Face fp32.
bf16 checkpoints (fp32 for bench and the narrow ones), written once under --dir with a tokenizer trained there
(llama.cpp's converter needs one; timing feeds token ids). fiddlerc compiles each slice with every expert on the CPU tier
(`--fast-experts 0`), in bf16 and with `--expert-dtype` and `--dense-dtype` int8 or int4 (embeddings,
norms and routers stay bf16).
llama.cpp's GGUFs come from its own converter (BF16, Q8_0) and quantizer (Q4_0). Each engine and
format runs in a fresh process, one after the other round by round (in each: a warm-up as long as a
measured run, then the better of two), medians of the rounds; bits per
weight are stored weight bytes x 8 / parameters. Without --llama-python the llama.cpp columns are
skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
VOCAB = 8192


NARROW = ("narrow-mixtral", "narrow-qwen3")
# slice -> (dtype stored, fiddlerc's formats, llama.cpp's formats, new tokens by default)
SLICES = {
    "mixtral": ("bf16", ("bf16", "int8", "int4"), ("bf16", "q8_0", "q4_0"), 16),
    "qwen3": ("bf16", ("bf16", "int8", "int4"), ("bf16", "q8_0", "q4_0"), 16),
    "bench": ("fp32", ("fp32", "bf16"), ("f32", "bf16"), 64),
    **{n: ("fp32", ("fp32",), ("f32",), 128) for n in NARROW},
}
PEER = {"fp32": "llama.cpp F32", "bf16": "llama.cpp BF16", "int8": "llama.cpp Q8_0", "int4": "llama.cpp Q4_0"}


def slice_config(name: str):
    import transformers as T

    common = dict(
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2
    )
    narrow = dict(
        hidden_size=64, num_hidden_layers=8, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    )
    if name == "narrow-mixtral":
        return T.MixtralConfig(**common, **narrow, num_local_experts=8, num_experts_per_tok=2)
    if name == "narrow-qwen3":
        return T.Qwen3MoeConfig(**common, **narrow, moe_intermediate_size=32, head_dim=16, num_experts=128,
                                num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
    if name == "bench":  # the ~1 GB benchmark model of bench_decode.py and bench.py
        return T.MixtralConfig(**common, hidden_size=1024, intermediate_size=1024, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)  # fmt: skip
    if name == "mixtral":
        return T.MixtralConfig(**common, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                               num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)  # fmt: skip
    return T.Qwen3MoeConfig(**common, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                            num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip


def _corpus() -> list[str]:
    """Text available offline: the Python standard library's sources."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [f.read_text(errors="replace") for f in files[:400]]


def train_tokenizer(kind: str, vocab: int = VOCAB):
    """A tokenizer of exactly `vocab` tokens that llama.cpp's converter accepts: Llama-2-style byte-fallback
    BPE (Mixtral) or GPT-2-style byte-level BPE (Qwen3)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "llama":
        specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
        tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(_corpus(), trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")


def compiled_by_this_version(out: Path) -> bool:
    """Whether `out` holds a compile of this fiddlerc (a compile by another version is refused at load)."""
    from fiddlerc.version import __version__

    try:
        return json.loads((out / "manifest.json").read_text())["versions"]["fiddlerc"] == __version__
    except (OSError, ValueError, KeyError):
        return False


def prepare(name: str, root: Path, llama: tuple[str, Path] | None) -> dict[str, Path]:
    """The slice's model folder, fiddlerc's compiled folders and llama.cpp's GGUFs (made once, kept)."""
    import torch

    import fiddlerc
    from fiddlerc.tools.demo import write_model

    model = root / name / "model"
    stored, formats, llama_formats, _ = SLICES[name]
    if not (model / "config.json").is_file():
        write_model(slice_config(name), model, seed=0, dtype=torch.float32 if stored == "fp32" else torch.bfloat16)
        tok = train_tokenizer("gpt2" if name.endswith("qwen3") else "llama")
        assert len(tok) == VOCAB, f"the tokenizer has {len(tok)} tokens, the model {VOCAB}"
        tok.save_pretrained(model)
    paths = {f"hf {stored}": model}
    for fmt in formats:
        out = root / name / f"fiddlerc-{fmt}"
        if not compiled_by_this_version(out):
            quantized = None if fmt in ("bf16", "fp32") else fmt  # experts and dense projections alike, as llama.cpp's
            fiddlerc.compile(model, out, gpu_memory="1TiB", context=256, fast_experts=0, dtype={"fp32": "float32", "bf16": "bfloat16"}.get(fmt),
                             expert_dtype=quantized, dense_dtype=quantized)  # fmt: skip
        paths[f"fiddlerc {fmt}"] = out
    if llama is not None:
        python, src = llama
        for fmt in llama_formats:
            gguf = root / name / f"llama-{fmt}.gguf"
            if not gguf.is_file():
                code = _CONVERT if fmt != "q4_0" else _QUANTIZE
                base = root / name / "llama-bf16.gguf"
                subprocess.run([python, "-c", code, str(src), str(model), fmt, str(gguf), str(base)], check=True)
            paths[f"llama.cpp {fmt.upper()}"] = gguf
    return paths


# llama.cpp's converter, run in its own environment; an unknown byte-level pre-tokenizer (ours is trained
# here, so its hash is in no list) is declared Qwen2's, whose regex the ByteLevel pre-tokenizer follows.
_CONVERT = """
import sys
src, model, fmt, out = sys.argv[1:5]
sys.path[:0] = [src, src + '/gguf-py']
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return 'qwen2'
base.TextModel.get_vocab_base_pre = pre
sys.argv = ['convert_hf_to_gguf.py', model, '--outtype', fmt, '--outfile', out]
import runpy
runpy.run_path(src + '/convert_hf_to_gguf.py', run_name='__main__')
"""
_QUANTIZE = """
import sys, llama_cpp
base, out = sys.argv[5], sys.argv[4]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
assert llama_cpp.llama_model_quantize(base.encode(), out.encode(), p) == 0
"""


def stored_bits(path: Path, params: int) -> float:
    """Weight bytes x 8 / parameters of a model folder, a compiled folder (its dense weights in the model
    folder, its experts there or in quantized.safetensors) or a GGUF file."""
    files = [path] if path.is_file() else [*path.glob("*.safetensors")]
    if path.is_dir() and (path / "manifest.json").is_file():  # fiddlerc: dense weights in the model folder
        model_dir = Path(json.loads((path / "manifest.json").read_text())["model_dir"])
        plan = json.loads((path / "plan.json").read_text())
        dense = plan["memory"]["dense_bytes"]
        total = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        quantized = path / "quantized.safetensors"
        if not quantized.is_file():  # every weight from the model folder, in the compiled dtype
            itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(plan["model"]["dtype"])
            return itemsize * 8.0 if itemsize else total * 8 / params
        doc = json.loads((path / "plan.json").read_text())["target"]
        kept = _unquantized_bytes(model_dir, quantized) if doc["dense_dtype"] else dense
        return (kept + quantized.stat().st_size) * 8 / params
    return sum(f.stat().st_size for f in files) * 8 / params


def _unquantized_bytes(model_dir: Path, quantized: Path) -> int:
    """Bytes of the model's dense weights that were not quantized (embeddings, norms, routers)."""
    from fiddlerc.model.folder import ST_DTYPES, open_model_folder, open_weight_files

    done = {
        k.removeprefix("dense.").removesuffix(".data") + ".weight"
        for k in open_weight_files(quantized.parent, [quantized.name]).tensors
        if k.startswith("dense.") and k.endswith(".data")
    }
    out = 0
    for key, info in open_model_folder(model_dir).tensors.items():
        if ".experts." in key or key in done:
            continue
        out += _prod(info.shape) * ST_DTYPES[info.dtype].itemsize
    return out


# --- children: one engine and format per process -------------------------------------------------


def _child(engine: str, path: str, threads: int, prompt: int, new: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    ids = torch.randint(3, VOCAB - 1, (1, prompt), generator=torch.Generator().manual_seed(0))
    if engine == "fiddlerc":
        import fiddlerc

        model = fiddlerc.load(path, device="cpu", num_threads=threads)

        def run(n):
            model.generate(ids, max_new_tokens=n, ignore_eos=True)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()  # as stored

        def run(n):
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)  # fmt: skip

    run(new + 1)  # warm up as long as a measured run: memory-mapped weights are touched first here
    decode, prefill = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(new + 1)
        t2 = time.perf_counter()
        decode.append(new / ((t2 - t1) - (t1 - t0)))
        prefill.append(prompt / (t1 - t0))
    return {"decode": max(decode), "prefill": max(prefill)}  # the better of two: the run, less the machine's noise


_LLAMA_CHILD = """
import sys, time, json, random, llama_cpp
path, threads, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = llama_cpp.Llama(path, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
rng = random.Random(0)
ids = [rng.randrange(3, 8191) for _ in range(prompt)]
def run(n):
    m.reset(); t0 = time.perf_counter(); m.eval(ids); t1 = time.perf_counter()
    for i in range(n):
        m.eval([ids[i % prompt]])
    return t1 - t0, time.perf_counter() - t1
run(new)  # warm up as long as a measured run
runs = [run(new) for _ in range(2)]
print(json.dumps({"decode": max(new / d for _, d in runs), "prefill": max(prompt / p for p, _ in runs)}))
"""


def measure(name: str, path: Path, args) -> dict:
    if name.startswith("llama.cpp"):
        cmd = [
            args.llama_python,
            "-c",
            _LLAMA_CHILD,
            str(path),
            str(args.threads),
            str(args.prompt),
            str(args.new_tokens),
        ]
    else:
        engine = "fiddlerc" if name.startswith("fiddlerc") else "hf"
        cmd = [sys.executable, str(HERE), "--child", engine, str(path), "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# --- the error table: a small model trained here, every format against its fp32 reference ------


ERROR_VOCAB = 512


def _trained(root: Path) -> tuple[Path, object]:
    """A small Mixtral trained on the first half of the standard library's sources with a Llama-style
    tokenizer of ERROR_VOCAB tokens (so llama.cpp's converter takes it too); made once under `root`."""
    import torch
    import transformers as T

    from fiddlerc.tools.demo import offline_text, train_model

    model = root / "trained" / "model"
    text = offline_text()
    if not (model / "config.json").is_file():
        tok = train_tokenizer("llama", ERROR_VOCAB)
        assert len(tok) == ERROR_VOCAB
        ids = torch.tensor(tok(text[: len(text) // 2].decode(errors="replace"))["input_ids"])
        config = T.MixtralConfig(vocab_size=ERROR_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2, max_position_embeddings=1024, tie_word_embeddings=False,
                                 bos_token_id=1, eos_token_id=2)  # fmt: skip
        train_model(config, model, ids, steps=600)
        tok.save_pretrained(model)
    tok = T.AutoTokenizer.from_pretrained(model)
    held = torch.tensor(tok(text[-40_000:].decode(errors="replace"))["input_ids"][: 8 * 256]).view(8, 256)
    return model, held


_LLAMA_LOGITS = """
import sys, json, numpy as np, llama_cpp
path, ids_file, out = sys.argv[1:4]
rows = json.load(open(ids_file))
m = llama_cpp.Llama(path, n_ctx=512, logits_all=True, n_threads=2, n_threads_batch=2, verbose=False)
logits = []
for ids in rows:
    m.reset(); m.eval(ids); logits.append(np.array(m.scores[: len(ids)], dtype=np.float32))
np.save(out, np.stack(logits))
"""


def error_table(root: Path, llama: tuple[str, Path] | None) -> None:
    """Mean KL and top-1 agreement of teacher-forced next-token distributions on held-out text, each format
    against Hugging Face fp32 of the same trained model."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import fiddlerc

    model, held = _trained(root)
    with torch.no_grad():
        ref = F.log_softmax(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()(held).logits, -1)
    rows: dict[str, tuple[float, torch.Tensor]] = {}
    for fmt in ("int8", "int4"):
        out = root / "trained" / f"fiddlerc-{fmt}"
        fiddlerc.compile(model, out, gpu_memory="1TiB", context=512, fast_experts=0, expert_dtype=fmt, dense_dtype=fmt)
        with fiddlerc.load(out, device="cpu") as m:
            got = torch.cat([m(held[i : i + 1]) for i in range(held.shape[0])]).float()
        rows[f"fiddlerc {fmt}"] = (stored_bits(out, _params(model)), got)
    if llama is not None:
        python, src = llama
        ids_file = root / "trained" / "held.json"
        ids_file.write_text(json.dumps(held.tolist()))
        for fmt in ("f32", "q8_0", "q4_0"):
            gguf = root / "trained" / f"llama-{fmt}.gguf"
            if not gguf.is_file():
                code = _QUANTIZE if fmt == "q4_0" else _CONVERT
                base = root / "trained" / "llama-f32.gguf"
                subprocess.run([python, "-c", code, str(src), str(model), fmt, str(gguf), str(base)], check=True)
            npy = root / "trained" / f"llama-{fmt}.npy"
            subprocess.run([python, "-c", _LLAMA_LOGITS, str(gguf), str(ids_file), str(npy)], check=True)
            rows[f"llama.cpp {fmt.upper()}"] = (stored_bits(gguf, _params(model)), torch.from_numpy(np.load(npy)))
    print(f"\nerror on a small Mixtral trained here ({_params(model) / 1e6:.1f} M parameters, vocabulary {ERROR_VOCAB}),"
          f" {held.numel()} held-out tokens, against Hugging Face fp32")  # fmt: skip
    for name, (bits, logits) in rows.items():
        lq = F.log_softmax(logits, -1)
        kl = (ref.exp() * (ref - lq)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == lq.argmax(-1)).float().mean().item()
        print(f"  {name:17} {bits:5.2f} bpw  mean KL {kl:.5f}  top-1 agreement {top1:.2%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", default=",".join(SLICES))
    ap.add_argument("--dir", default="/tmp/fiddlerc-fullwidth")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 16 full width, 64 bench, 128 narrow")
    ap.add_argument("--llama-python", default=None, help="a Python with llama_cpp installed")
    ap.add_argument(
        "--llama-src", default=None, help="llama.cpp's source (vendor/llama.cpp of llama-cpp-python's sdist)"
    )
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--errors", action="store_true", help="also the error table of a small model trained here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.threads, args.prompt, args.new_tokens)))
        return
    llama = (args.llama_python, Path(args.llama_src)) if args.llama_python and args.llama_src else None
    if llama is None:
        print("llama.cpp: not given (--llama-python, --llama-src): its columns are skipped")
    if args.errors:
        error_table(Path(args.dir), llama)
    for name in filter(None, args.slices.split(",")):
        paths = prepare(name, Path(args.dir), llama)
        if args.no_hf:
            paths = {k: p for k, p in paths.items() if not k.startswith("hf ")}
        slice_args = argparse.Namespace(**{**vars(args), "new_tokens": args.new_tokens or SLICES[name][3]})
        params = _params(Path(args.dir) / name / "model")
        results: dict[str, list[dict]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for k, p in paths.items():
                results[k].append(measure(k, p, slice_args))
        print(f"\n{name} slice, {args.threads} threads, prompt {args.prompt}, {slice_args.new_tokens} new tokens, "
              f"median of {args.rounds} alternating rounds (decode tokens/s and ms/token; bits per weight over all weights)")  # fmt: skip
        decode = {k: statistics.median(r["decode"] for r in v) for k, v in results.items()}
        for k, p in paths.items():
            prefill = statistics.median(r["prefill"] for r in results[k])
            line = (f"  {k:17} {stored_bits(p, params):5.2f} bpw  decode {decode[k]:8.2f} tok/s = {1e3 / decode[k]:6.2f} ms/token"
                    f"  prefill {prefill:8.1f} tok/s")  # fmt: skip
            fmt = k.split()[-1]
            if k.startswith("fiddlerc") and PEER[fmt] in decode:
                line += f"  = {decode[k] / decode[PEER[fmt]]:.2f}x {PEER[fmt]}"
            print(line)


def _params(model_dir: Path) -> int:
    from fiddlerc.model.folder import open_model_folder

    return sum(_prod(t.shape) for t in open_model_folder(model_dir).tensors.values())


def _prod(shape) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


if __name__ == "__main__":
    main()

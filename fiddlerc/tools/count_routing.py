"""`fiddlerc popularity`: run text through a model on the CPU and count where its routers send tokens.

The model is compiled into a temporary folder with every expert on the fast tier and run by
fiddlerc's own runtime on the CPU (the same numerics the tests hold equal to Hugging Face), with
an observer on each MoE layer's placed experts. Each document is one sequence: its tokens are the
prefill; with `decode_tokens` the model then generates that many tokens greedily, counted apart as
decode. Ctrl-C stops early and keeps what was counted (the file says `"interrupted": true`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fiddlerc.errors import OptionError
from fiddlerc.files import write_atomic
from fiddlerc.popularity import RoutingCounter
from fiddlerc.progress import progress as progress_bar


@dataclass(frozen=True)
class RoutingRun:
    path: Path
    documents: int  # documents run (all of them unless interrupted or the token budget ran out)
    tokens: int  # prompt tokens run
    interrupted: bool


def read_documents(path: str | Path) -> list[str]:
    """A JSON list of prompts, or plain text with one document per line (blank lines skipped)."""
    p = Path(path)
    if not p.is_file():
        raise OptionError(f"data file {p} does not exist: give text with one document per line, or a JSON list")
    text = p.read_text(encoding="utf-8", errors="replace")
    docs: list[str] | None = None
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list) and all(isinstance(d, str) for d in data):
            docs = data
    if docs is None:
        docs = text.splitlines()
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise OptionError(f"data file {p} holds no text: one document per line, or a JSON list of strings")
    return docs


def count_routing(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    max_tokens: int | None = None,
    decode_tokens: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> RoutingRun:
    """Count routing decisions over the documents in `data` and write them to `out` (popularity JSON)."""
    from fiddlerc.artifact import compile_model  # counting runs the compiler's own runtime
    from fiddlerc.compiler.options import CompileOptions, parse_target
    from fiddlerc.loader import load
    from fiddlerc.model.folder import open_model_folder
    from fiddlerc.model.meta import meta_model_of
    from fiddlerc.model.tokenizer import load_tokenizer

    if max_tokens is not None and max_tokens <= 0:
        raise OptionError(f"--max-tokens must be positive, got {max_tokens}")
    if decode_tokens < 0:
        raise OptionError(f"--decode-tokens must be >= 0, got {decode_tokens}")
    folder = open_model_folder(model_dir)
    tokenizer = load_tokenizer(folder.path)
    docs = read_documents(data)
    limit = int(folder.config_json.get("max_position_embeddings") or 4096)
    encoded = [tokenizer.encode(d)[: max(1, limit - decode_tokens)] for d in docs]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fiddlerc-popularity-") as tmp:
        context = max(len(ids) for ids in encoded) + decode_tokens
        model, dtype = meta_model_of(folder)
        target = parse_target("1024TiB", context=context)  # every expert on the fast tier
        art = compile_model(folder, model, dtype, target, CompileOptions(), Path(tmp) / "all-fast")
        moe = art.plan.moe_layers
        counter = RoutingCounter(tuple(ml.layer for ml in moe), tuple(ml.num_experts for ml in moe))
        done = tokens = 0
        interrupted = False
        with load(Path(tmp) / "all-fast", device="cpu", num_threads=threads) as model:
            for placed in model.placed_experts:
                placed.observer = counter
            try:
                for ids in progress_bar(encoded, "counting routes (documents)", enabled=progress):
                    if max_tokens is not None and tokens >= max_tokens:
                        break
                    ids = ids[: max_tokens - tokens] if max_tokens is not None else ids
                    counter.new_sequence()
                    batch = torch.tensor([ids])
                    if decode_tokens:
                        model.generate(batch, max_new_tokens=decode_tokens, ignore_eos=True)
                    else:
                        model(batch)
                    done, tokens = done + 1, tokens + len(ids)
            except KeyboardInterrupt:
                interrupted = True
    raw = Path(data).read_bytes()
    source = {
        "data": Path(data).name,
        "data_sha256": hashlib.sha256(raw).hexdigest(),
        "documents": done,
        "max_tokens": max_tokens,
        "decode_tokens": decode_tokens,
    }
    info = {
        "architecture": art.plan.model.architecture,
        "model_type": art.plan.model.model_type,
        "config_sha256": art.plan.model.config_sha256,
    }
    write_atomic(out, counter.to_json(source, interrupted, info))
    return RoutingRun(out, done, tokens, interrupted)

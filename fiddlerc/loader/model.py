"""The loaded model users hold: `load(OUT)` verifies a compiled folder and binds it; `CompiledModel`
gives logits, tokens and routing statistics."""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fiddlerc.artifact import MODULE_FILE, Artifact, verify_artifact
from fiddlerc.compiler.capture import cache_class, new_cache
from fiddlerc.compiler.codegen import load_module
from fiddlerc.errors import OptionError
from fiddlerc.files import output_file
from fiddlerc.loader.bind import bind_weights
from fiddlerc.loader.devices import check_gpu_memory, check_host_memory, resolve_device
from fiddlerc.loader.paths import decode_paths, paths_text
from fiddlerc.model.folder import open_weight_files
from fiddlerc.model.quantize import QUANTIZED_FILE
from fiddlerc.model.tokenizer import TextStream, chat_ids, load_tokenizer, prompt_ids
from fiddlerc.plan import GENERATED
from fiddlerc.runtime.attention import attend_one
from fiddlerc.runtime.generate import MicroBatchCache
from fiddlerc.runtime.generate import beam_search as _beam_search
from fiddlerc.runtime.generate import generate as _generate
from fiddlerc.runtime.generate import pick as _pick
from fiddlerc.runtime.generate import steps as _steps
from fiddlerc.runtime.kernels import MODES as KERNEL_MODES
from fiddlerc.runtime.norms import native_rms_norm
from fiddlerc.runtime.slots import PackedPrefill, SlotCache
from fiddlerc.runtime.trace import MAIN, Tracer
from fiddlerc.runtime.worker import CpuWorker
from fiddlerc.units import parse_dtype

log = logging.getLogger(__name__)
_ATTENTION = re.compile(r"\.layers\.(\d+)\.(?:[A-Za-z_]+\.)?(self_attn|attention|attn)$")


def _trace_attention(model: nn.Module, tracer: Tracer) -> None:
    """A slice on the main track for each decoder layer's attention call."""
    for name, module in model.named_modules():
        m = _ATTENTION.search(name)
        if m is None:
            continue
        label = f"L{m.group(1)} attention"
        starts: list[float] = []
        module.register_forward_pre_hook(lambda mod, args, starts=starts: starts.append(tracer.now_us()))
        module.register_forward_hook(
            lambda mod, args, out, starts=starts, label=label: tracer.add(label, MAIN, starts.pop(), tracer.now_us())
        )


def _trace_generated_attention(forward: nn.Module, tracer: Tracer) -> None:
    """The same slices for the generated attention method of module.py."""
    inner = forward.attention

    def traced(layer, *args):
        start = tracer.now_us()
        try:
            return inner(layer, *args)
        finally:
            tracer.add(f"L{layer} attention", MAIN, start, tracer.now_us())

    forward.attention = traced


class CompiledModel:
    """A loaded, placed model: call it for logits, `generate` for tokens."""

    def __init__(
        self,
        artifact: Artifact,
        meta_model: nn.Module,
        device: torch.device,
        num_threads: int | None = None,
        trace: str | Path | None = None,
        kernels: str = "auto",
    ) -> None:
        self.artifact = artifact
        self.plan = artifact.plan
        self.device = device
        self.config = meta_model.config
        if device.type == "cuda":
            check_gpu_memory(self.plan, device)
        check_host_memory(self.plan, device)
        self._worker = CpuWorker(num_threads)
        self._finalizer = weakref.finalize(self, self._worker.close)  # no thread outlives the model
        self._lock = threading.Lock()
        try:
            quantized = None
            if self.plan.target.quantizes:
                quantized = open_weight_files(artifact.path, [QUANTIZED_FILE])
            bound = bind_weights(
                meta_model, artifact.folder, self.plan, device, self._worker, kernels, artifact.sources, quantized
            )
        except BaseException:
            self._finalizer()
            raise
        self.hf_model = meta_model
        self._tokenizer = None
        self.placed_experts = bound.placed  # each MoE layer's PlacedExperts (fiddlerc.runtime.experts)
        self.tracer: Tracer | None = None
        self._trace_path = output_file(trace, "the trace") if trace is not None else None  # checked before the run
        if trace is not None:
            self.tracer = Tracer()
            _trace_attention(meta_model, self.tracer)
            for placed in bound.placed:
                placed.tracer = self.tracer
        module = load_module(artifact.module_text, str(artifact.path / MODULE_FILE))
        self._forward = module.CompiledForward(meta_model, meta_model.config)
        self._forward.placed = {p.layer: p for p in bound.placed}
        self._forward.dense = bound.attention
        if device.type == "cpu" and kernels in ("auto", "native"):
            self._forward.rms_norm = native_rms_norm  # one C call a norm (fiddlerc.runtime.norms)
            self._forward.attend_one = attend_one  # one C call a layer's attention at decode
        if self.tracer is not None and bound.attention:
            _trace_generated_attention(self._forward, self.tracer)
        self._forward.flatten_modules()  # the last change to the module tree: plain attribute lookups from here
        if log.isEnabledFor(logging.INFO):
            log.info("%s", paths_text(self.decode_paths()))
        # Generated attention writes into a static cache sized for the compiled context.
        self._static_cache = bool(bound.attention)
        self._cache_class = cache_class(meta_model)
        gen = getattr(meta_model, "generation_config", None)
        self.eos_token_ids = _as_ids(getattr(gen, "eos_token_id", None) or self.config.eos_token_id)
        pad = getattr(gen, "pad_token_id", None) or getattr(self.config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    def decode_paths(self) -> dict[int, dict[str, str]]:
        """Layer -> what its attention, norms, router and experts run at one token of one sequence, as
        loaded on this machine (fiddlerc.loader.paths); `fiddlerc -v run` logs it."""
        return decode_paths(self.plan, self.hf_model, self._forward, self._forward.placed, self.artifact.module_text)

    def new_cache(self):
        def one():
            if self._static_cache:
                from transformers import StaticCache

                return StaticCache(config=self.config, max_cache_len=self.plan.target.context_tokens)
            return new_cache(self._cache_class, self.config)

        micro = self.plan.target.micro_batches
        return MicroBatchCache([one() for _ in range(micro)]) if micro > 1 else one()

    def slot_cache(self, slots: int | None = None) -> SlotCache | None:
        """A KV cache of `slots` sequences (default: the plan's --batch) that join and leave a running batch
        (fiddlerc.runtime.slots), for `next_logits`; None where some attention layer runs Hugging Face's
        module, whose cache writes one position for the whole batch."""
        if not self.plan.attention or any(a.path != GENERATED for a in self.plan.attention):
            return None
        slots = slots or self.plan.target.batch_size
        dtype = parse_dtype(self.plan.model.dtype)  # what attention computes keys and values in
        return SlotCache(self.config, slots, self.plan.target.context_tokens, dtype, self.device)

    def next_logits(self, input_ids: torch.Tensor, cache, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of the token after each row of `input_ids` [B, T] (positions `position_ids` [B, T]),
        appending them to `cache`: one sequence's slot (`slot_cache(...).view(s)`, or a `new_cache()`), or a
        SlotCache after `begin_step(B)`, one token per slot. For a packed prefill (`SlotCache.prefill`, its
        prompts' ids one after the other in one row, its `position_ids()`), the logits [prompts, V] after each
        prompt."""
        ids, positions = input_ids.to(self.device), position_ids.to(self.device)
        with self._lock, torch.no_grad():
            if isinstance(cache, PackedPrefill):
                self._forward.logits_at = cache.ends.to(self.device)
                try:
                    return self._run(ids, cache, None, positions)[0]
                finally:
                    self._forward.logits_at = None
            return self._run_last(ids, cache, None, positions)[:, -1]

    def _run(self, input_ids, cache, attention_mask, position_ids) -> torch.Tensor:
        if isinstance(cache, MicroBatchCache):
            micro = len(cache.caches)
            if cache.split is None:  # the prefill decides; decode steps follow it
                cache.split = input_ids.shape[0] >= micro and input_ids.shape[0] % micro == 0
            if cache.split:
                return self._forward.run_micro(input_ids, cache.caches, attention_mask, position_ids)
            cache = cache.caches[0]
        return self._forward(input_ids, cache, attention_mask, position_ids)

    def _run_last(self, input_ids, cache, attention_mask, position_ids) -> torch.Tensor:
        """`_run` computing the logits of the last position only [B, 1, V]: all generation reads (as Hugging
        Face's generate asks with logits_to_keep=1); a prefill of T tokens is spared T - 1 rows of lm_head."""
        self._forward.logits_last = True
        try:
            return self._run(input_ids, cache, attention_mask, position_ids)
        finally:
            self._forward.logits_last = False

    def _check_input(self, input_ids: torch.Tensor, new_tokens: int = 0) -> None:
        if self._worker.closed:  # checked here: layers whose kernels run inline never reach the worker
            raise RuntimeError("the CPU worker was closed: load the model again")
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.ndim != 2
            or input_ids.dtype not in (torch.int64, torch.int32)
        ):
            raise OptionError("input_ids must be an integer tensor of shape [batch, tokens]")
        context = self.plan.target.context_tokens
        if input_ids.shape[1] + new_tokens > context:
            raise OptionError(
                f"{input_ids.shape[1]} prompt tokens + {new_tokens} new tokens exceed the context of {context} tokens "
                f"this model was compiled for: shorten the prompt or recompile with --context {input_ids.shape[1] + new_tokens}"
            )

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] of a full forward pass from an empty cache (as Hugging Face's model(...) computes)."""
        self._check_input(input_ids)
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=self.device)[None, :]
        with self._lock:
            return self._run(input_ids, self.new_cache(), attention_mask, position_ids.to(self.device))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
        on_token=None,
        streamer=None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
    ) -> torch.Tensor:
        """Prompt + new tokens [B, T + n]: greedy unless do_sample, beam search with num_beams > 1 (as
        Hugging Face's, with its length_penalty and early_stopping); stops at EOS unless ignore_eos.
        `on_token` sees each step's tokens [B]; `streamer` is a transformers streamer (TextStreamer,
        TextIteratorStreamer: `put` gets the prompt, then each step's tokens, and `end` comes last)."""
        self._check_input(input_ids, max_new_tokens)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise OptionError(
                "a right-padded batch (a row whose last position is padding) would continue from its padding: "
                "pad on the left (tokenizer.padding_side = 'left'), as Hugging Face's generate expects"
            )
        eos = () if ignore_eos else (_as_ids(eos_token_id) if eos_token_id is not None else self.eos_token_ids)
        if num_beams > 1:
            if do_sample or on_token is not None or streamer is not None:
                raise OptionError(
                    "beam search is deterministic and knows its best beam only at the end: drop do_sample, on_token "
                    "and streamer, or use num_beams=1"
                )
            if max_new_tokens < 1:
                raise OptionError("beam search needs max_new_tokens >= 1")
            with self._lock:
                return _beam_search(
                    self._run_last,
                    self.new_cache,
                    input_ids.to(self.device),
                    None if attention_mask is None else attention_mask.to(self.device),
                    max_new_tokens,
                    num_beams,
                    eos_token_ids=eos,
                    pad_token_id=self.pad_token_id,
                    length_penalty=length_penalty,
                    early_stopping=early_stopping,
                )
        if streamer is not None:
            streamer.put(input_ids.cpu())
            on_token = _also_to(streamer, on_token)
        with self._lock:
            out = _generate(
                self._run_last,
                self.new_cache,
                input_ids.to(self.device),
                attention_mask,
                max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                eos_token_ids=eos,
                pad_token_id=self.pad_token_id,
                seed=seed,
                on_token=on_token,
            )
        if streamer is not None:
            streamer.end()
        return out

    @property
    def tokenizer(self):
        """The model folder's tokenizer (loaded on first use; fiddlerc.model.tokenizer)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.artifact.folder.path)
        return self._tokenizer

    def stream(
        self,
        prompt: str | list[dict],
        max_new_tokens: int = 256,
        *,
        chat_template: str | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> Completion:
        """The answer's text, piece by piece as it is generated (iterate the Completion; its counts and
        finish reason are set as it goes): to `prompt` as plain text, or to a conversation
        ([{"role": "user", "content": ...}, ...]) written with the tokenizer's chat template or
        `chat_template`. Stops at the model's end-of-turn ids (its generation_config's EOS list). The
        model is held from the first piece until the answer ends or the Completion is closed."""
        tok = self.tokenizer
        ids = prompt_ids(tok, prompt) if isinstance(prompt, str) else chat_ids(tok, prompt, chat_template)
        input_ids = torch.tensor([ids], device=self.device)
        self._check_input(input_ids, max_new_tokens)
        eos = () if ignore_eos else self.eos_token_ids
        sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        done = Completion(len(ids))

        def pieces() -> Iterator[str]:
            text = TextStream(tok)
            with self._lock:
                steps = _steps(self._run_last, self.new_cache, input_ids, None, max_new_tokens, eos_token_ids=eos,
                               pad_token_id=self.pad_token_id, **sampling)  # fmt: skip
                for token in steps:
                    done.completion_tokens += 1
                    if int(token[0]) in eos:
                        done.finish_reason = "stop"
                        break
                    piece = text.push(int(token[0]))
                    if piece:
                        yield piece
            done.finish_reason = done.finish_reason or "length"
            tail = text.flush()
            if tail:
                yield tail

        done.pieces = pieces()
        return done

    def routing_stats(self) -> dict:
        """Routed (token, expert) pairs since load, per MoE layer and in total: served by resident experts
        on the fast device ("fast"), by the CPU worker ("cpu"), or by cpu-tier experts whose weights were
        fetched for a big call ("fetched"); per expert; and the resident hit rate."""

        def summary(fast: int, cpu: int, fetched: int) -> dict:
            total = fast + cpu + fetched
            return {"fast": fast, "cpu": cpu, "fetched": fetched, "hit_rate": fast / total if total else 0.0}

        layers = {}
        for p in self.placed_experts:
            fast, cpu, fetched, per_expert = p.counts()
            layers[p.layer] = {**summary(fast, cpu, fetched), "per_expert": per_expert}
        totals = [sum(v[k] for v in layers.values()) for k in ("fast", "cpu", "fetched")]
        return {"layers": layers, **summary(*totals)}

    def close(self) -> None:
        """Stop the CPU worker thread (also done when the model is garbage-collected); write the trace
        if one was asked for."""
        self._finalizer()
        if self.tracer is not None and self._trace_path is not None:
            self.tracer.save(self._trace_path)
            self._trace_path = None

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Completion:
    """An answer as `CompiledModel.stream` generates it: iterate it for its text pieces; `prompt_tokens`,
    `completion_tokens` (the end-of-turn id counted) and `finish_reason` ("stop": an end-of-turn id,
    "length": max_new_tokens reached; None while it runs) follow it."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.pieces: Iterator[str] = iter(())

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    def text(self) -> str:
        """The whole answer (the rest of it, if some was read already)."""
        return "".join(self.pieces)

    def close(self) -> None:
        """Stop generating (the model is free again)."""
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """The next token per row of `logits` [B, V], as `generate` picks it: greedy, or sampled with
    `temperature` and nucleus `top_p` from `generator`."""
    return _pick(logits, do_sample, temperature, top_p, generator)


def _also_to(streamer, on_token):
    """An on_token callback that also puts each step's tokens into a transformers streamer."""

    def both(token: torch.Tensor) -> None:
        streamer.put(token.cpu())
        if on_token is not None:
            on_token(token)

    return both


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load(
    out_dir: str | Path,
    device: str | None = None,
    model_dir: str | Path | None = None,
    num_threads: int | None = None,
    trace: str | Path | None = None,
    kernels: str = "auto",
) -> CompiledModel:
    """Verify a compiled folder and load it onto this machine's devices. With `trace`, record a
    Chrome/Perfetto timeline of every call and write it there on `close()`.

    `kernels` picks the CPU matrix kernels (fiddlerc.runtime.kernels): "auto" measures, once per
    weight shape on this machine, whether a packed copy or fiddlerc's C product is faster than the plain
    weight (and on a CPU-only machine whether one-token products split over two threads); "reference"
    computes exactly as Hugging Face does; "packed" packs wherever this CPU can; "native" runs the C
    product wherever it can read the weight."""
    if kernels not in KERNEL_MODES:
        raise OptionError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_MODES)}")
    artifact, meta_model = verify_artifact(out_dir, model_dir)
    fast = resolve_device(device, artifact.plan.target.cpu_only)
    return CompiledModel(artifact, meta_model, fast, num_threads, trace, kernels)

"""The server's generation loop: concurrent requests batched at the step level.

One thread runs the model. Each turn of its loop admits the waiting requests that fit free slots of the KV
cache, up to `prefill_tokens` prompt tokens a turn (always at least one request), runs their prompts
together in one forward (a packed prefill, fiddlerc.runtime.slots: each expert's weights read once for all
of them) and sends each its first token at once; then it runs one decode step for every running request
together: one forward of a [running, 1] batch, in which each expert's weights are read once for all the
tokens routed to it. A request leaves the batch when it ends (an end-of-turn id, its token budget, a stop
string, the context, or its client gone) and its slot goes to the next. So a new request's first token
waits for at most one decode step of the others and the prefill of the prompts admitted with it, never for
the others to finish. Requests that arrive together start together: eight prompts of ten tokens took
143 ms as one forward here against 316 ms as eight, and the batch runs whole from its first step. A
prompt longer than `prefill_tokens` is prefilled in chunks of that many tokens into its slot, a chunk a
turn between the running requests' decode steps, so no prompt holds them back for more than one chunk's
forward (the requests behind it wait until it runs); its first token follows its last chunk.

The batch holds up to the sequences the plan reserved KV cache for (`--batch`); further requests wait in a
bounded queue, and `submit` refuses one beyond it (the HTTP layer answers 503). Where a model's attention
runs Hugging Face's module (not fiddlerc's generated attention, whose slot cache this needs), requests still
take turns step by step, each with its own cache, but each step is its own forward.

Each request samples with its own torch.Generator, so a seeded request gives the same tokens whatever else
runs beside it, up to the rounding of the batched kernels (a batch of one runs the one-token kernels).
"""

from __future__ import annotations

import collections
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fiddlerc.loader.model import sample_next
from fiddlerc.model.tokenizer import TextStream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine's queue of waiting requests is full."""


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Job:
    """One request: its prompt's ids, its budget and sampling, its stop strings, and `emit`, called from the
    engine's thread with ("text", piece), then ("end", finish_reason) or ("error", message)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    emit: Callable[[tuple], None]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine state
    cache: object = None
    position: int = 0
    last: int = 0
    held: str = ""
    prefilled: int = 0  # prompt tokens in its slot (a long prompt goes in chunks)
    text: TextStream | None = None
    generator: torch.Generator | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees its slot at its next step."""
        self.cancelled.set()


class Engine:
    """Runs `model` (a CompiledModel) for the jobs `submit` gives it: `run()` on the calling thread until
    `stop()`, or `start()` for a thread of its own. Run it on the main thread where speed matters: the same
    decode step took 16-18 ms from another thread here against 10-12 ms from the main one (2 cores; measured,
    its cause not pinned down: torch and the C kernels share one OpenMP runtime in the process, torch's)."""

    STEPS_KEPT = 1000  # decode steps timed per batch size (step_times)

    def __init__(self, model, slots: int | None = None, queue_size: int = 64, prefill_tokens: int = 512) -> None:
        self.model = model
        self.prefill_tokens = prefill_tokens  # prompt tokens admitted a turn, beyond the first request's
        self.tokenizer = model.tokenizer
        self.cache = model.slot_cache(slots)
        self.slots = self.cache.slots if self.cache is not None else (slots or model.plan.target.batch_size)
        self.context = model.plan.target.context_tokens
        self.queue_size = queue_size
        self.eos = set(model.eos_token_ids)
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._prefilling: Job | None = None  # a long prompt going in chunks, in the slot after the running ones
        self._step_seconds: dict[int, collections.deque[float]] = {}  # by batch size, the latest STEPS_KEPT
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> Engine:
        """Run the loop on a thread of its own (tests, embedding); returns the engine."""
        self._thread = threading.Thread(target=self.run, name="fiddlerc-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def batched(self) -> bool:
        """Whether running requests share one forward a step (else each step is a forward of its own)."""
        return self.cache is not None

    def submit(self, job: Job) -> None:
        """Queue `job`; QueueFull where `queue_size` requests wait already, RuntimeError once stopping."""
        with self._wake:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(job)
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests; a prompt being prefilled in chunks counts as running."""
        with self._wake:
            return len(self._running) + (self._prefilling is not None), len(self._waiting)

    def stop(self, timeout: float | None = None) -> None:
        """Take no more jobs, finish those running and waiting, then end `run` (waiting for it up to
        `timeout` where it runs on another thread)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        """The loop, until `stop()` and every job has ended; logs `step_times()` at the end (INFO)."""
        try:
            self._loop()
        finally:
            if self._step_seconds:
                times = ", ".join(f"{n}: {ms:.1f} ms ({k} steps)" for n, (k, ms) in self.step_times().items())
                log.info("decode steps by batch size, median of the latest: %s", times)

    def step_times(self) -> dict[int, tuple[int, float]]:
        """{batch size: (steps counted, median ms)} of the latest decode steps: what a batch of n costs against
        a batch of one, as the server runs them."""
        with self._wake:
            kept = {n: list(d) for n, d in sorted(self._step_seconds.items())}
        return {n: (len(v), statistics.median(v) * 1e3) for n, v in kept.items()}

    # -- the loop

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._busy() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._waiting and not self._busy():
                    return
                jobs = self._admit() if self._prefilling is None else []
            try:
                if jobs:
                    self._start(jobs)
                elif self._prefilling is not None:
                    self._prefill_chunk()
                self._drop_finished()
                if self._running:
                    self._step()
                    self._drop_finished()
            except Exception as e:  # a bug, or out of memory: every request in flight hears of it
                log.exception("generation failed")
                failed = [*self._running, *(j for j in [*jobs, self._prefilling] if j and j not in self._running)]
                for j in failed:
                    j.finish_reason = j.finish_reason or "error"
                    j.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                self._release(failed)

    def _busy(self) -> bool:
        return bool(self._running) or self._prefilling is not None

    def _admit(self) -> list[Job]:
        """The waiting jobs this turn starts (under the lock): as many as free slots take, while their prompts
        stay within `prefill_tokens` (the first always)."""
        jobs: list[Job] = []
        tokens = 0
        while self._waiting and len(self._running) + len(jobs) < self.slots:
            n = self._waiting[0].prompt_tokens
            if jobs and tokens + n > self.prefill_tokens:
                break
            jobs.append(self._waiting.popleft())
            tokens += n
        return jobs

    def _start(self, jobs: list[Job]) -> None:
        """The jobs' prompts into free slots, in one forward where the cache packs them, and their first tokens."""
        first = len(self._running)
        for i, job in enumerate(jobs):
            job.cache = self.cache.view(first + i) if self.cache is not None else self.model.new_cache()
            job.text = TextStream(self.tokenizer)
            seed = job.sampling.seed if job.sampling.seed is not None else int(torch.seed() % 2**63)
            job.generator = torch.Generator().manual_seed(seed)
            job.position = job.prompt_tokens
        if self.cache is not None and len(jobs) == 1 and jobs[0].prompt_tokens > self.prefill_tokens:
            self._prefilling = jobs[0]  # in chunks, this turn's first
            self._prefill_chunk()
            return
        if self.cache is not None and len(jobs) > 1:
            packed = self.cache.prefill(list(range(first, first + len(jobs))), [j.prompt_tokens for j in jobs])
            ids = torch.tensor([[t for j in jobs for t in j.prompt_ids]])
            logits = list(self.model.next_logits(ids, packed, packed.position_ids()))
        else:
            logits = []
            for job in jobs:
                ids = torch.tensor([job.prompt_ids])
                logits.append(self.model.next_logits(ids, job.cache, torch.arange(ids.shape[1])[None])[0])
        for job, row in zip(jobs, logits, strict=True):
            self._running.append(job)
            self._advance(job, row)

    def _prefill_chunk(self) -> None:
        """The next `prefill_tokens` of the long prompt into its slot; after its last, its first token, and it
        joins the running batch (its slot is the one after theirs)."""
        job = self._prefilling
        if job.cancelled.is_set():
            job.cache.clear()
            self._prefilling = None
            return
        start, end = job.prefilled, min(job.prefilled + self.prefill_tokens, job.prompt_tokens)
        ids = torch.tensor([job.prompt_ids[start:end]])
        logits = self.model.next_logits(ids, job.cache, torch.arange(start, end)[None])
        job.prefilled = end
        if end == job.prompt_tokens:
            self._prefilling = None
            self._running.append(job)
            self._advance(job, logits[0])

    def _step(self) -> None:
        """One decode step of every running job, timed."""
        jobs = self._running
        t0 = time.perf_counter()
        if self.cache is not None and len(jobs) > 1:
            positions = self.cache.begin_step(len(jobs))
            tokens = torch.tensor([[j.last] for j in jobs])
            logits = self.model.next_logits(tokens, self.cache, positions[:, None])
        else:  # one job (the one-token kernels), or a model without a slot cache: a forward each
            rows = [
                self.model.next_logits(torch.tensor([[j.last]]), j.cache, torch.tensor([[j.position]])) for j in jobs
            ]
            logits = torch.cat(rows)
        seconds = time.perf_counter() - t0
        with self._wake:
            self._step_seconds.setdefault(len(jobs), collections.deque(maxlen=self.STEPS_KEPT)).append(seconds)
        for j, row in zip(jobs, logits, strict=True):
            j.position += 1
            self._advance(j, row)

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Pick the job's next token from `logits` [V], send its text, and see whether the job ends."""
        s = job.sampling
        if job.logit_bias:
            logits = logits.clone()
            logits[list(job.logit_bias)] += torch.tensor(list(job.logit_bias.values()), dtype=logits.dtype)
        token = int(sample_next(logits[None], s.temperature > 0, s.temperature or 1.0, s.top_p, job.generator)[0])
        job.last = token
        job.completion_tokens += 1
        if token in self.eos:
            job.finish_reason = "stop"
        else:
            self._send(job, job.text.push(token))
        if job.finish_reason is None and (job.completion_tokens >= job.max_tokens or job.position >= self.context):
            job.finish_reason = "length"
        if job.finish_reason is not None:
            self._send(job, job.text.flush(), final=True)

    def _send(self, job: Job, piece: str, final: bool = False) -> None:
        """Text out, held back while it could be the start of a stop string; a stop string ends the job there."""
        text = job.held + piece
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                text, job.finish_reason, final = text[:at], "stop", True
        keep = (
            0
            if final
            else max((n for stop in job.stop for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        )
        job.held = text[len(text) - keep :] if keep else ""
        out = text[: len(text) - keep]
        if out:
            job.emit(("text", out))

    def _drop_finished(self) -> None:
        """Jobs that ended or were cancelled leave the batch; the last running job takes a freed slot."""
        i = 0
        while i < len(self._running):
            job = self._running[i]
            if job.finish_reason is None and not job.cancelled.is_set():
                i += 1
                continue
            last = len(self._running) - 1
            if self.cache is not None and i != last:
                self.cache.move(last, i)
                self._running[last].cache = self.cache.view(i)
            elif self.cache is not None:
                self.cache.view(i).clear()
            self._running[i] = self._running[last]
            self._running.pop()
            if not job.cancelled.is_set():
                job.emit(("end", job.finish_reason))
        slot = len(self._running)  # a prompt going in chunks keeps the slot after the running ones
        if self._prefilling is not None and self._prefilling.cache is not self.cache.view(slot):
            src = self.cache.views.index(self._prefilling.cache)
            self.cache.move(src, slot)
            self._prefilling.cache = self.cache.view(slot)

    def _release(self, jobs: list[Job]) -> None:
        """Every slot these jobs hold (a packed prefill that failed may have filled some) freed; none runs."""
        for j in jobs:
            if self.cache is not None and j.cache is not None:
                j.cache.clear()
        self._running, self._prefilling = [], None

"""The server's engine: step-level batching gives each request what it would get alone."""

import threading
import time

import pytest

from fiddlerc.model.tokenizer import chat_ids, prompt_ids
from fiddlerc.runtime.slots import PackedPrefill
from fiddlerc.serve.engine import Engine, Job, QueueFull, Sampling
from tests.serve.conftest import safe_tokens

PROMPTS = ["hello there", "the quick brown fox", "fiddler", "a b c d e f", "mixture of experts", "zzz"]


class Collect:
    """A job's events, with the time each arrived."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.done = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append((time.perf_counter(), *event))
        if event[0] in ("end", "error"):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e[2] for e in self.events if e[1] == "text")

    @property
    def end(self):
        return self.events[-1][1:]


def _job(model, prompt: str, max_tokens: int, **kw) -> tuple[Job, Collect]:
    out = Collect()
    ids = prompt_ids(model.tokenizer, prompt)
    return Job(ids, max_tokens, kw.pop("sampling", Sampling(temperature=0)), kw.pop("stop", ()), out), out


@pytest.fixture
def engine(model):
    e = Engine(model).start()
    yield e
    e.stop(timeout=30)


def test_concurrent_requests_get_what_each_would_alone(model, engine):
    assert engine.batched and engine.slots == 4
    n = {p: safe_tokens(model, p, 24) for p in PROMPTS}
    prompts = [p for p in PROMPTS if n[p]]
    assert len(prompts) >= 5 and sum(n.values()) >= 60  # enough tokens compared to mean something
    alone = {p: model.stream(p, n[p]).text() for p in prompts}
    jobs = [_job(model, p, n[p]) for p in prompts]  # more jobs than the 4 slots: some wait, then join
    for job, _ in jobs:
        engine.submit(job)
    for (job, out), p in zip(jobs, prompts, strict=True):
        assert out.done.wait(120)
        assert out.text == alone[p], p
        assert out.end[0] == "end" and job.finish_reason in ("stop", "length")
        assert job.completion_tokens <= n[p] and job.prompt_tokens == len(prompt_ids(model.tokenizer, p))
    assert engine.load() == (0, 0)
    times = engine.step_times()  # steps of several sequences ran, each timed
    assert max(times) > 1 and all(k >= 1 and ms > 0 for k, ms in times.values())


@pytest.mark.parametrize("fits", ["all", "one"])
def test_requests_waiting_together_start_in_one_forward_within_the_token_budget(model, monkeypatch, fits):
    n = {p: safe_tokens(model, p, 12) for p in PROMPTS}
    prompts = [p for p in PROMPTS if n[p]][:4]
    longest = max(len(prompt_ids(model.tokenizer, p)) for p in prompts)
    budget = 512 if fits == "all" else longest  # the longest prompt fits whole, no two together
    alone = {p: model.stream(p, n[p]).text() for p in prompts}
    prefills = []
    real = model.next_logits

    def spy(ids, cache, positions):
        if ids.shape[1] > 1 or isinstance(cache, PackedPrefill):
            prefills.append(len(cache.lengths) if isinstance(cache, PackedPrefill) else 1)
        return real(ids, cache, positions)

    monkeypatch.setattr(model, "next_logits", spy)
    engine = Engine(model, prefill_tokens=budget)
    jobs = [_job(model, p, n[p]) for p in prompts]
    for job, _ in jobs:  # all waiting when the engine starts
        engine.submit(job)
    engine.start()
    try:
        for (_, out), p in zip(jobs, prompts, strict=True):
            assert out.done.wait(120) and out.text == alone[p], p
    finally:
        engine.stop(timeout=30)
    # within the budget, one forward for all four prompts; else, in their order, as many as fit a turn
    want, tokens = [], 0
    for p in prompts:
        k = len(prompt_ids(model.tokenizer, p))
        if want and tokens + k <= budget:
            want[-1], tokens = want[-1] + 1, tokens + k
        else:
            want, tokens = [*want, 1], k
    assert prefills == want and (want == [len(prompts)]) == (fits == "all")


def test_a_long_prompt_goes_in_chunks_between_the_running_decode_steps(model, monkeypatch):
    long_prompt = "the quick brown fox jumps over the lazy dog"  # 43 byte tokens: 11 chunks of 4
    n = safe_tokens(model, long_prompt, 8)
    short_n = {p: safe_tokens(model, p, 6) for p in PROMPTS}
    shorts = [p for p in PROMPTS if short_n[p]][:2]
    assert n and len(shorts) == 2
    alone = {p: model.stream(p, k).text() for p, k in [(long_prompt, n), *((p, short_n[p]) for p in shorts)]}
    chunks = []
    real = model.next_logits

    def spy(ids, cache, positions):
        if ids.shape[0] == 1 and ids.shape[1] > 1 and not isinstance(cache, PackedPrefill):
            chunks.append(ids.shape[1])
        return real(ids, cache, positions)

    monkeypatch.setattr(model, "next_logits", spy)
    engine = Engine(model, prefill_tokens=4).start()
    try:
        first, first_out = _job(model, shorts[0], short_n[shorts[0]])  # ends while the long prompt goes in
        long, long_out = _job(model, long_prompt, n)
        runner, runner_out = _job(model, "a long answer", 120)
        engine.eos = set()
        for job in (runner, first):
            engine.submit(job)
        while len(first_out.events) < 1:
            time.sleep(0.005)
        engine.submit(long)
        assert long_out.done.wait(120) and first_out.done.wait(60)
        assert long_out.text == alone[long_prompt] and first_out.text == alone[shorts[0]]
        # the running request went on between the chunks: tokens of it came before the long one's first
        assert sum(1 for e in runner_out.events if e[0] < long_out.events[0][0]) > 5
        late, late_out = _job(model, shorts[1], short_n[shorts[1]])  # the slots still hold the right sequences
        engine.submit(late)
        assert late_out.done.wait(60) and late_out.text == alone[shorts[1]] and runner_out.done.wait(120)
    finally:
        engine.stop(timeout=30)
    prompt_tokens = len(prompt_ids(model.tokenizer, long_prompt))
    assert sorted(chunks)[-1] == 4 and sum(c for c in chunks if c <= 4) >= prompt_tokens - 1  # in chunks of 4


def test_a_failed_prefill_tells_its_requests_and_frees_their_slots(model, monkeypatch):
    real = model.next_logits

    def fails_once(ids, cache, positions):
        if isinstance(cache, PackedPrefill) and not failed:
            failed.append(real(ids, cache, positions))  # the slots filled, then the failure
            raise MemoryError("out of memory")
        return real(ids, cache, positions)

    failed: list = []
    monkeypatch.setattr(model, "next_logits", fails_once)
    engine = Engine(model)
    jobs = [_job(model, p, 4) for p in PROMPTS[:3]]
    for job, _ in jobs:
        engine.submit(job)
    engine.start()
    try:
        for _, out in jobs:
            assert out.done.wait(60) and out.end == ("error", "generation failed: MemoryError: out of memory")
        again, out = _job(model, PROMPTS[0], 4)  # the engine goes on, its slots free
        engine.submit(again)
        assert out.done.wait(60) and out.end[0] == "end" and again.completion_tokens == 4
    finally:
        engine.stop(timeout=30)
    assert failed and engine.cache.lengths(engine.slots).tolist() == [0] * engine.slots


def test_a_new_request_gets_its_first_token_while_a_long_one_runs(model, engine):
    long, long_out = _job(model, "a long answer", 200, sampling=Sampling(temperature=0))
    engine.eos = set()  # the long one runs its whole budget
    engine.submit(long)
    while not long_out.events:
        time.sleep(0.01)
    short, short_out = _job(model, "hi", 3)
    engine.submit(short)
    assert short_out.done.wait(60) and long_out.done.wait(120)
    first_short = short_out.events[0][0]
    assert first_short < long_out.events[-1][0]  # before the long one ended
    assert short.completion_tokens == 3 and long.completion_tokens == 200


def test_stop_strings_end_the_answer_before_them_even_across_pieces(model, engine):
    whole = model.stream("stop here", 20, ignore_eos=True).text()
    stop = whole[5:8]
    job, out = _job(model, "stop here", 20, stop=(stop, "never seen"))
    engine.eos = set()
    engine.submit(job)
    assert out.done.wait(60)
    assert out.text == whole[: whole.index(stop)] and job.finish_reason == "stop"


def test_a_cancelled_job_frees_its_slot_and_a_full_queue_is_refused(model):
    engine = Engine(model, queue_size=1).start()
    try:
        engine.eos = set()
        jobs = [_job(model, "x", 10_000 // 50) for _ in range(4)]
        for job, _ in jobs:  # one at a time: only one may wait
            engine.submit(job)
            while engine.load()[1]:
                time.sleep(0.005)
        assert engine.load() == (4, 0)
        engine.submit(_job(model, "waits", 2)[0])
        with pytest.raises(QueueFull):
            engine.submit(_job(model, "refused", 2)[0])
        for job, _ in jobs:
            job.cancel()
        deadline = time.time() + 30
        while engine.load() != (0, 0) and time.time() < deadline:
            time.sleep(0.01)
        assert engine.load() == (0, 0)
        assert all(not out.events or out.events[-1][1] != "end" for _, out in jobs)  # cancelled: no end event
    finally:
        engine.stop(timeout=30)


def test_a_seeded_request_samples_the_same_text_beside_others(model, engine):
    seeded = Sampling(temperature=0.9, top_p=0.95, seed=7)
    ids = chat_ids(model.tokenizer, [{"role": "user", "content": "tell me"}])
    alone = Collect()
    engine.submit(Job(ids, 8, seeded, (), alone))
    assert alone.done.wait(60)
    others = [_job(model, p, 8) for p in PROMPTS[:3]]
    for job, _ in others:
        engine.submit(job)
    beside = Collect()
    engine.submit(Job(ids, 8, seeded, (), beside))
    assert beside.done.wait(60) and all(out.done.wait(60) for _, out in others)
    assert beside.text == alone.text

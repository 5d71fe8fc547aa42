"""Aggregate decode tokens/s of `fiddlerc serve` at 1, 4 and 8 concurrent streams on the ~1 GB benchmark
model, beside llama-cpp-python's server (`python -m llama_cpp.server`) on the same weights when given.

    python examples/bench_serve.py [--dir /tmp/fiddlerc-fullwidth] [--streams 1,4,8] [--tokens 64]
        [--rounds 3] [--dtype fp32|bf16] [--llama-python PY --llama-src SRC]

Reuses (or builds) the benchmark slice of bench_fullwidth.py: its model, its trained tokenizer and, with
--llama-*, its GGUF conversion (../shared/PEERS.md says how to build llama-cpp-python here; its server
also needs fastapi, uvicorn, sse-starlette, starlette-context and pydantic-settings in that environment).
fiddlerc compiles it CPU-only for 8 sequences; llama-cpp-python's server runs with --interrupt_requests
False (by default a new streamed request interrupts the one running). Both servers run at once (idle while the other is
measured), and the rounds alternate between them. Each stream is one completion request (a prompt of
about 16 tokens, `--tokens` new tokens, greedy, the end-of-text token banned with logit_bias so that every
stream generates all of them), the streams sent together; aggregate tokens/s is the completion tokens of
all streams over the wall time from the first request to the last answer (the prompts' prefill
included); aggregate decode tokens/s is the tokens after each stream's first over the time from the
first stream's first token to the last stream's last (streamed). Medians of the rounds; 2 threads each
(this machine's cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "The history of the city begins with",
    "A recipe for bread needs flour, water and",
    "In the morning the market opens and",
    "The engine turned over twice before",
    "Mixture of experts models route each token to",
    "She opened the letter and read that",
    "The river runs north through the valley where",
    "Every good compiler starts with a parser that",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_stream(url: str, path: str, body: dict, on_event) -> None:
    """POST `body` as JSON to `url` + `path` and call `on_event(dict)` for each server-sent event's data until
    `[DONE]`. A lean client, as vLLM's benchmark_serving reads streams (aiohttp, the events parsed by hand):
    the client runs on the same cores as the servers, and the `openai` client's parsing of each chunk into
    its models took ~10 % of an 8-stream round's aggregate here (the suite drives the server with it)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    try:
        conn.request("POST", u.path + path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise SystemExit(f"{url}{path} answered {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return
            on_event(json.loads(data))
    finally:
        conn.close()


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    u = urlsplit(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            conn.request("GET", u.path + "/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not come up in {timeout} s")


def round_of(url: str, streams: int, tokens: int, eos: int) -> tuple[float, float, int]:
    """One round: `streams` streamed requests at once; (aggregate tokens/s end to end, aggregate decode
    tokens/s, completion tokens). End to end: all completion tokens over the wall time from the first
    request to the last answer. Decode: the tokens after each stream's first over the time from the first
    stream's first token to the last stream's last (the first prefill and its wait left out)."""
    got = [0] * streams
    span: list[tuple[float, float]] = [(0.0, 0.0)] * streams

    def ask(i: int) -> None:
        body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
                "logit_bias": {str(eos): -100}, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        times: list[float] = []

        def on_event(event: dict) -> None:
            choices = event.get("choices") or []
            if event.get("usage"):
                got[i] = event["usage"]["completion_tokens"]
            if choices and choices[0].get("text"):
                times.append(time.perf_counter())
            if choices and choices[0].get("finish_reason") == "length" and not got[i]:
                got[i] = tokens  # a server without include_usage (llama-cpp-python's): the budget, all of it

        post_stream(url, "/completions", body, on_event)
        span[i] = (times[0], times[-1])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    window = max(b for _, b in span) - min(a for a, _ in span)
    return sum(got) / wall, (sum(got) - streams) / window, sum(got)


def server_steps(url: str) -> dict[str, float]:
    """fiddlerc's own timing of its decode steps, median ms by batch size (its /health)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())["decode_step_ms"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fiddlerc-fullwidth")
    ap.add_argument("--streams", default="1,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--llama-python", default=None)
    ap.add_argument("--llama-src", default=None)
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]

    import fiddlerc

    sys.path.insert(0, str(HERE))
    from bench_fullwidth import compiled_by_this_version, prepare

    root = Path(args.dir)
    llama = (args.llama_python, Path(args.llama_src)) if args.llama_python and args.llama_src else None
    paths = prepare("bench", root, llama)
    model = paths["hf fp32"]
    out = root / "bench" / f"fiddlerc-serve-{args.dtype}"
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]
    if not compiled_by_this_version(out):
        fiddlerc.compile(model, out, gpu_memory=0, context=512, batch=max(streams), dtype=dtype)
    from fiddlerc.model.tokenizer import load_tokenizer

    eos = load_tokenizer(model).eos_token_id
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    servers: dict[str, tuple[str, subprocess.Popen]] = {}
    try:
        port = free_port()
        servers["fiddlerc"] = (f"http://127.0.0.1:{port}/v1", subprocess.Popen(
            [sys.executable, "-m", "fiddlerc", "serve", str(out), "--port", str(port)], env=env,
            stderr=subprocess.DEVNULL))  # fmt: skip
        if llama is not None:
            gguf = paths[{"fp32": "llama.cpp F32", "bf16": "llama.cpp BF16"}[args.dtype]]
            port = free_port()
            servers["llama.cpp"] = (f"http://127.0.0.1:{port}/v1", subprocess.Popen(
                [llama[0], "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", "2", "--n_ctx", "1024", "--interrupt_requests", "False",
                 "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        for url, proc in servers.values():
            wait_ready(url, proc)
            round_of(url, 1, 4, eos)  # warm up
        results: dict[tuple[str, int], list[float]] = {}
        decoding: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            names = list(servers) if r % 2 == 0 else list(reversed(servers))
            for n in streams:
                for name in names:
                    rate, dec, done = round_of(servers[name][0], n, args.tokens, eos)
                    assert done == n * args.tokens, f"{name}: {done} tokens of {n * args.tokens}"
                    results.setdefault((name, n), []).append(rate)
                    decoding.setdefault((name, n), []).append(dec)
        steps = server_steps(servers["fiddlerc"][0])
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    for title, table in (("end to end", results), ("decode (from the first token to the last)", decoding)):
        print(f"aggregate tokens/s {title}, {args.dtype}, {args.tokens} new tokens a stream, "
              f"median of {args.rounds} alternating rounds")  # fmt: skip
        print(
            f"{'streams':>8} "
            + " ".join(f"{name:>12}" for name in servers)
            + ("   fiddlerc / llama.cpp" if llama else "")
        )
        for n in streams:
            med = {name: statistics.median(table[(name, n)]) for name in servers}
            ratio = f"   {med['fiddlerc'] / med['llama.cpp']:.2f}x" if llama else ""
            print(f"{n:>8} " + " ".join(f"{med[name]:>12.1f}" for name in servers) + ratio)
        first = table[("fiddlerc", streams[0])]
        for n in streams[1:]:  # each round's ratio, its streams measured one after the other: the machine drifts
            ratios = [b / a for a, b in zip(first, table[("fiddlerc", n)], strict=True)]
            print(
                f"fiddlerc: {n} streams {statistics.median(ratios):.2f}x the aggregate of {streams[0]} "
                f"(median of the rounds' ratios; {min(ratios):.2f}-{max(ratios):.2f})"
            )
    base = steps.get(str(streams[0]))
    parts = []
    for n in streams:
        ms = steps.get(str(n))
        if ms is not None:  # a step of n sequences gives n tokens: its tokens/s against the first count's
            gain = f" ({n * base / (streams[0] * ms):.2f}x the tokens/s)" if base and n != streams[0] else ""
            parts.append(f"{n}: {ms} ms{gain}")
    print("fiddlerc's decode steps as the server timed them (median by batch size): " + ", ".join(parts))


if __name__ == "__main__":
    main()

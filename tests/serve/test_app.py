"""The HTTP API, live: `fiddlerc serve` on localhost, driven by the official openai client (and raw HTTP for
the error cases)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.serve.conftest import safe_tokens


def http(method: str, url: str, body: bytes | dict | None = None, key: str | None = "sk-test") -> tuple[int, dict]:
    """Raw HTTP: the status and the JSON body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def health(base: str) -> dict:
    return http("GET", base.removesuffix("/v1") + "/health")[1]


def start(out, *args) -> tuple[subprocess.Popen, str]:
    """`fiddlerc serve OUT --port 0 ...` and its base URL, once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fiddlerc", "serve", str(out), "--port", "0", *args],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if m := re.search(r"at (http://\S+/v1)", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


@pytest.fixture(scope="module")
def server(served):
    proc, url = start(served, "--api-key", "sk-test", "--served-model-name", "tiny")
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="sk-test", max_retries=0, timeout=120)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert health(server)["status"] == "ok"


def test_a_completion_is_the_greedy_text_streamed_or_not(client, model, server):
    n = safe_tokens(model, "hello there", 12)
    want = model.stream("hello there", n).text()
    got = client.completions.create(model="tiny", prompt="hello there", max_tokens=n, temperature=0)
    assert n < 2 or health(server)["decode_step_ms"]["1"] > 0  # the server's own timing of its steps
    assert got.choices[0].text == want and got.choices[0].finish_reason in ("stop", "length")
    assert (
        got.usage.completion_tokens <= n
        and got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    )
    chunks = list(
        client.completions.create(model="tiny", prompt="hello there", max_tokens=n, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_a_chat_answer_follows_the_chat_template_streamed_or_not_with_usage(client, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    want = model.stream(messages, 10).text()
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_logit_bias_is_added_to_the_logits_of_its_tokens(client, model):
    a, b = (model.tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB")

    def ask(bias):
        return client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0, logit_bias=bias)

    assert ask({str(a): 100}).choices[0].text == "AAAAA"  # A, every time
    assert ask({str(a): 99, str(b): 100}).choices[0].text == "BBBBB"  # the larger bias wins


def test_several_clients_at_once_each_get_what_they_would_alone(client, model):
    prompts = ["the quick brown fox", "fiddler", "a b c d e f", "mixture of experts", "zzz", "once upon a time"]
    n = {p: safe_tokens(model, p, 16) for p in prompts}
    prompts = [p for p in prompts if n[p]]
    want = {p: model.stream(p, n[p]).text() for p in prompts}
    got: dict[str, str] = {}

    def ask(p: str) -> None:
        if len(got) % 2:
            chunks = client.completions.create(model="tiny", prompt=p, max_tokens=n[p], temperature=0, stream=True)
            got[p] = "".join(c.choices[0].text for c in chunks)
        else:
            got[p] = client.completions.create(model="tiny", prompt=p, max_tokens=n[p], temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]  # more than the 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


def test_a_seeded_request_gives_the_same_text_whatever_runs_beside_it(client):
    ask = dict(model="tiny", prompt="tell me a story", max_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    alone = client.completions.create(**ask).choices[0].text
    busy = [threading.Thread(target=client.completions.create, kwargs=dict(ask, seed=None)) for _ in range(3)]
    for t in busy:
        t.start()
    beside = client.completions.create(**ask).choices[0].text
    for t in busy:
        t.join(120)
    assert beside == alone


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/completions", b"{not json", "not valid JSON"),
        (
            "/completions",
            json.dumps({"prompt": "x", "logprobs": 2, "echo": True}).encode(),
            "unsupported parameter(s): echo, logprobs",
        ),
        ("/completions", json.dumps({"prompt": "x", "n": 2}).encode(), "n must be 1"),
        ("/completions", json.dumps({"prompt": "x " * 600}).encode(), "this model's context is 1024 tokens"),
        (
            "/completions",
            json.dumps({"prompt": "x", "max_tokens": 10_000}).encode(),
            "exceed this model's context of 1024",
        ),
        (
            "/completions",
            json.dumps({"prompt": "x", "temperature": 5}).encode(),
            "temperature must be a number in [0, 2]",
        ),
        ("/completions", json.dumps({"prompt": ""}).encode(), "the prompt is empty"),
        (
            "/chat/completions",
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
            "message 0 is not",
        ),
    ],
)
def test_bad_requests_get_a_400_that_names_the_problem(server, path, body, message):
    status, reply = http("POST", server + path, body)
    assert status == 400, reply
    assert message in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"


def test_a_wrong_key_gets_a_401(server):
    status, reply = http("POST", server + "/completions", {"prompt": "x"}, key="nope")
    assert status == 401 and "API key" in reply["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="nope", max_retries=0).models.list()


def test_a_client_that_disconnects_stops_its_generation(server):
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(server)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    body = {"prompt": "go on", "max_tokens": 1000, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Authorization": "Bearer sk-test"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.readline().startswith(b"data: ")  # generating
    assert health(server)["running"] == 1
    conn.close()  # the client goes away mid-answer
    deadline = time.time() + 30
    while health(server)["running"] and time.time() < deadline:
        time.sleep(0.05)
    assert health(server)["running"] == 0


def test_sigterm_lets_the_requests_in_flight_finish_then_exits(served):
    proc, url = start(served)
    result = {}

    def ask():
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        result["r"] = c.completions.create(model="x", prompt="drain me", max_tokens=400, temperature=0)

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.time() + 30
    while time.time() < deadline and health(url)["running"] == 0:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.wait(timeout=60) == 0
    assert result["r"].choices[0].finish_reason in ("stop", "length") and result["r"].usage.completion_tokens > 0


def test_a_full_queue_gets_a_503_and_a_model_without_a_chat_template_a_400(served, tmp_path):
    import shutil

    import fiddlerc

    model = tmp_path / "model"
    shutil.copytree(fiddlerc.load(served, device="cpu").artifact.folder.path, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    fiddlerc.compile(model, tmp_path / "out", gpu_memory=0, context=64)
    proc, url = start(tmp_path / "out", "--queue", "0")  # no request may wait: each is refused
    try:
        status, reply = http(
            "POST", url + "/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, key=None
        )
        assert status == 400 and "no chat template" in reply["error"]["message"]
        status, reply = http("POST", url + "/completions", {"prompt": "x"}, key=None)
        assert status == 503 and "busy" in reply["error"]["message"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_readme_client_snippet_runs_as_written(server, capsys):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Serving (OpenAI-compatible)") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    assert 'base_url="http://127.0.0.1:8000/v1"' in code  # as a user runs it against `fiddlerc serve --port 8000`
    code = code.replace("http://127.0.0.1:8000/v1", server).replace('api_key="none"', 'api_key="sk-test"')
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_a_port_in_use_is_a_one_line_error(server, served):
    port = server.rsplit(":", 1)[1].split("/")[0]
    run = subprocess.run(
        [sys.executable, "-m", "fiddlerc", "serve", str(served), "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "is the port in use? Give another --port" in run.stderr.splitlines()[-1]

"""The OpenAI-compatible HTTP API over the engine (fiddlerc.serve.engine), on Starlette.

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with "stream": true,
`stream_options.include_usage` adds a last chunk with the counts), GET /v1/models, GET /health.
Parameters: max_tokens (chat: also max_completion_tokens), temperature, top_p, seed, stop, n (1 only),
logit_bias, stream, stream_options; a few that change nothing at their neutral value (presence_penalty 0,
frequency_penalty 0, user). Any other parameter gets a 400 that names it, as does a prompt over the
context, a chat request to a model without a chat template, malformed JSON, and a bad value. A full
queue gets a 503; a wrong or missing key (with --api-key) a 401. A client that disconnects stops its
generation. Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fiddlerc.errors import OptionError
from fiddlerc.model.tokenizer import chat_ids, check_conversation, has_chat_template, prompt_ids
from fiddlerc.serve.engine import Engine, Job, QueueFull, Sampling

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options", "logit_bias"}
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "user": None}  # accepted where they change nothing
CHAT = COMMON | {"messages", "max_completion_tokens"}
COMPLETIONS = COMMON | {"prompt"}
DEFAULT_MAX_TOKENS = {"chat": None, "text": 16}  # OpenAI's: chat up to the context, completions 16


class _Mailbox:
    """Events from the engine's thread to the requests' queues on the event loop, delivered in bunches: one
    wake-up of the loop for all the events of a decode step, not one per request (each wake-up takes the
    interpreter from the engine, and a core from the kernels' threads, on a 2-core machine)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, tuple]] = []
        self._scheduled = False

    def post(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: tuple) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if self._scheduled:
                return
            self._scheduled = True
        loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._scheduled = self._pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return JSONResponse(body, status_code=self.status)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


class Server:
    """The routes' state: the engine, the model's name, the key, the chat template."""

    def __init__(self, engine: Engine, name: str, api_key: str | None = None, chat_template: str | None = None):
        self.engine, self.name, self.api_key, self.chat_template = engine, name, api_key, chat_template
        self.created = int(time.time())
        self._mail = _Mailbox()

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ]
        return Starlette(routes=routes)

    # -- routes

    async def health(self, request: Request) -> Response:
        running, waiting = self.engine.load()
        steps = {str(n): round(ms, 2) for n, (_, ms) in self.engine.step_times().items()}
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting, "decode_step_ms": steps})

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "fiddlerc"}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(self, request: Request) -> Response:
        return await self._serve(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, "text")

    # -- the shared path

    def _denied(self, request: Request) -> Response | None:
        if self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}":
            return None
        return ApiError(
            401, "a missing or wrong API key: send Authorization: Bearer KEY", kind="authentication_error"
        ).response()

    async def _serve(self, request: Request, kind: str) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await self._body(request)
            job_args, stream, usage = self._parse(body, kind)
        except ApiError as e:
            return e.response()
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(**job_args, emit=lambda event: self._mail.post(loop, events, event))
        try:
            self.engine.submit(job)
        except QueueFull as e:
            return ApiError(503, f"the server is busy ({e}): try again later", kind="server_error").response()
        except RuntimeError as e:
            return ApiError(503, str(e), kind="server_error").response()
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            return StreamingResponse(self._sse(request, job, events, kind, rid, usage), media_type="text/event-stream")
        return await self._whole(request, job, events, kind, rid)

    async def _body(self, request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _parse(self, body: dict, kind: str) -> tuple[dict, bool, bool]:
        known = CHAT if kind == "chat" else COMPLETIONS
        unsupported = sorted(
            k for k in body if k not in known and (k not in NEUTRAL or body[k] not in (NEUTRAL[k], None))
        )
        if unsupported:
            raise ApiError(400, f"unsupported parameter(s): {', '.join(unsupported)}", unsupported[0])
        if body.get("n", 1) not in (1, None):
            raise ApiError(400, "n must be 1: this server generates one choice per request", "n")
        tok = self.engine.tokenizer
        try:
            if kind == "chat":
                messages = check_conversation(body.get("messages"))
                if not has_chat_template(tok, self.chat_template):
                    raise ApiError(
                        400,
                        "this model has no chat template: use /v1/completions, or start the server with --chat-template FILE",
                        "messages",
                    )
                ids = chat_ids(tok, messages, self.chat_template)
            else:
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                    prompt = prompt[0]
                if not isinstance(prompt, str):
                    raise ApiError(400, "prompt must be a string (one prompt per request)", "prompt")
                ids = prompt_ids(tok, prompt)
        except OptionError as e:
            raise ApiError(400, str(e), "messages" if kind == "chat" else "prompt") from None
        context = self.engine.context
        if len(ids) >= context:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this model's context is {context} tokens (prompt and answer together)",
                "messages" if kind == "chat" else "prompt",
            )
        room = context - len(ids)
        name = (
            "max_completion_tokens"
            if kind == "chat" and body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        max_tokens = _number(body, name, DEFAULT_MAX_TOKENS[kind] or room, 1, 2**31, integer=True)
        if max_tokens > room:
            raise ApiError(
                400,
                f"{name} {max_tokens} and the prompt's {len(ids)} tokens exceed this model's context of {context} tokens",
                name,
            )
        stop = body.get("stop")
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        temperature = float(_number(body, "temperature", 1.0, 0, 2))
        top_p = float(_number(body, "top_p", 1.0, 0, 1))
        if top_p == 0:  # nothing to sample from but the most likely token
            temperature, top_p = 0.0, 1.0
        sampling = Sampling(temperature, top_p, _number(body, "seed", None, -(2**63), 2**63 - 1, integer=True))
        stream = body.get("stream") or False
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise ApiError(400, "stream must be true or false, stream_options an object", "stream")
        job = {"prompt_ids": ids, "max_tokens": max_tokens, "sampling": sampling, "stop": stop,
               "logit_bias": self._logit_bias(body.get("logit_bias"))}  # fmt: skip
        return job, stream, bool(options.get("include_usage"))

    def _logit_bias(self, value) -> dict[int, float]:
        """OpenAI's logit_bias: {"token id": bias in [-100, 100]} (-100 bans a token, 100 forces it)."""
        if value is None:
            return {}
        vocab = self.engine.model.config.vocab_size
        try:
            bias = {int(k): float(v) for k, v in dict(value).items()}
        except (TypeError, ValueError):
            raise ApiError(400, "logit_bias must map token ids to numbers", "logit_bias") from None
        if any(not 0 <= k < vocab or not -100 <= v <= 100 for k, v in bias.items()):
            raise ApiError(400, f"logit_bias maps token ids in [0, {vocab}) to biases in [-100, 100]", "logit_bias")
        return bias

    def _usage(self, job: Job) -> dict:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
                "total_tokens": job.prompt_tokens + job.completion_tokens}  # fmt: skip

    async def _watch(self, request: Request, job: Job) -> None:
        """Cancel `job` when its client goes away (a request answered at the end: a streamed one is
        cancelled by Starlette, which stops its generator)."""
        while job.finish_reason is None:
            if await request.is_disconnected():
                job.cancel()
                return
            await asyncio.sleep(0.5)

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, kind: str, rid: str) -> Response:
        parts: list[str] = []
        watcher = asyncio.create_task(self._watch(request, job))
        try:
            while True:
                event = await events.get()
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    return ApiError(500, event[1], kind="server_error").response()
                else:
                    break
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            watcher.cancel()
        text = "".join(parts)
        choice = {"index": 0, "finish_reason": job.finish_reason}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        obj = "chat.completion" if kind == "chat" else "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                             "choices": [choice], "usage": self._usage(job)})  # fmt: skip

    async def _sse(self, request: Request, job: Job, events: asyncio.Queue, kind: str, rid: str, usage: bool):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        created = int(time.time())

        def chunk(choices: list, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def piece(text: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if role:
                    delta["role"] = "assistant"
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        try:
            if kind == "chat":
                yield chunk([piece("", None, role=True)])
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield chunk([piece(event[1], None)])
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    return
                else:
                    break
            yield chunk([piece(None, job.finish_reason)])
            if usage:
                yield chunk([], usage=self._usage(job))
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or the response was abandoned: stop generating
            if job.finish_reason is None:
                job.cancel()

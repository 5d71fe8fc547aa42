"""fiddlerc serve: an OpenAI-compatible HTTP server over a compiled model. The engine (engine.py) batches
concurrent requests at the step level; the app (app.py) is the HTTP API on Starlette, run by uvicorn
(`serve`)."""

from __future__ import annotations


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, api_key: str | None = None,
          chat_template: str | None = None, queue_size: int = 64, prefill_tokens: int = 512, ready=None) -> None:  # fmt: skip
    """Serve `model` (a CompiledModel) until SIGTERM or Ctrl-C, which let the requests in flight finish
    (a second Ctrl-C stops at once); `ready` (a callable) is called with the bound (host, port) once the
    server listens. The engine runs on this thread, which must be the main one (its kernels run faster
    there: fiddlerc.serve.engine), and uvicorn on another."""
    import signal
    import threading

    import uvicorn

    from fiddlerc.serve.app import Server
    from fiddlerc.serve.engine import Engine

    engine = Engine(model, queue_size=queue_size, prefill_tokens=prefill_tokens)
    app = Server(engine, name or model.artifact.folder.path.name, api_key, chat_template).app()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    if ready is not None:
        _on_start(server, ready)
    failed: list[BaseException] = []

    def http() -> None:
        try:
            server.run()
        except BaseException as e:  # the port in use, say: the engine stops and serve raises it
            failed.append(e)
        finally:
            engine.stop()  # once the HTTP side has drained, so has every request

    def on_signal(signum, frame) -> None:
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
            raise KeyboardInterrupt
        server.should_exit = True  # uvicorn stops accepting, waits for the responses in flight, then returns

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="fiddlerc-http", daemon=True)
    thread.start()
    try:
        engine.run()
    finally:
        server.should_exit = True
        thread.join(60)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed and not isinstance(failed[0], SystemExit):
        raise failed[0]
    if failed:  # uvicorn exits when it cannot bind, having logged why
        from fiddlerc.errors import OptionError

        raise OptionError(f"the server could not listen on {host}:{port}: is the port in use? Give another --port")


def _on_start(server, ready) -> None:
    """Call `ready(host, port)` once `server` listens (uvicorn's startup hook, wrapped)."""
    startup = server.startup

    async def started(sockets=None):
        await startup(sockets=sockets)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        ready(host, port)

    server.startup = started

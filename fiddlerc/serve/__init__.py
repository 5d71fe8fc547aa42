"""fiddlerc serve: an OpenAI-compatible HTTP server over a compiled model. The engine (engine.py) batches
concurrent requests at the step level on its own thread; the app (app.py) is the HTTP API on Starlette,
run by uvicorn (`serve`)."""

from __future__ import annotations


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, name: str | None = None, api_key: str | None = None,
          chat_template: str | None = None, queue_size: int = 64, ready=None) -> None:  # fmt: skip
    """Serve `model` (a CompiledModel) until SIGINT or SIGTERM, which drain the requests in flight; `ready`
    (a callable) is called with the bound (host, port) once the server listens."""
    import signal
    import threading

    import uvicorn

    from fiddlerc.serve.app import Server
    from fiddlerc.serve.engine import Engine

    engine = Engine(model, queue_size=queue_size)
    app = Server(engine, name or model.artifact.folder.path.name, api_key, chat_template).app()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    if ready is not None:
        _on_start(server, ready)
    # uvicorn drains on SIGTERM, then raises it again under the handler it found: a quiet one here, so that
    # the engine stops too and the process exits 0 (SIGINT: KeyboardInterrupt, which the CLI reports).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main else None
    try:
        server.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        engine.stop(timeout=60)


def _on_start(server, ready) -> None:
    """Call `ready(host, port)` once `server` listens (uvicorn's startup hook, wrapped)."""
    startup = server.startup

    async def started(sockets=None):
        await startup(sockets=sockets)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        ready(host, port)

    server.startup = started

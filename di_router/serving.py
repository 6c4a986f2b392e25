"""Running an ASGI app on Hypercorn with uvloop: shared by the router and the simulator."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

_run_loop: Callable[[Coroutine[Any, Any, None]], None]
try:  # uvloop is a hard dependency on Linux/macOS; fall back quietly elsewhere.
    import uvloop

    _run_loop = uvloop.run
except ImportError:  # pragma: no cover
    _run_loop = asyncio.run


def hypercorn_config(host: str, port: int, **overrides: object) -> Config:
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # A Logger instance is used as-is: records propagate to the root logging configuration.
    config.errorlog = logging.getLogger("hypercorn.error")
    # vLLM's uvicorn default, so clients see the same keep-alive as with vLLM. Also the bound on
    # how long Hypercorn holds a connection the client already closed (it closes it only when
    # this timer fires), so it must stay short or closed sockets pile up under churn.
    config.keep_alive_timeout = 5
    config.backlog = 2048
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def run(
    app: Any,
    config: Config,
    on_bound: Callable[[], None] | None = None,
    on_signal: Callable[[], None] | None = None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully (lifespan shutdown runs).

    On the signal the listener closes at once and `on_signal` runs (the router starts draining);
    connections still open get `config.graceful_timeout` to finish.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if on_signal is not None:
                on_signal()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping)
        if on_bound is not None:
            _call_when_bound(on_bound)
        await serve(app, config, shutdown_trigger=stop.wait)

    if loop_factory is None:
        _run_loop(main())
        return
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def _call_when_bound(callback: Callable[[], None]) -> None:
    """Hypercorn logs "Running on ..." once its sockets listen; that is when we are ready."""

    class _Bound(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage().startswith("Running on"):
                callback()
            return True

    logging.getLogger("hypercorn.error").addFilter(_Bound())

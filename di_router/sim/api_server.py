"""`python -m di_router.sim.api_server`: a drop-in for vLLM's `entrypoints.openai.api_server`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import prometheus_client

from di_router.serving import hypercorn_config, run
from di_router.sim.app import VLLM_VERSION, create_app
from di_router.sim.args import parse_settings
from di_router.sim.server import SimServer
from di_router.sim.settings import SimSettings

log = logging.getLogger("di_router.sim")


def serve(settings: SimSettings) -> None:
    role = settings.role
    kv = settings.kv_config
    detail = f", kv {kv.kv_ip}:{kv.kv_port}" if kv is not None and role != "baseline" else ""
    log.info(
        "simulated vLLM %s server for %s (%d slots%s)",
        role,
        settings.model_name,
        settings.max_num_seqs,
        detail,
    )

    tls = {}
    if settings.ssl_keyfile and settings.ssl_certfile:
        tls = {"keyfile": settings.ssl_keyfile, "certfile": settings.ssl_certfile}
    scheme = "https" if tls else "http"

    def ready() -> None:
        # vLLM's own ready line, which launch scripts and the tutorial wait for.
        print(
            f"INFO:     Uvicorn running on {scheme}://{settings.host}:{settings.port} "
            "(Press CTRL+C to quit)",
            flush=True,
        )

    app = create_app(settings)
    server: SimServer = app.extensions["sim"]

    def on_signal() -> None:
        if server.engine is None:  # still pairing, before HTTP: nothing to drain
            raise SystemExit(0)

    # Pairing happens in the startup hook, before Hypercorn binds; it may take forever.
    config = hypercorn_config(settings.host, settings.port, startup_timeout=None, **tls)
    run(app, config, on_bound=ready, on_signal=on_signal)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # as vLLM
    log.info("vLLM API server version %s", VLLM_VERSION)
    settings, warnings = parse_settings(argv)
    for warning in warnings:
        log.warning(warning)
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`neuron-proxy-server`: a drop-in for the Neuron fork's router, with its flags and more.

Every flag can also be set as an environment variable `DI_ROUTER_<FLAG>` (e.g.
`DI_ROUTER_DECODE_IP`); flags win over the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from di_router import serving
from di_router.router.app import CONFIG_ENV, create_app
from di_router.router.config import RouterConfig
from di_router.router.logs import configure_logging

log = logging.getLogger("di_router.router")
_DEFAULTS = RouterConfig()


def _env(name: str, default: object) -> object:
    return os.environ.get(f"DI_ROUTER_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuron-proxy-server",
        description="Disaggregated-inference router: one OpenAI-compatible endpoint in front of "
        "a prefill and a decode vLLM server. Each flag can also be set as DI_ROUTER_<FLAG>.",
    )

    def add(flag: str, default: object, kind: type, help_text: str, **kw: object) -> None:
        name = flag.removeprefix("--").replace("-", "_")
        p.add_argument(flag, type=kind, default=_env(name, default), help=help_text, **kw)

    add("--prefill-ip", "localhost", str, "prefill (KV producer) server host")
    add("--prefill-port", 8100, int, "prefill server port")
    add("--decode-ip", "localhost", str, "decode (KV consumer) server host")
    add("--decode-port", 8200, int, "decode server port")
    add("--host", _DEFAULTS.host, str, "address to listen on (0.0.0.0 for all interfaces)")
    add("--port", _DEFAULTS.port, int, "port to listen on")
    add("--workers", _DEFAULTS.workers, int, "router processes (metrics are summed over them)")
    add(
        "--connect-timeout",
        _DEFAULTS.connect_timeout_s,
        float,
        "seconds to connect to a backend; a dead backend answers 502 within it",
    )
    add(
        "--prefill-timeout",
        _DEFAULTS.prefill_timeout_s,
        float,
        "seconds the prefill leg may take to produce the first token",
    )
    add(
        "--decode-timeout",
        _DEFAULTS.decode_timeout_s,
        float,
        "longest silence on the decode leg (the whole wait when not streaming)",
    )
    add("--max-connections", _DEFAULTS.max_connections, int, "connection pool size per backend")
    add("--max-body-bytes", _DEFAULTS.max_body_bytes, int, "largest request body accepted (413)")
    add(
        "--health-interval",
        _DEFAULTS.health_interval_s,
        float,
        "seconds between backend /health polls",
    )
    add(
        "--log-level",
        _DEFAULTS.log_level,
        str,
        "debug, info, warning or error",
        choices=["debug", "info", "warning", "error"],
    )
    add(
        "--log-format",
        _DEFAULTS.log_format,
        str,
        "access log lines as text or JSON",
        choices=["text", "json"],
    )
    return p


def _url(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port}"


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        prefill_urls=[_url(args.prefill_ip, args.prefill_port)],
        decode_urls=[_url(args.decode_ip, args.decode_port)],
        host=args.host,
        port=args.port,
        workers=args.workers,
        connect_timeout_s=args.connect_timeout,
        prefill_timeout_s=args.prefill_timeout,
        decode_timeout_s=args.decode_timeout,
        max_connections=args.max_connections,
        max_body_bytes=args.max_body_bytes,
        health_interval_s=args.health_interval,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def ready_line(config: RouterConfig) -> str:
    return (
        f"di-router ready on {_url(config.host, config.port)} "
        f"(prefill {', '.join(config.prefill_urls)}; decode {', '.join(config.decode_urls)})"
    )


def serve(config: RouterConfig) -> int:
    bind_config = serving.hypercorn_config(config.host, config.port)
    # The ready line goes to stderr with the logs: stdout carries only JSON access lines.
    if config.workers == 1:
        serving.run(
            create_app(config),
            bind_config,
            on_bound=lambda: print(ready_line(config), file=sys.stderr, flush=True),
        )
        return 0
    from hypercorn.run import run as run_workers

    own_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="di-router-metrics-")
    )
    for stale in Path(metrics_dir).glob("*.db"):  # a previous run's values would carry over
        stale.unlink()
    os.environ[CONFIG_ENV] = config.model_dump_json()
    bind_config.application_path = "di_router.router.app:create_app_from_env()"
    bind_config.workers = config.workers
    bind_config.worker_class = "uvloop"
    print(ready_line(config) + f" with {config.workers} workers", file=sys.stderr, flush=True)
    try:
        return run_workers(bind_config)
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        parser.error(f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
    configure_logging(config.log_level, config.log_format)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())

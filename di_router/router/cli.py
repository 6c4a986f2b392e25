"""`neuron-proxy-server`: a drop-in for the Neuron fork's router, with its flags and more.

Every flag can also be set as an environment variable `DI_ROUTER_<FLAG>` (e.g.
`DI_ROUTER_DECODE_IP`) or in a TOML file (`--config FILE` or `DI_ROUTER_CONFIG`); flags win over
the environment, which wins over the file (`di_router.settings`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError

from di_router import serving, settings
from di_router.router.admission import descriptor_budget
from di_router.router.app import CONFIG_ENV, create_app
from di_router.router.config import RouterConfig
from di_router.router.listener import capped_loop_factory
from di_router.router.logs import configure_logging

log = logging.getLogger("di_router.router")
_DEFAULTS = RouterConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuron-proxy-server",
        description="Disaggregated-inference router: one OpenAI-compatible endpoint in front of "
        "a prefill and a decode vLLM server. Each flag can also be set as DI_ROUTER_<FLAG>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(
        flag: str,
        default: object,
        kind: type,
        help_text: str,
        choices: Sequence[str] | None = None,
    ) -> None:
        p.add_argument(flag, type=kind, default=default, help=help_text, choices=choices)

    add("--prefill-ip", "localhost", str, "prefill (KV producer) server host")
    add("--prefill-port", 8100, int, "prefill server port")
    add("--decode-ip", "localhost", str, "decode (KV consumer) server host")
    add("--decode-port", 8200, int, "decode server port")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of settings named like the flags (prefill = [...], prefill-timeout = 60); "
        "flags and DI_ROUTER_* variables win over it (env DI_ROUTER_CONFIG)",
    )
    p.add_argument(
        "--prefill",
        action="append",
        metavar="URL",
        help="a prefill server (repeatable; the i-th pairs with the i-th --decode); "
        "replaces --prefill-ip/--prefill-port",
    )
    p.add_argument(
        "--decode",
        action="append",
        metavar="URL",
        help="a decode server (repeatable); replaces --decode-ip/--decode-port",
    )
    add(
        "--etcd",
        None,
        str,
        "HOST:PORT of etcd: backends come and go with its /workers/ registry (Neuron 2.26); "
        "pairing becomes any-to-any and each leg names its peer in its request id",
    )
    add(
        "--kv-protocol",
        _DEFAULTS.kv_protocol,
        str,
        "neuron: Neuron's vLLM fork (both legs at once); nixl: vLLM V1 NixlConnector "
        "(prefill first, kv_transfer_params to decode)",
        choices=["neuron", "nixl"],
    )
    add(
        "--pairing",
        None,
        str,
        "static: the i-th prefill with the i-th decode (Neuron 2.24 pairs them at startup); "
        "any: each role picked on its own (default: static for neuron, any for nixl)",
        choices=["static", "any"],
    )
    add(
        "--selection",
        _DEFAULTS.selection,
        str,
        "least_outstanding (power of two choices) or round_robin",
        choices=["least_outstanding", "round_robin"],
    )
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
    add(
        "--body-timeout",
        _DEFAULTS.body_timeout_s,
        float,
        "seconds a client may take to send its request body (408 after)",
    )
    add(
        "--drain-timeout",
        _DEFAULTS.drain_timeout_s,
        float,
        "on SIGTERM/SIGINT, seconds in-flight requests may finish before they are ended",
    )
    add(
        "--settle-timeout",
        _DEFAULTS.settle_timeout_s,
        float,
        "seconds the router keeps freeing the slots of a request that ended badly",
    )
    add("--max-connections", _DEFAULTS.max_connections, int, "connection pool size per backend")
    add("--max-body-bytes", _DEFAULTS.max_body_bytes, int, "largest request body accepted (413)")
    add("--max-event-bytes", _DEFAULTS.max_event_bytes, int, "largest SSE event from a backend")
    add(
        "--max-response-bytes",
        _DEFAULTS.max_response_bytes,
        int,
        "largest non-streamed answer from a backend",
    )
    add(
        "--max-concurrent-requests",
        _DEFAULTS.max_concurrent_requests,
        int,
        "completions served at once (0: what the descriptor limit allows, about a quarter "
        "of it); more wait in a queue",
    )
    add(
        "--max-queued-requests",
        _DEFAULTS.max_queued_requests,
        int,
        "requests that may wait for a place; beyond it the answer is 429",
    )
    add(
        "--queue-timeout",
        _DEFAULTS.queue_timeout_s,
        float,
        "seconds a queued request waits for a place before its 429",
    )
    p.add_argument(
        "--api-key",
        action="append",
        default=None,
        help="key clients must send as 'Authorization: Bearer KEY' on /v1 routes; repeat for "
        "several (env DI_ROUTER_API_KEY, comma-separated)",
    )
    add(
        "--backend-api-key",
        os.environ.get("OPENAI_API_KEY"),
        str,
        "key sent to the backends for clients the router authenticated (default: "
        "OPENAI_API_KEY); never sent for unauthenticated clients",
    )
    p.add_argument(
        "--protect-metrics",
        action="store_true",
        help="require a client key on /metrics too",
    )
    p.add_argument(
        "--verbose-errors",
        action="store_true",
        help="put backend URLs and exception details in client errors (development only)",
    )
    add(
        "--health-interval",
        _DEFAULTS.health_interval_s,
        float,
        "seconds between backend /health polls",
    )
    add("--ssl-certfile", None, str, "certificate for an HTTPS listener (with --ssl-keyfile)")
    add("--ssl-keyfile", None, str, "private key for an HTTPS listener")
    add("--ssl-ca-file", None, str, "CA bundle to check https:// backends against")
    add("--health-timeout", _DEFAULTS.health_timeout_s, float, "seconds a health check may take")
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


def _url(host: str, port: int, scheme: str = "http") -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{host}:{port}"


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        prefill_urls=args.prefill
        or ([] if args.etcd else [_url(args.prefill_ip, args.prefill_port)]),
        decode_urls=args.decode or ([] if args.etcd else [_url(args.decode_ip, args.decode_port)]),
        etcd=args.etcd,
        kv_protocol=args.kv_protocol,
        pairing=args.pairing,
        selection=args.selection,
        host=args.host,
        port=args.port,
        workers=args.workers,
        connect_timeout_s=args.connect_timeout,
        prefill_timeout_s=args.prefill_timeout,
        decode_timeout_s=args.decode_timeout,
        body_timeout_s=args.body_timeout,
        drain_timeout_s=args.drain_timeout,
        settle_timeout_s=args.settle_timeout,
        max_connections=args.max_connections,
        max_body_bytes=args.max_body_bytes,
        max_event_bytes=args.max_event_bytes,
        max_response_bytes=args.max_response_bytes,
        max_concurrent_requests=args.max_concurrent_requests,
        max_queued_requests=args.max_queued_requests,
        queue_timeout_s=args.queue_timeout,
        api_keys=args.api_key or [],
        backend_api_key=args.backend_api_key or None,
        protect_metrics=args.protect_metrics,
        verbose_errors=args.verbose_errors,
        health_interval_s=args.health_interval,
        health_timeout_s=args.health_timeout,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_file=args.ssl_ca_file,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def raise_descriptor_limit() -> int:
    """Soft descriptor limit up to the hard one, as vLLM does: each stream holds three."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


def return_large_buffers() -> None:
    """Buffers of 1 MiB and more (request bodies) are mapped and unmapped by glibc on their
    own; its sliding threshold otherwise moves them into the heap after the first burst of
    large bodies, where they stay resident long after the requests ended."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def ready_line(config: RouterConfig) -> str:
    scheme = "https" if config.ssl_certfile else "http"
    return (
        f"di-router ready on {_url(config.host, config.port, scheme)} "
        f"(prefill {', '.join(config.prefill_urls)}; decode {', '.join(config.decode_urls)})"
    )


def open_descriptors() -> int:
    """Descriptors open now (0 where /proc is missing): the budget is what the limit leaves."""
    with contextlib.suppress(OSError):
        return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own
    return 0


def serve(config: RouterConfig) -> int:
    budget = descriptor_budget(
        raise_descriptor_limit(), open_descriptors(), config.max_concurrent_requests
    )
    log.info(
        "serving at most %d requests and %d connections at once (%s)",
        budget.requests, budget.connections, budget.reason,
    )  # fmt: skip
    if budget.connections < budget.requests:
        log.warning("the descriptor limit cannot serve that many requests: raise `ulimit -n`")
    config = config.model_copy(update={"max_concurrent_requests": budget.requests})
    return_large_buffers()
    # Hypercorn's own grace outlasts the drain, which ends what is left itself.
    tls = {}
    if config.ssl_certfile and config.ssl_keyfile:
        tls = {"certfile": config.ssl_certfile, "keyfile": config.ssl_keyfile}
    bind_config = serving.hypercorn_config(
        config.host, config.port, graceful_timeout=config.drain_timeout_s + 5, **tls
    )
    # The ready line goes to stderr with the logs: stdout carries only JSON access lines.
    if config.workers == 1:
        app = create_app(config)
        serving.run(
            app,
            bind_config,
            on_bound=lambda: print(ready_line(config), file=sys.stderr, flush=True),
            on_signal=app.begin_drain,
            loop_factory=capped_loop_factory(budget.connections),
        )
        return 0
    # Hypercorn's workers run their own loops: only the request cap applies there.
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


def parse_config(
    argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ
) -> RouterConfig:
    """The router's settings from flags, `DI_ROUTER_*` variables and the config file. Raises
    SettingsError for a value that does not fit and ValueError for settings that do not go
    together (the message names the setting either way)."""
    args = settings.parse_args(build_parser(), argv, settings.ROUTER_PREFIX, environ)
    try:
        return config_from_args(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ValueError(f"{where}: {message}" if where else message) from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ValueError as exc:  # SettingsError included
        build_parser().error(str(exc))
    configure_logging(config.log_level, config.log_format)
    return serve(config)


if __name__ == "__main__":
    sys.exit(main())

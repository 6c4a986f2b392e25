"""`di-router demo`: the whole DI stack on the simulator in one command.

Prefill on 8100, decode on 8200 and the router on 8000, as in the Neuron tutorial, through the
same supervisor as `di-router up --engine sim`.
"""

from __future__ import annotations

import argparse
import shlex

from di_router.launcher import up_cmd
from di_router.launcher.settings import LaunchError, resolve
from di_router.sim.profiles import DEFAULT_PROFILE, PROFILES

DEMO_MODEL = "llama-3.3-70b"


def curl_example(port: int, model: str) -> str:
    body = (
        f'{{"model": "{model}", "prompt": ["a tornado is a"], "max_tokens": 10, '
        '"temperature": 0, "stream": true}'
    )
    return (
        f"curl -sN http://127.0.0.1:{port}/v1/completions "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run simulated prefill + decode servers and the router (Ctrl-C stops all)",
        description="Start a simulated prefill (8100) and decode (8200) server and the DI "
        "router (8000) on this machine; no Trainium needed.",
    )
    p.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=DEFAULT_PROFILE,
        help="simulator timing profile",
    )
    p.add_argument("--port", type=int, default=8000, help="router port")
    p.add_argument("--prefill-port", type=int, default=8100)
    p.add_argument("--decode-port", type=int, default=8200)
    p.add_argument("--kv-port", type=int, default=14579, help="prefill's KV side-channel port")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    up_args = up_cmd.build_parser().parse_args(
        [
            "--engine",
            "sim",
            "--topology",
            "single-instance",
            "--model-path",
            DEMO_MODEL,
            "--sim-profile",
            args.profile,
            "--router-port",
            str(args.port),
            "--prefill-port",
            str(args.prefill_port),
            "--decode-port",
            str(args.decode_port),
            "--kv-port",
            str(args.kv_port),
        ]
    )

    def ready() -> None:
        print(
            f"\nDI demo ready on http://127.0.0.1:{args.port} (profile {args.profile}). "
            "Try:\n  " + curl_example(args.port, DEMO_MODEL) + "\nCtrl-C stops everything.\n",
            flush=True,
        )

    try:
        return up_cmd.up(up_args, resolve(up_args), on_ready=ready)
    except LaunchError as exc:
        print(f"di-router demo: error: {exc}")
        return 2

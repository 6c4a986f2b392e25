"""`di-router`: one umbrella command whose subcommands live next to the part they drive."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> module exposing `add_parser(subparsers)`; the parser sets `func(args) -> int`.
SUBCOMMANDS: dict[str, str] = {
    "sim": "di_router.sim.cli",
    "demo": "di_router.demo",
    "compile": "di_router.launcher.compile_cmd",
    "serve": "di_router.launcher.serve_cmd",
    "up": "di_router.launcher.up_cmd",
    "doctor": "di_router.launcher.doctor",
    "bench": "di_router.bench.cli",
    "plan": "di_router.plan.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="di-router",
        description="Disaggregated inference (prefill/decode) for vLLM on AWS Trainium.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Subcommands that wrap another program (e.g. `sim`) take its flags after their own.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough_ok", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.passthrough = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

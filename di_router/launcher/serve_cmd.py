"""`di-router serve`: one prefill, decode or baseline server, exec'd so signals reach it."""

from __future__ import annotations

import argparse
import os

from di_router.launcher.ports import ALL_INTERFACES, ensure_ports_free
from di_router.launcher.server_plan import ROLES, plan_server
from di_router.launcher.settings import Settings, add_options, run
from di_router.launcher.shell import render_script

SERVE_OPTIONS = (
    "model_path",
    "compiled_model_path",
    "tp_degree",
    "batch_size",
    "seq_len",
    "topology",
    "engine",
    "prefill_ip",
    "decode_ip",
    "prefill_port",
    "decode_port",
    "baseline_port",
    "kv_port",
    "bootstrap_port",
    "host",
    "prefill_cores",
    "decode_cores",
    "instance_cores",
    "sim_profile",
)


def serve(args: argparse.Namespace, settings: Settings) -> int:
    plan = plan_server(args.role, settings)
    if args.dry_run:
        comment = f"di-router serve {args.role} ({settings.topology}, engine {settings.engine})"
        print(render_script(plan.argv, plan.env, comment), end="")
        return 0
    ensure_ports_free(plan.listen_ports, settings.host or ALL_INTERFACES)
    os.execvpe(plan.argv[0], plan.argv, {**os.environ, **plan.env})


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start a prefill, decode or baseline server",
        description="Build the environment, KVTransferConfig and argv of one server and exec it.",
    )
    parser.add_argument("role", choices=ROLES)
    add_options(parser, SERVE_OPTIONS)
    parser.add_argument(
        "--dry-run", action="store_true", help="print a shell script instead of starting it"
    )
    parser.set_defaults(func=run("serve", serve))

"""`di-router up`'s router options: every `neuron-proxy-server` flag as `--router-<flag>`.

They are generated from the router's own parser, so `up` offers exactly the router's options
with its help and never falls behind it. What the launched layout decides is left out: the
backends (`--prefill*`, `--decode*`, `--etcd`) and the listen address (`--router-host` and
`--router-port` are launcher settings, so they also come from the environment and `--config`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pydantic import ValidationError

from di_router.launcher.settings import LaunchError
from di_router.router import cli as router_cli

PREFIX = "--router-"
DEST_PREFIX = "router_flag_"
FROM_LAYOUT = frozenset(
    {"--prefill", "--decode", "--prefill-ip", "--prefill-port", "--decode-ip", "--decode-port"}
    | {"--etcd", "--host", "--port", "-h", "--help"}
)


def _router_actions() -> list[argparse.Action]:
    return [
        action
        for action in router_cli.build_parser()._actions
        if action.option_strings and not FROM_LAYOUT.intersection(action.option_strings)
    ]


def add_router_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "router options",
        "each neuron-proxy-server flag, prefixed with --router- (defaults: "
        "`neuron-proxy-server --help`); e.g. --router-workers 4 --router-log-format json",
    )
    for action in _router_actions():
        flag = PREFIX + action.option_strings[0].removeprefix("--")
        dest = DEST_PREFIX + action.dest
        if action.nargs == 0:
            group.add_argument(flag, dest=dest, action="store_true", help=action.help)
        else:
            group.add_argument(
                flag,
                dest=dest,
                action="append" if isinstance(action, argparse._AppendAction) else "store",
                type=action.type or str,
                choices=action.choices,
                metavar=action.metavar or action.dest.upper(),
                help=action.help,
            )


def router_flags(args: argparse.Namespace) -> list[str]:
    """The router flags given to `up`, unprefixed, in the router's own order."""
    flags: list[str] = []
    for action in _router_actions():
        value = getattr(args, DEST_PREFIX + action.dest, None)
        flag = action.option_strings[0]
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                flags += [flag, str(item)]
    return flags


def check_router_argv(argv: Sequence[str]) -> None:
    """Validate the router's command line as the router will, before anything is started."""
    parser = router_cli.build_parser()
    try:
        router_cli.config_from_args(parser.parse_args(list(argv)))
    except ValidationError as exc:
        message = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise LaunchError(f"router options (--router-<flag>): {message}") from None

"""`di-router up`'s router options: every `neuron-proxy-server` flag as `--router-<flag>`.

They are generated from the router's own parser, so `up` offers exactly the router's options
with its help and never falls behind it. What the launched layout decides is left out: the
backends (`--prefill*`, `--decode*`, `--etcd`), the listen address (`--router-host` and
`--router-port` are launcher settings, so they also come from the environment and `--config`) and
the router's `--config` (`up` writes that file itself: `router_config.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from di_router.launcher.settings import LaunchError
from di_router.router import cli as router_cli

PREFIX = "--router-"
DEST_PREFIX = "router_flag_"
FROM_LAYOUT = frozenset(
    {"--prefill", "--decode", "--prefill-ip", "--prefill-port", "--decode-ip", "--decode-port"}
    | {"--etcd", "--host", "--port", "--config", "-h", "--help"}
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


def router_options(args: argparse.Namespace) -> dict[str, object]:
    """The router options given to `up`, by the router's flag name (`decode-timeout`), typed."""
    options: dict[str, object] = {}
    for action in _router_actions():
        value = getattr(args, DEST_PREFIX + action.dest, None)
        if value is not None and value is not False:
            options[action.option_strings[0].removeprefix("--")] = value
    return options


def check_router_argv(argv: Sequence[str]) -> None:
    """Validate the router's command line (and the config file it names) as the router will,
    in this environment, before anything is started."""
    try:
        router_cli.parse_config(list(argv))
    except ValueError as exc:
        raise LaunchError(f"router options (--router-<flag>): {exc}") from None

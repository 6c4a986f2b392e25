"""The router's config file for the layout `di-router up` launches.

`up` writes the router's settings (listen address, the pairs in pairing order, every
`--router-<flag>`) to one TOML file and starts the router with `--config FILE`, so the file is
the whole router side of the layout: `neuron-proxy-server --config FILE` serves the same pairs
from any host that reaches them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

from di_router.launcher.ports import ALL_INTERFACES
from di_router.launcher.server_plan import LOOPBACK, peer_ips, server_port
from di_router.launcher.settings import LaunchError, Settings

RouterTable = dict[str, object]
HEADER = "# neuron-proxy-server --config FILE (written by `di-router up`)\n"


def router_host(settings: Settings) -> str:
    """127.0.0.1 when everything is on this host; all interfaces when other hosts (the decode
    host's clients, a load balancer) must reach it."""
    if settings.router_host is not None:
        return settings.router_host
    return LOOPBACK if settings.single_instance else ALL_INTERFACES


def backend_urls(settings: Settings, pair: int) -> tuple[str, str]:
    """(prefill URL, decode URL) of pair `pair`, as the router reaches them."""
    prefill_ip, decode_ip = (LOOPBACK, LOOPBACK) if settings.single_instance else peer_ips(settings)
    return (
        f"http://{prefill_ip}:{server_port('prefill', settings, pair)}",
        f"http://{decode_ip}:{server_port('decode', settings, pair)}",
    )


def router_table(settings: Settings, options: Mapping[str, object]) -> RouterTable:
    """The router's settings by flag name: where it listens, the i-th prefill with the i-th
    decode (the servers' KV pairing), then the router options given to `up`."""
    pairs = [backend_urls(settings, pair) for pair in range(settings.pairs)]
    return {
        "host": router_host(settings),
        "port": settings.router_port,
        "prefill": [prefill for prefill, _ in pairs],
        "decode": [decode for _, decode in pairs],
        **options,
    }


def toml(table: RouterTable) -> str:
    """TOML for a flat table of strings, numbers, switches and lists of strings (JSON's string
    escapes are TOML's)."""

    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, list):
            return "[" + ", ".join(value(element) for element in item) + "]"
        if isinstance(item, int | float):
            return repr(item)
        return json.dumps(str(item))

    return "".join(f"{key} = {value(item)}\n" for key, item in table.items())


def write_router_config(table: RouterTable, path: str | None) -> Path:
    """Write the file; by default a new one under the temp directory, kept after `up` ends. A
    file `up` did not write is never overwritten (it may be a hand-written router config)."""
    if path is None:
        target = Path(tempfile.mkdtemp(prefix="di-router-up-")) / "router.toml"
    else:
        target = Path(path)
    try:
        if target.exists() and not target.read_text().startswith(HEADER):
            raise LaunchError(
                f"--router-config-file {target}: the file exists and `di-router up` did not "
                "write it; name a new file (up writes the router's config itself)"
            )
        target.write_text(HEADER + toml(table))
    except OSError as exc:
        raise LaunchError(f"--router-config-file {target}: cannot write it ({exc})") from None
    return target

"""Launcher settings from one table, so flags, `DI_LAUNCH_*` variables and `--config` agree.

Precedence is flags > environment > config file > defaults, layered by `di_router.settings` as
for the router and the simulator. Every command resolves the whole table, so one config file (or
one set of variables) serves `compile`, `serve`, `up` and `doctor`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from di_router.neuron_cores import TRN2_LOGICAL_CORES
from di_router.settings import LAUNCH_PREFIX, Field, SettingsError, env_name, layer, read_file

SINGLE_INSTANCE = "single-instance"
MULTI_INSTANCE = "multi-instance"


class LaunchError(Exception):
    """A setting the user has to change; the message names the flag and the fix."""


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return env_name(LAUNCH_PREFIX, self.name)

    @property
    def field(self) -> Field:
        return Field(self.name, self.type, self.choices)


OPTIONS: dict[str, Option] = {
    opt.name: opt
    for opt in (
        Option("model_path", "Hugging Face checkpoint folder (vLLM --model)"),
        Option(
            "compiled_model_path",
            "compiled model folder (NEURON_COMPILED_ARTIFACTS); "
            "default di_traced_model_tp<N>_b<B>/",
        ),
        Option(
            "tp_degree",
            "tensor-parallel degree; default half the instance's cores for single-instance, "
            "all of them for multi-instance",
            int,
        ),
        Option("batch_size", "sequences per server (vLLM --max-num-seqs)", int, 4),
        Option("seq_len", "compiled sequence length (vLLM --max-model-len)", int, 8192),
        Option(
            "topology",
            "single-instance: prefill and decode share one trn2.48xlarge; "
            "multi-instance: one host each",
            str,
            SINGLE_INSTANCE,
            (SINGLE_INSTANCE, MULTI_INSTANCE),
        ),
        Option(
            "pairs",
            "prefill/decode pairs on this instance (single-instance); pair i uses each port + i",
            int,
            1,
        ),
        Option("engine", "vllm on Trainium, or the simulator", str, "vllm", ("vllm", "sim")),
        Option("prefill_ip", "prefill host IP (kv_ip, NEURON_SEND_IP); 127.0.0.1 single-instance"),
        Option("decode_ip", "decode host IP (NEURON_RECV_IP); 127.0.0.1 single-instance"),
        Option("prefill_port", "prefill server HTTP port", int, 8100),
        Option("decode_port", "decode server HTTP port", int, 8200),
        Option("baseline_port", "baseline (non-DI) server HTTP port", int, 8000),
        Option("router_port", "router HTTP port", int, 8000),
        Option(
            "router_host",
            "address the router listens on; default 127.0.0.1 single-instance, 0.0.0.0 "
            "multi-instance (the client and other hosts must reach it)",
        ),
        Option(
            "router_config_file",
            "where `up` writes the router's TOML config for the layout and starts it with "
            "--config FILE (reusable: neuron-proxy-server --config FILE); default a new file "
            "in the temp directory",
        ),
        Option("kv_port", "KV signal-plane port (kv_port); default vLLM's 14579", int),
        Option(
            "bootstrap_port",
            "Neuron runtime send/recv bootstrap port (NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT)",
            int,
            45645,
        ),
        Option("host", "address the servers bind (vLLM --host); default all interfaces"),
        Option("prefill_cores", "prefill NEURON_RT_VISIBLE_CORES, e.g. 0-31; default derived"),
        Option("decode_cores", "decode NEURON_RT_VISIBLE_CORES, e.g. 32-63; default derived"),
        Option(
            "instance_cores",
            "logical NeuronCores per instance (64 on trn2.48xlarge at LNC=2)",
            int,
            TRN2_LOGICAL_CORES,
        ),
        Option("sim_profile", "simulator timing profile (engine sim only), e.g. instant"),
        Option(
            "ready_timeout",
            "seconds to wait for each server's /health; default 60 for sim, 1800 for vllm",
            float,
        ),
        Option(
            "kv_lock_file",
            "the Neuron runtime's KV-store lock file",
            str,
            "/tmp/nrt_kv_store_server.lock",
        ),
    )
}


@dataclass(frozen=True)
class Settings:
    """Resolved settings; `tp_degree` and `compiled_model_path` are always filled in."""

    model_path: str | None
    compiled_model_path: str
    tp_degree: int
    batch_size: int
    seq_len: int
    topology: str
    pairs: int
    engine: str
    prefill_ip: str | None
    decode_ip: str | None
    prefill_port: int
    decode_port: int
    baseline_port: int
    router_port: int
    router_host: str | None
    router_config_file: str | None
    kv_port: int | None
    bootstrap_port: int
    host: str | None
    prefill_cores: str | None
    decode_cores: str | None
    instance_cores: int
    sim_profile: str | None
    ready_timeout: float | None
    kv_lock_file: str

    @property
    def single_instance(self) -> bool:
        return self.topology == SINGLE_INSTANCE


def servers_per_instance(topology: str, pairs: int = 1) -> int:
    return 2 * pairs if topology == SINGLE_INSTANCE else 1


def compiled_model_dir(tp_degree: int, batch_size: int) -> str:
    """The tutorial's naming convention, shared by `compile` and `serve` so they meet."""
    return f"di_traced_model_tp{tp_degree}_b{batch_size}/"


def add_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add `--config` and the named options; defaults stay None so lower layers can fill them."""
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML file of settings (keys as flag names); env {env_name(LAUNCH_PREFIX, 'config')}",
    )
    for name in names:
        opt = OPTIONS[name]
        default = "" if opt.default is None else f"; default {opt.default}"
        parser.add_argument(
            opt.flag,
            dest=name,
            type=opt.type,
            choices=opt.choices or None,
            default=None,
            help=f"{opt.help} (env {opt.env_var}{default})",
        )


def resolve(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Settings:
    """Layer flags over `DI_LAUNCH_*` variables over the config file over defaults."""
    fields = {name: opt.field for name, opt in OPTIONS.items()}
    config_path = getattr(args, "config", None) or environ.get(env_name(LAUNCH_PREFIX, "config"))
    try:
        config = read_file(config_path, fields) if config_path else {}
        flags = {name: getattr(args, name, None) for name in OPTIONS}
        given = layer(fields, LAUNCH_PREFIX, environ, config, str(config_path), flags)
    except SettingsError as exc:
        raise LaunchError(str(exc)) from None
    values: dict[str, Any] = {name: given.get(name, opt.default) for name, opt in OPTIONS.items()}
    if values["tp_degree"] is None:
        per_instance = servers_per_instance(values["topology"], values["pairs"])
        values["tp_degree"] = max(1, values["instance_cores"] // per_instance)
    if values["compiled_model_path"] is None:
        values["compiled_model_path"] = compiled_model_dir(
            values["tp_degree"], values["batch_size"]
        )
    settings = Settings(**values)
    _check_values(settings)
    return settings


def _check_values(settings: Settings) -> None:
    """Checks of single values; how they combine (cores, roles) is the topology's job."""
    for name in ("tp_degree", "batch_size", "seq_len", "instance_cores", "pairs"):
        if getattr(settings, name) < 1:
            raise LaunchError(f"{OPTIONS[name].flag} {getattr(settings, name)}: must be at least 1")
    for name in ("prefill_port", "decode_port", "baseline_port", "router_port", "kv_port"):
        port = getattr(settings, name)
        if port is not None and not 0 < port < 65536:
            raise LaunchError(f"{OPTIONS[name].flag} {port}: not a TCP port; use 1-65535")
    for name in ("prefill_ip", "decode_ip"):
        ip = getattr(settings, name)
        if ip is None:
            continue
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise LaunchError(
                f"{OPTIONS[name].flag} {ip!r}: not an IP address; on that host run "
                "`hostname -i`, or use 127.0.0.1 for single-instance"
            ) from None
    if settings.pairs > 1 and not settings.single_instance:
        raise LaunchError(
            f"--pairs {settings.pairs} applies to single-instance; multi-instance runs one "
            "server per host: start each pair's servers on their hosts (docs/launcher.md)"
        )
    if settings.sim_profile is not None and settings.engine != "sim":
        raise LaunchError("--sim-profile only applies with --engine sim")


def run(
    command: str, body: Callable[[argparse.Namespace, Settings], int]
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so a LaunchError becomes a one-line message and exit status 2."""

    def func(args: argparse.Namespace) -> int:
        try:
            return body(args, resolve(args))
        except LaunchError as exc:
            print(f"di-router {command}: error: {exc}", file=sys.stderr)
            return 2

    return func

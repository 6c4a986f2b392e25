"""`di-router sim --role prefill|decode|baseline`: the simulator without writing KV JSON by hand."""

from __future__ import annotations

import argparse

from di_router.kv_config import NEURON_CONNECTOR, KVTransferConfig

ROLE_PORTS = {"prefill": 8100, "decode": 8200, "baseline": 8000}


def role_kv_config(role: str, kv_ip: str, kv_port: int) -> KVTransferConfig | None:
    """The KVTransferConfig that makes a simulator play `role` (None for baseline)."""
    if role == "baseline":
        return None
    producer = role == "prefill"
    return KVTransferConfig(
        kv_connector=NEURON_CONNECTOR,
        kv_role="kv_producer" if producer else "kv_consumer",
        kv_rank=0 if producer else 1,
        kv_parallel_size=2,
        kv_ip=kv_ip,
        kv_port=kv_port,
    )


def role_argv(role: str, port: int | None, kv_ip: str, kv_port: int) -> list[str]:
    """The vLLM-style argv that makes a simulator play `role` (as the launcher would pass it)."""
    argv = ["--port", str(port or ROLE_PORTS[role])]
    kv = role_kv_config(role, kv_ip, kv_port)
    if kv is not None:
        argv += ["--kv-transfer-config", kv.to_cli_json()]
    return argv


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run a simulated vLLM server (prefill, decode or baseline)",
        description="Run the vLLM simulator in a DI role. Any further arguments are passed to "
        "`python -m di_router.sim.api_server` (e.g. --sim-profile instant, --host 127.0.0.1).",
    )
    p.add_argument("--role", choices=sorted(ROLE_PORTS), required=True)
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="default: prefill 8100, decode 8200, baseline 8000 (the tutorial's ports)",
    )
    p.add_argument("--kv-ip", default="127.0.0.1", help="host of the prefill server's KV port")
    p.add_argument("--kv-port", type=int, default=14579)
    p.set_defaults(func=_run, passthrough_ok=True)


def _run(args: argparse.Namespace) -> int:
    from di_router.sim import api_server

    return api_server.main(
        role_argv(args.role, args.port, args.kv_ip, args.kv_port) + args.passthrough
    )

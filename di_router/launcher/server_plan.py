"""Environment, KVTransferConfig and argv of one server, as pure functions of the settings.

This is the tutorial's `server.sh` and `baseline_server.sh` with their bugs fixed: the decode
offset is an integer, baseline exports its cores, and the IPs come from the flags it documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from di_router import argv
from di_router.kv_config import DEFAULT_KV_PORT, NEURON_CONNECTOR, KVTransferConfig
from di_router.launcher.settings import LaunchError, Settings
from di_router.launcher.topology import core_slots

ROLES = ("prefill", "decode", "baseline")
LOOPBACK = "127.0.0.1"
KV_BUFFER_SIZE = 2e11
"""The tutorial's value; NeuronConnector does not read it, but vLLM validates the field."""


@dataclass(frozen=True)
class ServerPlan:
    role: str
    port: int
    env: dict[str, str]
    """Variables set on top of the inherited environment."""
    argv: list[str]
    kv_config: KVTransferConfig | None
    listen_ports: dict[str, int]
    """Ports the server binds, keyed by the flag that chooses each, for the free-port checks."""


def peer_ips(settings: Settings) -> tuple[str, str]:
    """(prefill IP, decode IP): loopback on one instance, required from the user on two."""
    if settings.single_instance:
        return settings.prefill_ip or LOOPBACK, settings.decode_ip or LOOPBACK
    prefill_ip, decode_ip = settings.prefill_ip, settings.decode_ip
    if prefill_ip is None or decode_ip is None:
        flag = "--prefill-ip" if prefill_ip is None else "--decode-ip"
        raise LaunchError(
            f"{flag} is required for multi-instance: run `hostname -i` on that host and pass "
            "the same --prefill-ip and --decode-ip to both servers"
        )
    if prefill_ip == decode_ip:
        raise LaunchError(
            f"--prefill-ip and --decode-ip are both {prefill_ip}: multi-instance needs "
            "two hosts; for one host use --topology single-instance"
        )
    return prefill_ip, decode_ip


def kv_transfer_config(
    role: str, settings: Settings, offset: int, pair: int = 0
) -> KVTransferConfig:
    """The tutorial's config; only the fields it sets (plus `--kv-port`) reach the JSON.
    Pair i's producer listens on kv_port + i: each pair handshakes on a port of its own."""
    producer = role == "prefill"
    kv_port = settings.kv_port
    if pair:
        kv_port = (kv_port or DEFAULT_KV_PORT) + pair
    extra: dict[str, Any] = {} if kv_port is None else {"kv_port": kv_port}
    return KVTransferConfig(
        kv_connector=NEURON_CONNECTOR,
        kv_buffer_device="cpu",
        kv_role="kv_producer" if producer else "kv_consumer",
        kv_rank=0 if producer else 1,
        kv_parallel_size=2,
        kv_buffer_size=KV_BUFFER_SIZE,
        kv_ip=peer_ips(settings)[0],
        neuron_core_offset=offset,
        **extra,
    )


def port_flag(flag: str, pair: int) -> str:
    """How pair `pair`'s port is named in messages: `--prefill-port`, `--prefill-port + 1`."""
    return f"{flag} + {pair}" if pair else flag


def server_port(role: str, settings: Settings, pair: int = 0) -> int:
    base = {
        "prefill": settings.prefill_port,
        "decode": settings.decode_port,
        "baseline": settings.baseline_port,
    }[role]
    return base + pair


def plan_server(role: str, settings: Settings, pair: int = 0) -> ServerPlan:
    """Pair `pair` (0 unless `--pairs`) uses each port + pair and its own block of cores."""
    if role not in ROLES:
        raise LaunchError(f"server role {role!r}: use one of {', '.join(ROLES)}")
    if not settings.model_path:
        raise LaunchError(
            "--model-path is required: the Hugging Face checkpoint folder (or, for the "
            "simulator, any model name)"
        )
    slot = core_slots(settings, pair)["decode" if role == "decode" else "prefill"]
    port = server_port(role, settings, pair)
    listen_ports = {port_flag(f"--{role}-port", pair): port}
    env = {
        "NEURON_COMPILED_ARTIFACTS": settings.compiled_model_path,
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
    }
    kv_config = None
    if role != "baseline":
        prefill_ip, decode_ip = peer_ips(settings)
        env |= {
            "NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT": str(settings.bootstrap_port + pair),
            "NEURON_RT_ASYNC_SENDRECV_EXPERIMENTAL_ENABLED": "1",
            "NEURON_SEND_IP": prefill_ip,
            "NEURON_RECV_IP": decode_ip,
        }
        kv_config = kv_transfer_config(role, settings, slot.offset, pair)
        if role == "prefill":
            listen_ports[port_flag("--kv-port", pair)] = kv_config.kv_port
    if slot.visible_cores is not None:
        env["NEURON_RT_VISIBLE_CORES"] = slot.visible_cores
    return ServerPlan(
        role=role,
        port=port,
        env=env,
        argv=server_argv(settings, port, kv_config),
        kv_config=kv_config,
        listen_ports=listen_ports,
    )


def server_argv(settings: Settings, port: int, kv_config: KVTransferConfig | None) -> list[str]:
    """vLLM's argv; the simulator gets the identical flags after its own module name."""
    sim_flags = [] if settings.sim_profile is None else ["--sim-profile", settings.sim_profile]
    vllm_flags = [
        "--max-num-seqs", str(settings.batch_size),
        "--max-model-len", str(settings.seq_len),
        "--tensor-parallel-size", str(settings.tp_degree),
        "--device", "neuron",
        "--use-v2-block-manager",
        "--override-neuron-config", "{}",
    ]  # fmt: skip
    return argv.server_argv(
        settings.engine,
        model=str(settings.model_path),
        port=port,
        host=settings.host,
        kv_config=kv_config,
        vllm_flags=vllm_flags,
        extra=sim_flags,
    )

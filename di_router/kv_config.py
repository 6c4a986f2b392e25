"""The vLLM `KVTransferConfig` as the Neuron fork (vLLM 0.7.2) validates it.

One model for the whole project: the simulator validates `--kv-transfer-config` with it and the
launcher builds the JSON it passes to real vLLM servers from it, so both agree by construction.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from di_router.discovery.layout import endpoint_url
from di_router.neuron_cores import parse_visible_cores

KVRole = Literal["kv_producer", "kv_consumer", "kv_both"]
NEURON_CONNECTOR = "NeuronConnector"
NIXL_CONNECTOR = "NixlConnector"
"""vLLM V1's connector: KV moves per request, named by `kv_transfer_params`, any P to any D."""
DEFAULT_KV_PORT = 14579


class KVTransferConfig(BaseModel):
    """Field names, types and defaults of vLLM 0.7.2's config plus the Neuron fork's additions."""

    # vLLM's pydantic model ignores unknown keys, so configs of later releases still validate.
    model_config = ConfigDict(extra="ignore")

    kv_connector: str | None = None
    kv_buffer_device: str | None = "cuda"
    kv_buffer_size: float = 1e9
    kv_role: KVRole | None = None
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_ip: str = "127.0.0.1"
    kv_port: int = DEFAULT_KV_PORT
    kv_map_path: str | None = None
    neuron_core_offset: int | None = 0
    engine_id: str | None = None
    """vLLM V1: this instance's id in KV transfers (`remote_engine_id`); a uuid when unset."""
    etcd: str | None = None
    """Neuron 2.26 (dynamic xPyD): `HOST:PORT` of the etcd server the worker registers in."""

    @field_validator("etcd")
    @classmethod
    def _check_etcd(cls, etcd: str | None) -> str | None:
        if etcd is not None:
            endpoint_url(etcd)
        return etcd

    @model_validator(mode="after")
    def _check_roles(self) -> KVTransferConfig:
        if self.kv_connector is not None and self.kv_role is None:
            raise ValueError(
                f"kv_role: a kv_connector ({self.kv_connector}) needs kv_role set to one of "
                "kv_producer, kv_consumer, kv_both"
            )
        # With etcd, 2.26 configs drop kv_parallel_size (the tutorial's pass only role and etcd).
        if (
            self.kv_connector == NEURON_CONNECTOR
            and self.etcd is None
            and self.kv_parallel_size < 2
        ):
            raise ValueError(
                "kv_parallel_size: NeuronConnector creates its transfer agent only when "
                f"kv_parallel_size >= 2 (got {self.kv_parallel_size}); use 2 for 1P1D"
            )
        if not 0 < self.kv_port < 65536:
            raise ValueError(f"kv_port: {self.kv_port} is not a TCP port")
        return self

    @property
    def is_nixl(self) -> bool:
        return self.kv_connector == NIXL_CONNECTOR and self.kv_role is not None

    @property
    def is_kv_transfer_instance(self) -> bool:
        return self.kv_connector is not None and self.kv_role is not None

    @property
    def is_kv_producer(self) -> bool:
        return self.is_kv_transfer_instance and self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.is_kv_transfer_instance and self.kv_role in ("kv_consumer", "kv_both")

    def to_cli_json(self) -> str:
        """Compact JSON for `--kv-transfer-config` holding exactly the fields that were set."""
        return self.model_dump_json(exclude_unset=True)

    def core_offset_warning(self, visible_cores: str | None) -> str | None:
        """Why this offset disagrees with `NEURON_RT_VISIBLE_CORES`, or None when it agrees."""
        if visible_cores is None or self.neuron_core_offset is None:
            return None
        try:
            first = parse_visible_cores(visible_cores)[0]
        except ValueError as exc:
            return f"NEURON_RT_VISIBLE_CORES={visible_cores!r} is not a core range: {exc}"
        if first != self.neuron_core_offset:
            return (
                f"neuron_core_offset={self.neuron_core_offset} but NEURON_RT_VISIBLE_CORES="
                f"{visible_cores} starts at core {first}; KV would be sent to the wrong cores. "
                f"Set neuron_core_offset to {first}."
            )
        return None

    def send_ip_warning(self, send_ip: str | None) -> str | None:
        """Why `NEURON_SEND_IP` disagrees with a consumer's `kv_ip`, or None when it agrees.

        A decode server asks `kv_ip` for KV and receives it over EFA from `NEURON_SEND_IP`: both
        name the prefill host, and a mismatch hangs or misroutes every transfer.
        """
        if not self.is_kv_consumer or send_ip is None or send_ip == self.kv_ip:
            return None
        return (
            f"kv_ip={self.kv_ip} but NEURON_SEND_IP={send_ip}; both must be the prefill "
            "server's IP (kv_ip for the KV lookup, NEURON_SEND_IP for the EFA transfer)"
        )


def parse_kv_transfer_config(text: str) -> KVTransferConfig:
    """Validate a `--kv-transfer-config` JSON string; ValueError names the failing field."""
    try:
        return KVTransferConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ValueError(f"invalid --kv-transfer-config: {problems}") from None


def visible_cores_from_env() -> str | None:
    return os.environ.get("NEURON_RT_VISIBLE_CORES")

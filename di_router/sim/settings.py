"""Everything one simulated server needs to know, resolved from the CLI and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from di_router.kv_config import KVTransferConfig
from di_router.sim.engine import Role
from di_router.sim.faults import FaultSettings
from di_router.sim.profiles import PROFILES, TimingProfile


@dataclass(frozen=True)
class SimSettings:
    model: str = "llama-3.3-70b"
    served_model_names: tuple[str, ...] = ()
    max_num_seqs: int = 256
    max_model_len: int = 8192
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = None
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    """Both set: the server listens on HTTPS, as vLLM's `--ssl-keyfile/--ssl-certfile` do."""
    kv_config: KVTransferConfig | None = None
    profile: TimingProfile = PROFILES["instant"]
    kv_timeout_s: float = 0.0
    """0: a consumer waits for its KV forever, as vLLM does."""
    abort_transferring: bool = False
    kv_handshake_timeout_s: float = 0.0
    """0: wait for the peer forever, as vLLM does."""
    kv_entry_ttl_s: float = 0.0
    eos_probability: float = 0.0
    faults: FaultSettings = field(default_factory=FaultSettings)

    @property
    def role(self) -> Role:
        kv = self.kv_config
        if kv is not None and kv.is_nixl:
            return Role.NIXL
        if kv is None or not kv.is_kv_transfer_instance or kv.kv_role == "kv_both":
            return Role.BASELINE
        return Role.PREFILL if kv.is_kv_producer else Role.DECODE

    @property
    def model_name(self) -> str:
        return self.served_model_names[0] if self.served_model_names else self.model

"""Timing model of a Neuron vLLM server: what prefill, a decode step and a KV transfer cost.

The numbers of the Trn2 profiles are estimates from public Neuron documentation; the README's
"Simulator timing profiles" section says where each comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TimingProfile:
    prefill_base_ms: float = 0.0
    prefill_per_token_us: float = 0.0
    decode_base_ms: float = 0.0
    decode_per_seq_ms: float = 0.0
    kv_setup_ms: float = 0.0
    kv_bytes_per_token: int = 327_680
    kv_replication: int = 1
    link_gbps: float = 400.0
    """Link bandwidth in GB/s (EFA on trn2.48xlarge: 3,200 Gbps = 400 GB/s)."""
    link_efficiency: float = 1.0

    def prefill_seconds(self, prompt_tokens: int) -> float:
        return (self.prefill_base_ms * 1e3 + self.prefill_per_token_us * prompt_tokens) / 1e6

    def decode_step_seconds(self, batch: int) -> float:
        return (self.decode_base_ms + self.decode_per_seq_ms * batch) / 1e3

    def kv_transfer_seconds(self, tokens: int) -> float:
        if self.kv_setup_ms == 0 and self.link_gbps == float("inf"):
            return 0.0
        wire_bytes = tokens * self.kv_bytes_per_token * self.kv_replication
        return self.kv_setup_ms / 1e3 + wire_bytes / (self.link_gbps * 1e9 * self.link_efficiency)

    def with_overrides(self, **overrides: float | None) -> TimingProfile:
        changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, TimingProfile] = {
    # Every cost zero: measures the router and the HTTP stack alone.
    "instant": TimingProfile(link_gbps=float("inf")),
    # Llama-3.3-70B, TP64 on a whole trn2.48xlarge (multi-instance 1P1D, one server per host).
    "trn2-llama3.3-70b-tp64": TimingProfile(
        prefill_base_ms=50.0,
        prefill_per_token_us=77.0,
        decode_base_ms=19.0,
        decode_per_seq_ms=1.0,
        kv_setup_ms=3.0,
        kv_replication=8,
        link_efficiency=0.6,
    ),
    # Llama-3.3-70B, TP32 on half an instance (single-instance 1P1D: cores 0-31 / 32-63).
    "trn2-llama3.3-70b-tp32": TimingProfile(
        prefill_base_ms=60.0,
        prefill_per_token_us=154.0,
        decode_base_ms=21.0,
        decode_per_seq_ms=1.2,
        kv_setup_ms=3.0,
        kv_replication=4,
        link_efficiency=0.6,
    ),
}
DEFAULT_PROFILE = "trn2-llama3.3-70b-tp32"

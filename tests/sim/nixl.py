"""Simulators speaking vLLM V1's NixlConnector protocol, for the simulator and router tests."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tests.sim.conftest import sim_proc
from tests.support import Proc, free_port

NIXL_CONFIG = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})


def nixl_sim(
    name: str,
    extra: Sequence[str] = (),
    abort_timeout: float | None = None,
    side_channel_port: int | None = None,
) -> Proc:
    """A NIXL server on the instant profile, its side channel on loopback (a free port unless
    given), configured through vLLM's environment variables."""
    env = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(side_channel_port or free_port()),
    }
    if abort_timeout is not None:
        env["VLLM_NIXL_ABORT_REQUEST_TIMEOUT"] = str(abort_timeout)
    args = ["--kv-transfer-config", NIXL_CONFIG, "--sim-profile", "instant", *extra]
    return sim_proc(name, args, env)

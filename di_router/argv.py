"""The command line of each program this package starts: one builder per program.

`di-router up`/`serve`, the benchmark stacks (`di_router.bench.stack`) and the tests all start
the router and the vLLM server (or its simulator) through these, so each flag is spelled once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from di_router.kv_config import KVTransferConfig

ROUTER_MODULE = "di_router.router.cli"
VLLM_MODULE = "vllm.entrypoints.openai.api_server"
SIM_MODULE = "di_router.sim.api_server"
ENGINE_MODULES = {"vllm": VLLM_MODULE, "sim": SIM_MODULE}


def router_argv(
    host: str, port: int, pairs: Sequence[tuple[str, str]], extra: Sequence[str] = ()
) -> list[str]:
    """`neuron-proxy-server` listening on host:port in front of `pairs` of (prefill URL, decode
    URL), in order: the i-th prefill serves only with the i-th decode, the servers' KV pairing.
    `extra` holds any other router flags (they may also name the backends when `pairs` is empty).
    """
    argv = [sys.executable, "-m", ROUTER_MODULE, "--host", host, "--port", str(port)]
    for prefill, decode in pairs:
        argv += ["--prefill", prefill, "--decode", decode]
    return [*argv, *extra]


def server_argv(
    engine: str,
    *,
    model: str,
    port: int,
    host: str | None = None,
    kv_config: KVTransferConfig | None = None,
    vllm_flags: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI api_server (`engine` vllm) or the simulator (`engine` sim) with identical
    flags: the simulator accepts vLLM's, so a launch differs only in the module name.
    `vllm_flags` come right after `--model`; `extra` (e.g. `--sim-*`) comes last."""
    argv = [sys.executable, "-m", ENGINE_MODULES[engine], "--model", model, *vllm_flags]
    if kv_config is not None:
        argv += ["--kv-transfer-config", kv_config.to_cli_json()]
    argv += ["--port", str(port)]
    if host is not None:
        argv += ["--host", host]
    return [*argv, *extra]

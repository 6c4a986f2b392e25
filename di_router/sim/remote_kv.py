"""Per-request KV transfer: which remote a request pulls its KV from, or offers it to.

Two any-to-any modes, where no producer is paired with a consumer at startup:

- **vLLM V1, NixlConnector** (`vllm/distributed/kv_transfer/kv_connector/v1/nixl_connector.py`
  in vllm-project/vllm). A request whose body carries `kv_transfer_params.do_remote_decode`
  is prefilled, and if it ends length-capped its KV stays (with its slot) until a consumer pulls
  it or `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` passes; the answer's `kv_transfer_params` say where it
  is (`request_finished`). A request carrying `do_remote_prefill` pulls that KV from
  `remote_host:remote_port` (the side channel, `VLLM_NIXL_SIDE_CHANNEL_HOST/PORT`), then computes
  every output token itself. A missing entry fails the request (`kv_load_failure_policy` "fail",
  vLLM's default). Both sides can abort at any time.
- **Neuron 2.26 with etcd** (the xPyD connector of aws-neuron/upstreaming-to-vllm, commit
  e13d1a758, `parse_request_id` and `maybe_setup_buffer`). Each leg's `X-Request-Id` names its
  peer, `<id>_<peer ip>:<peer HTTP port>`; the KV lookup key is the id without that suffix, and a
  producer's side channel listens on its own HTTP port + 1. The pulled token is the consumer's
  first output and transferring requests cannot be aborted, as in 2.24.
"""

from __future__ import annotations

import functools
import math
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from di_router.sim.kv_channel import KVPeers
from di_router.sim.protocol import RequestError
from di_router.sim.sequence import Sequence

PEER_SUFFIX = re.compile(r"^(?P<key>.+)_(?P<host>[^_:]+):(?P<port>\d{1,5})$")
NIXL_SIDE_CHANNEL_PORT = 5600
"""vLLM's default `VLLM_NIXL_SIDE_CHANNEL_PORT`."""
NIXL_ABORT_TIMEOUT_S = 120.0
"""vLLM's default `VLLM_NIXL_ABORT_REQUEST_TIMEOUT` when NIXL P/D appeared (later releases: 480)."""
BLOCK_SIZE = 16
"""vLLM's default `--block-size`: `remote_block_ids` has one id per started block of the prompt."""

Pull = Callable[[], Awaitable[tuple[int, int]]]


def etcd_kv_port(http_port: int) -> int:
    """Neuron 2.26 (etcd): a producer's KV side channel is on its HTTP port + 1."""
    return http_port + 1


def nixl_side_channel() -> tuple[str, int]:
    """Where this server's NIXL side channel listens, from vLLM's environment variables."""
    host = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "localhost")
    return host, int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", NIXL_SIDE_CHANNEL_PORT))


def nixl_abort_timeout() -> float:
    return float(os.environ.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", NIXL_ABORT_TIMEOUT_S))


@dataclass(frozen=True)
class KVPlan:
    """What one request does with KV, beyond what the server's role says."""

    key_base: str
    """The id its engine ids derive from (the header without a Neuron 2.26 peer suffix)."""
    offer: bool = False
    v1: bool = False
    pull: Callable[[str], Pull] | None = None
    """From the request's own engine id to its pull (None: the server's role decides)."""


class RemoteKV:
    """A server's any-to-any KV mode: NIXL (per request) or Neuron 2.26 etcd (peer in the id)."""

    def __init__(
        self,
        mode: str,
        peers: KVPeers,
        *,
        consumer: bool = False,
        side_channel: tuple[str, int] = ("localhost", NIXL_SIDE_CHANNEL_PORT),
        engine_id: str | None = None,
    ) -> None:
        self.mode = mode
        self.peers = peers
        self.consumer = consumer
        """etcd mode: this server pulls (kv_consumer), so every request must name its peer."""
        self.side_channel = side_channel
        self.engine_id = engine_id or str(uuid.uuid4())
        self._next_block = 0

    def plan(self, payload: dict[str, Any], header_id: str, prompts: int) -> KVPlan:
        """Raises RequestError for a request this mode cannot serve."""
        if self.mode == "etcd":
            return self._etcd_plan(header_id)
        params = payload.get("kv_transfer_params")
        if params is None:
            return KVPlan(header_id)
        if not isinstance(params, dict):
            raise RequestError(400, "kv_transfer_params: Input should be a valid dictionary")
        if params.get("do_remote_prefill"):
            if prompts != 1:
                raise RequestError(
                    400,
                    "kv_transfer_params with do_remote_prefill names the KV of one prompt; "
                    "send a list of prompts as separate requests",
                )
            host, port = params.get("remote_host"), params.get("remote_port")
            if not isinstance(host, str) or not isinstance(port, int):
                raise RequestError(
                    400, "kv_transfer_params: do_remote_prefill needs remote_host and remote_port"
                )
            remote_id = params.get("remote_request_id")
            client = self.peers.get(host, port)

            def pull(engine_id: str) -> Pull:
                key = remote_id if isinstance(remote_id, str) else engine_id
                return functools.partial(client.lookup, key, False)

            return KVPlan(header_id, v1=True, pull=pull)
        return KVPlan(header_id, offer=bool(params.get("do_remote_decode")), v1=True)

    def _etcd_plan(self, header_id: str) -> KVPlan:
        match = PEER_SUFFIX.match(header_id)
        if match is None:
            if self.consumer:  # the fork would fail to parse it; a clear 400 instead
                raise RequestError(
                    400,
                    "X-Request-Id must name the prefill server as <id>_<prefill ip>:<prefill "
                    f"port> (Neuron 2.26 with etcd), got {header_id!r}",
                )
            return KVPlan(header_id)
        if not self.consumer:
            return KVPlan(match["key"])
        peer = (match["host"], etcd_kv_port(int(match["port"])))

        def pull(engine_id: str) -> Pull:
            return functools.partial(self.peers.get(*peer).lookup, engine_id)

        return KVPlan(match["key"], pull=pull)

    def produced_params(self, seq: Sequence) -> dict[str, Any] | None:
        """A NIXL answer's `kv_transfer_params` (`request_finished`): where the KV waits, or None
        when nothing was kept (not asked for, or not length-capped: EOS first, aborted)."""
        if not (seq.kv_offer and seq.finish_reason == "length"):
            return None
        first, self._next_block = self._next_block, self._next_block + blocks(seq.prompt_tokens)
        host, port = self.side_channel
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(range(first, self._next_block)),
            "remote_engine_id": self.engine_id,
            "remote_request_id": seq.engine_id,
            "remote_host": host,
            "remote_port": port,
        }


def blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_SIZE)

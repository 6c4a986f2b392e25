"""vLLM V1's disaggregated protocol with NixlConnector (`--kv-protocol nixl`).

Sequential, unlike Neuron's: the prefill leg goes first, not streamed, with `max_tokens` 1 and
`kv_transfer_params: {"do_remote_decode": true}`; its answer carries the `kv_transfer_params`
(where its KV lives) that the decode leg then sends with the client's own body. Decode computes
every token itself, so its stream is the client's as it is. Any prefill can pair with any
decode. Aborts work on both sides (the producer frees an unpulled KV after its own timeout),
so an exchange that ends badly only closes its legs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from di_router.router.exchange import Exchange, ExchangeSpec, first_token_body
from di_router.router.relay import StreamMerger
from di_router.router.request_view import RequestView, di_unsupported
from di_router.router.upstream import Leg, Progress, UpstreamError

REMOTE_DECODE = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


class NixlProtocol:
    name = "nixl"
    pairing = "any"

    def unsupported(self, view: RequestView, chat: bool) -> tuple[str, str] | None:
        if view.prompt_count > 1:  # vLLM answers with the first prompt's kv_transfer_params only
            return "prompt", "a list of prompts is not supported with --kv-protocol nixl"
        return di_unsupported(view, chat)

    def prefill_body(self, body: dict[str, Any], view: RequestView) -> dict[str, Any]:
        prefill = first_token_body(body, view)
        prefill["stream"] = False
        prefill["kv_transfer_params"] = REMOTE_DECODE
        return prefill

    def streamed_decode_body(self, body: dict[str, Any], chat: bool) -> None:
        return None  # aborts work on both sides: decode's own answer serves as it is

    def exchange(self, spec: ExchangeSpec) -> NixlExchange:
        return NixlExchange(spec)


class NixlExchange(Exchange):
    def __init__(self, spec: ExchangeSpec) -> None:
        self.spec = spec
        self.prefill = spec.open_leg(spec.prefill, spec.prefill_content)
        self.decode: Leg | None = None
        self.legs = (self.prefill,)
        self.merger = StreamMerger(
            spec.trace, spec.client_id, spec.created, spec.chat, spec.choices
        )
        self._first = b""

    @property
    def clean(self) -> bool:
        decode = self.decode
        return decode is not None and decode.progress is Progress.FINISHED and not decode.error

    async def start(self) -> None:
        spec = self.spec
        try:
            async with asyncio.timeout(spec.prefill_timeout):
                answer = await self.prefill.json(spec.max_response_bytes)
        except TimeoutError:
            what = f"did not answer within {spec.prefill_timeout:g}s"
            raise UpstreamError.make(
                "prefill", 504, "timeout", f"prefill server {what}", self.prefill.backend.url
            ) from None
        params = answer.get("kv_transfer_params")
        # null: prefill kept no KV (it did not end length-capped, e.g. EOS first); decode then
        # prefills on its own, as vLLM's P/D proxy does.
        if not isinstance(params, dict) and not (params is None and "kv_transfer_params" in answer):
            raise UpstreamError.make(
                "prefill", 502, "bad_response",
                "prefill server answered without kv_transfer_params (is it a NIXL producer?)",
            )  # fmt: skip
        spec.trace.prefill_done = time.perf_counter()
        body = orjson.loads(spec.decode_content)
        if params is not None:
            body["kv_transfer_params"] = params
        self.decode = spec.open_leg(spec.decode, orjson.dumps(body))
        self.legs = (self.prefill, self.decode)
        if spec.stream:  # up to decode's first token: nothing has reached the client yet
            events: list[bytes] = []
            while not self.merger.has_first_tokens:
                batch = await self.decode.next_events()
                if batch is None:
                    break
                events.extend(self.merger.relay(data) for data in batch)
            self._first = b"".join(events)

    async def events(self) -> AsyncIterator[bytes]:
        assert self.decode is not None
        if self._first:
            yield self._first
        while (batch := await self.decode.next_events()) is not None:
            if events := b"".join([self.merger.relay(data) for data in batch]):
                yield events

    async def answer(self) -> dict[str, Any]:
        spec, trace, decode = self.spec, self.spec.trace, self.decode
        assert decode is not None
        try:
            async with asyncio.timeout(spec.decode_timeout):
                body = await decode.json(spec.max_response_bytes)
        except TimeoutError:
            what = f"did not answer within {spec.decode_timeout:g}s"
            raise UpstreamError.make(
                "decode", 504, "timeout", f"decode server {what}", decode.backend.url
            ) from None
        body["id"] = spec.client_id
        body["created"] = spec.created
        body.pop("kv_transfer_params", None)
        usage = body.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("prompt_tokens"), int):
                trace.prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                trace.completion_tokens = usage["completion_tokens"]
        return body

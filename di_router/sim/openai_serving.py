"""Serving completions and chat: request -> sequences on the engine -> JSON or SSE stream.

The response shapes follow vLLM 0.7.2's `serving_completion.py` / `serving_chat.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from quart import Response, request

from di_router.sim.engine import Engine
from di_router.sim.protocol import CompletionRequest, ParsedRequest, RequestError, parse_request
from di_router.sim.remote_kv import KVPlan
from di_router.sim.sequence import Sequence, SequenceError
from di_router.sim.server import SimServer
from di_router.sim.tokenizer import prompt_key
from di_router.wire.errors import error_body
from di_router.wire.responses import json_response
from di_router.wire.sse import DONE_EVENT, SSE_CONTENT_TYPE, encode_event
from di_router.wire.vllm_bodies import ResponseHead, usage


def error_response(status: int, message: str) -> Response:
    return json_response(error_body(status, message), status)


def streaming_error_event(message: str) -> bytes:
    """`create_streaming_error_response` (`serving_engine.py`): whatever failed, the event is a
    BadRequestError with code 400, serialised by `json.dumps` (with its spaces)."""
    return encode_event(json.dumps({"error": error_body(400, message)}).encode())


def _fail_request(engine: Engine, seqs: list[Sequence]) -> None:
    """One sequence failed: the request fails, its siblings stop (not a client abort)."""
    for seq in seqs:
        engine.abort(seq, client_gone=False)


async def generate(server: SimServer, chat: bool) -> Response:
    settings = server.settings
    try:
        payload = orjson.loads(await request.get_data())
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"Invalid JSON body: {exc}")
    try:
        parsed = parse_request(
            payload,
            chat,
            settings.max_model_len,
            served_models=settings.served_model_names or (settings.model,),
        )
    except RequestError as exc:
        return error_response(exc.status, exc.message)

    base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    remote = server.remote_kv
    try:
        plan = (
            KVPlan(base_id)
            if remote is None
            else remote.plan(payload, base_id, len(parsed.prompts))
        )
    except RequestError as exc:
        return error_response(exc.status, exc.message)
    # `model` is served_model_name[0] whatever alias the request used (OpenAIServingModels).
    head = ResponseHead(
        f"{'chatcmpl' if chat else 'cmpl'}-{base_id}", int(time.time()), settings.model_name, chat
    )
    engine = server.engine
    assert engine is not None
    outputs: asyncio.Queue[Any] = asyncio.Queue()
    # The KV key: vLLM's request id, without a Neuron 2.26 peer suffix (`remote_kv`).
    key = f"{'chatcmpl' if chat else 'cmpl'}-{plan.key_base}"
    engine_ids = [key if chat else f"{key}-{i}" for i in range(len(parsed.prompts))]
    seqs = [
        Sequence(
            engine_id=engine_id,
            index=i,
            prompt_tokens=job.num_tokens,
            prompt_key=prompt_key(job.key_source),
            params=parsed.params,
            eos_probability=settings.eos_probability,
            outputs=outputs,
            kv_pull=plan.pull(engine_id) if plan.pull else None,
            kv_offer=plan.offer,
            v1=plan.v1,
        )
        for i, (engine_id, job) in enumerate(zip(engine_ids, parsed.prompts, strict=True))
    ]
    for seq in seqs:
        server.metrics.prompt_tokens.inc(seq.prompt_tokens)
        engine.submit(seq)
    if parsed.stream:
        response = Response(_stream(engine, seqs, head, parsed), content_type=SSE_CONTENT_TYPE)
        response.timeout = None
        return response
    kv_params = remote.produced_params if remote is not None and remote.mode == "nixl" else None
    try:
        return await _collect(engine, seqs, head, parsed, kv_params)
    finally:
        for seq in seqs:
            engine.abort(seq)


async def _collect(
    engine: Engine,
    seqs: list[Sequence],
    head: ResponseHead,
    parsed: ParsedRequest,
    kv_params: Callable[[Sequence], dict[str, Any] | None] | None,
) -> Response:
    """The whole answer; a V1 (NIXL) server adds `kv_transfer_params`, those of the first
    prompt as vLLM's `serving_completion` does."""
    finish: dict[int, tuple[str, str | int | None]] = {}
    outputs = seqs[0].outputs
    while len(finish) < len(seqs):
        index, out = await outputs.get()
        if isinstance(out, SequenceError):
            _fail_request(engine, seqs)
            return error_response(out.status, out.message)
        if out.finish_reason is not None:
            finish[index] = (out.finish_reason, out.stop_reason)
    choices = [
        head.final_choice(seq.index, _echo(parsed, seq) + seq.text, *finish[seq.index])
        for seq in seqs
    ]
    prompt_tokens = sum(s.prompt_tokens for s in seqs)
    completion_tokens = sum(len(s.generated) for s in seqs)
    body = head.response(choices, usage(prompt_tokens, completion_tokens))
    if kv_params is not None:
        body["kv_transfer_params"] = kv_params(seqs[0])
    return json_response(body)


def _echo(parsed: ParsedRequest, seq: Sequence) -> str:
    """Completions' `echo` puts the prompt before the first generated text."""
    if parsed.body.echo and isinstance(parsed.body, CompletionRequest):
        return parsed.prompts[seq.index].text
    return ""


async def _stream(
    engine: Engine, seqs: list[Sequence], head: ResponseHead, parsed: ParsedRequest
) -> AsyncIterator[bytes]:
    outputs = seqs[0].outputs
    prompt_tokens = sum(s.prompt_tokens for s in seqs)
    # Count what was sent, not what was generated: the engine may already be tokens ahead.
    sent = [0] * len(seqs)
    done = 0
    try:
        while done < len(seqs):
            index, out = await outputs.get()
            if isinstance(out, SequenceError):
                _fail_request(engine, seqs)
                yield streaming_error_event(out.message)
                break
            sent[index] += 1
            first = sent[index] == 1
            if first and parsed.body.echo and not head.chat:
                # completion_stream_generator asserts prompt_logprobs, which only `logprobs`
                # (unsupported here) requests: the AssertionError's empty text is the message.
                yield streaming_error_event("")
                break
            running_usage = None
            if parsed.continuous_usage:
                # Per prompt and per choice, with `prompt_tokens_details` (completions).
                own = seqs[index].prompt_tokens
                running_usage = usage(own, sent[index], details=not head.chat)
            if head.chat and first:
                role_usage = usage(prompt_tokens, 0, details=False) if running_usage else None
                yield encode_event(orjson.dumps(head.chunk([head.role_choice(index)], role_usage)))
            text = out.text
            choice = head.token_choice(index, text, out.finish_reason, out.stop_reason)
            yield encode_event(orjson.dumps(head.chunk([choice], running_usage)))
            done += out.finish_reason is not None
        else:
            if parsed.include_usage:
                completion = sum(len(s.generated) for s in seqs)
                final = usage(prompt_tokens, completion, details=False)
                yield encode_event(orjson.dumps(head.chunk([], final)))
        yield DONE_EVENT
    finally:
        for seq in seqs:
            engine.abort(seq)

"""Serving completions and chat: request -> sequences on the engine -> JSON or SSE stream.

The response shapes follow vLLM 0.7.2's `serving_completion.py` / `serving_chat.py`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from quart import Response, request

from di_router.sim.engine import Engine, Role
from di_router.sim.protocol import CompletionRequest, ParsedRequest, RequestError, parse_request
from di_router.sim.responses import ResponseHead, usage
from di_router.sim.sequence import Sequence, SequenceError
from di_router.sim.server import SimServer
from di_router.sim.tokenizer import prompt_key
from di_router.wire.errors import error_body, stream_error_payload
from di_router.wire.responses import json_response
from di_router.wire.sse import DONE_EVENT, SSE_CONTENT_TYPE, encode_event


def error_response(status: int, message: str, param: str | None = None) -> Response:
    return json_response(error_body(status, message, param), status)


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
            producer=settings.role is Role.PREFILL,
            served_models=settings.served_model_names or (settings.model,),
        )
    except RequestError as exc:
        return error_response(exc.status, exc.message, exc.param)

    base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    head = ResponseHead(
        f"{'chatcmpl' if chat else 'cmpl'}-{base_id}", int(time.time()), parsed.body.model, chat
    )
    engine = server.engine
    assert engine is not None
    outputs: asyncio.Queue[Any] = asyncio.Queue()
    seqs = [
        Sequence(
            engine_id=head.id if chat else f"{head.id}-{i}",
            index=i,
            prompt_tokens=job.num_tokens,
            prompt_key=prompt_key(job.key_source),
            params=parsed.params,
            eos_probability=settings.eos_probability,
            outputs=outputs,
        )
        for i, job in enumerate(parsed.prompts)
    ]
    for seq in seqs:
        server.metrics.prompt_tokens.inc(seq.prompt_tokens)
        engine.submit(seq)
    if parsed.stream:
        response = Response(_stream(engine, seqs, head, parsed), content_type=SSE_CONTENT_TYPE)
        response.timeout = None
        return response
    try:
        return await _collect(engine, seqs, head, parsed)
    finally:
        for seq in seqs:
            engine.abort(seq)


async def _collect(
    engine: Engine, seqs: list[Sequence], head: ResponseHead, parsed: ParsedRequest
) -> Response:
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
    return json_response(head.response(choices, usage(prompt_tokens, completion_tokens)))


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
                yield encode_event(orjson.dumps(stream_error_payload(out.status, out.message)))
                break
            sent[index] += 1
            first = sent[index] == 1
            running_usage = None
            if parsed.continuous_usage:
                running_usage = usage(prompt_tokens, sum(sent), details=False)
            if head.chat and first:
                role_usage = usage(prompt_tokens, 0, details=False) if running_usage else None
                yield encode_event(orjson.dumps(head.chunk([head.role_choice(index)], role_usage)))
            text = (_echo(parsed, seqs[index]) if first else "") + out.text
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

"""The simulator's HTTP API: vLLM 0.7.2's OpenAI routes, health, version and metrics."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from quart import Quart, Response, request

from di_router.sim.engine import Engine, Role
from di_router.sim.kv_channel import KVChannelServer, KVEntryStore, pull_entry
from di_router.sim.metrics import SimMetrics
from di_router.sim.protocol import CompletionRequest, ParsedRequest, RequestError, parse_request
from di_router.sim.responses import ResponseHead, usage
from di_router.sim.sequence import Sequence, SequenceError
from di_router.sim.settings import SimSettings
from di_router.sim.tokenizer import prompt_key
from di_router.wire.errors import error_body, stream_error_payload
from di_router.wire.sse import DONE_EVENT, SSE_CONTENT_TYPE, encode_event

VLLM_VERSION = "0.7.2"


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, message: str, param: str | None = None) -> Response:
    return json_response(error_body(status, message, param), status)


def _fail_request(engine: Engine, seqs: list[Sequence]) -> None:
    """One sequence failed: the request fails, its siblings stop (not a client abort)."""
    for seq in seqs:
        engine.abort(seq, client_gone=False)


class SimServer:
    """State of one simulated vLLM server; owns the engine and, for a producer, the KV port."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.metrics = SimMetrics(settings.model_name)
        self.kv_store: KVEntryStore | None = None
        self.kv_server: KVChannelServer | None = None
        self.engine: Engine | None = None

    async def start(self) -> None:
        s = self.settings
        pull = None
        if s.role is Role.PREFILL:
            self.kv_store = KVEntryStore(s.kv_entry_ttl_s, s.profile.kv_transfer_seconds)
            self.kv_server = KVChannelServer(self.kv_store)
            assert s.kv_config is not None
            await self.kv_server.start(s.host, s.kv_config.kv_port)
        elif s.role is Role.DECODE:
            kv = s.kv_config
            assert kv is not None

            async def pull(engine_id: str, timeout: float) -> tuple[int, int]:
                return await pull_entry(kv.kv_ip, kv.kv_port, engine_id, timeout)

        self.engine = Engine(
            s.role, s.profile, s.max_num_seqs, self.metrics, self.kv_store, pull, s.kv_timeout_s
        )
        self.engine.start()
        self._register_gauges(self.engine)

    async def stop(self) -> None:
        if self.engine is not None:
            await self.engine.stop()
        if self.kv_server is not None:
            await self.kv_server.close()

    def _register_gauges(self, engine: Engine) -> None:
        m = self.metrics
        m.gauge(
            "vllm:num_requests_running", "Number of requests running.", lambda: engine.num_running
        )
        m.gauge(
            "vllm:num_requests_waiting", "Number of requests waiting.", lambda: engine.num_waiting
        )
        m.gauge("vllm:num_requests_swapped", "Number of requests swapped to CPU.", lambda: 0)
        m.gauge(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            lambda: engine.slots_in_use / engine.max_num_seqs,
        )
        m.gauge(
            "di_sim:slots_in_use",
            "Sequence slots held, including KV pinned for a pull.",
            lambda: engine.slots_in_use,
        )
        m.counter_from(
            "di_sim:requests_aborted",
            "Requests aborted because the client went away.",
            lambda: engine.aborted,
        )
        store = self.kv_store
        if store is not None:
            for name, doc in (
                ("produced", "KV entries produced by prefill."),
                ("pulled", "KV entries pulled by a consumer."),
                ("expired", "KV entries dropped unpulled after the TTL."),
            ):
                m.counter_from(
                    f"di_sim:kv_entries_{name}",
                    doc,
                    lambda name=name: getattr(store.counters, name),
                )
            m.gauge(
                "di_sim:kv_entries_pending", "KV entries waiting to be pulled.", lambda: len(store)
            )

    def stats(self) -> dict[str, Any]:
        engine = self.engine
        assert engine is not None
        stats: dict[str, Any] = {
            "role": str(self.settings.role),
            "max_num_seqs": engine.max_num_seqs,
            "slots_in_use": engine.slots_in_use,
            "waiting": engine.num_waiting,
            "running": len(engine.running),
            "transferring": len(engine.transferring),
            "aborted": engine.aborted,
            "kv_pull_timeouts": int(self.metrics.kv_pull_timeouts._value.get()),
        }
        if self.kv_store is not None:
            c = self.kv_store.counters
            stats["kv"] = {
                "produced": c.produced,
                "pulled": c.pulled,
                "expired": c.expired,
                "pending": len(self.kv_store),
            }
        return stats


def create_app(settings: SimSettings) -> Quart:
    app = Quart("di_router.sim")
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = None
    server = SimServer(settings)
    app.extensions["sim"] = server

    @app.before_serving
    async def _start() -> None:
        await server.start()

    @app.after_serving
    async def _stop() -> None:
        await server.stop()

    @app.before_request
    async def _auth() -> Response | None:
        if (
            settings.api_key
            and request.path.startswith("/v1")
            and request.headers.get("Authorization") != f"Bearer {settings.api_key}"
        ):
            return json_response({"error": "Unauthorized"}, 401)
        return None

    @app.route("/health")
    @app.route("/ping", methods=["GET", "POST"])
    async def health() -> Response:
        return Response(b"", 200)

    @app.route("/version")
    async def version() -> Response:
        return json_response({"version": VLLM_VERSION})

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), content_type=CONTENT_TYPE_LATEST)

    @app.route("/sim/stats")
    async def stats() -> Response:
        return json_response(server.stats())

    @app.route("/v1/models")
    async def models() -> Response:
        now = int(time.time())
        cards = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": settings.model,
                "parent": None,
                "max_model_len": settings.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in (settings.served_model_names or (settings.model,))
        ]
        return json_response({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _generate(server, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await _generate(server, chat=True)

    return app


async def _generate(server: SimServer, chat: bool) -> Response:
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

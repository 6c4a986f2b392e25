"""Closed-loop streaming load generator with llmperf's and vLLM bench's metric definitions.

Why our own: llmperf needs Ray, Python < 3.11 and a Hugging Face tokenizer download, and vLLM's
benchmark needs a tokenizer too. Both compute their metrics from the arrival times of SSE events,
so one trace per request (send time, status, arrival time of every content-bearing event, usage)
is enough to reproduce either tool's numbers; `summarize` does that.

Load models: closed loop (llmperf): `concurrency` workers, each sends its next request as soon as
its previous one finished, until `len(requests)` have been sent. Open loop (vLLM bench's
`--request-rate`): Poisson arrivals at a given rate, at most `concurrency` in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx
import orjson

Endpoint = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# The Neuron DI tutorial's llmperf `--additional-sampling-params`.
TUTORIAL_SAMPLING: dict[str, Any] = {"top_k": 50, "top_p": 0.9, "temperature": 0.7}
_TEXT = (
    "shall i compare thee to a summers day thou art more lovely and temperate rough winds do "
    "shake the darling buds of may and summers lease hath all too short a date"
)
_WORDS = tuple(_TEXT.split(" "))


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload, generated before the clock starts (as llmperf does)."""

    prompt: str
    max_tokens: int
    input_tokens: int | None = None
    """The client's count of the prompt (llmperf's `number_input_tokens`), when it made one."""


@dataclass(frozen=True)
class LoadConfig:
    """Where and how to send: everything but the per-request prompt and length."""

    base_url: str
    """One server, or several separated by `;` that requests take in turn (Neuron's llmperf
    `llmperf_dp.patch`); each without the `/v1` suffix."""
    model: str = "llama-3.3-70b"
    endpoint: Endpoint = "chat"
    concurrency: int = 1
    sampling: Mapping[str, Any] = field(default_factory=dict)
    """Merged into every body (llmperf's `--additional-sampling-params`)."""
    ignore_eos: bool = True
    """Exact output lengths: the comparison is then about timing, not about when EOS came."""
    include_usage: bool = True
    """Ask for the usage chunk (vLLM bench does; llmperf does not and would choke on it)."""
    timeout_s: float = 180.0
    """Read timeout per request; llmperf uses 180 s, so a longer stall is an error there too."""
    api_key: str = "EMPTY"
    request_rate: float | None = None
    """Requests per second with Poisson arrivals (open loop); None: closed loop."""
    arrival_seed: int = 0
    stop_after_s: float | None = None
    """No request is sent after this many seconds of run (llmperf's `--timeout`)."""

    @property
    def urls(self) -> list[str]:
        return [url for url in self.base_url.split(";") if url]

    def url_for(self, index: int) -> str:
        """Round robin by request index, so consecutive requests alternate between servers."""
        urls = self.urls
        return urls[index % len(urls)]


@dataclass
class RequestResult:
    """Everything measured about one request; all times are `time.perf_counter()` seconds."""

    index: int
    send_time: float
    url: str = ""
    status: int | None = None
    token_times: list[float] = field(default_factory=list)
    """Arrival time of every SSE event that carried non-empty content (text)."""
    end_time: float | None = None
    """When the stream was fully consumed (after `[DONE]` or close)."""
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    error_code: int | None = None
    """HTTP status, an in-stream error's `code`, or -1 for a transport error (as llmperf)."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and bool(self.token_times)

    @property
    def output_tokens(self) -> int:
        """Usage count when the server sent one, else one token per content event."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.send_time if self.token_times else None

    @property
    def e2e(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.send_time

    @property
    def gaps(self) -> list[float]:
        """Time between consecutive content events (vLLM bench's ITL samples)."""
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def tpot(self) -> float | None:
        """vLLM bench: (E2E - TTFT) / (tokens - 1), with E2E to the last content event."""
        if len(self.token_times) < 1 or self.output_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.output_tokens - 1)

    @property
    def llmperf_itl(self) -> float | None:
        """Upstream llmperf: (TTFT + sum of gaps) / output tokens, i.e. E2E to the last token
        spread over every token, the first one's wait included."""
        if not self.token_times or self.output_tokens < 1:
            return None
        return (self.token_times[-1] - self.send_time) / self.output_tokens

    @property
    def neuron_itl(self) -> float | None:
        """llmperf + Neuron's neuron_perf.patch: sum of gaps (TTFT excluded) / (tokens - 1).

        The real tool counts tokens with a tokenizer that adds BOS, i.e. divides by the
        generated count; we divide by (usage tokens - 1), the number of gaps, which is what
        the patch means to compute ("TPOT excluding TTFT").
        """
        if self.output_tokens < 2 or not self.token_times:
            return None
        return sum(self.gaps) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Stats:
    """Mean, linear-interpolation percentiles (numpy's and pandas' default) and standard
    deviations (pandas' sample one, which llmperf reports, and numpy's population one, which
    vLLM bench reports) of a sample."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    min: float
    max: float
    p25: float = math.nan
    p75: float = math.nan
    p95: float = math.nan
    stdev: float = math.nan
    pstdev: float = math.nan

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        data = sorted(values)
        if not data:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(
            count=len(data),
            mean=statistics.fmean(data),
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p99=percentile(data, 99),
            min=data[0],
            max=data[-1],
            p25=percentile(data, 25),
            p75=percentile(data, 75),
            p95=percentile(data, 95),
            stdev=statistics.stdev(data) if len(data) > 1 else math.nan,
            pstdev=statistics.pstdev(data),
        )


def percentile(sorted_data: Sequence[float], q: float) -> float:
    """numpy.percentile(..., method="linear") on already sorted data."""
    if not sorted_data:
        return math.nan
    pos = (len(sorted_data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """The numbers a benchmark report shows; only successful requests enter the statistics."""

    requests: int
    completed: int
    errors: int
    duration_s: float
    output_tokens: int
    ttft_s: Stats
    itl_s: Stats
    """Pooled gaps between content events over all requests (vLLM bench)."""
    itl_neuron_s: Stats
    """Per-request mean gap, TTFT excluded (llmperf with Neuron's patch)."""
    itl_llmperf_s: Stats
    """Per-request (TTFT + gaps) / tokens (upstream llmperf)."""
    tpot_s: Stats
    e2e_s: Stats
    output_throughput_tok_s: float
    requests_per_minute: float
    """llmperf's "Completed Requests Per Minute", the DI tutorial's headline number."""
    error_messages: list[str] = field(default_factory=list)
    error_codes: dict[int, int] = field(default_factory=dict)
    """How many failed requests had each code (llmperf's "Error Code Frequency")."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration: float) -> Summary:
    """llmperf/vLLM-bench metrics from per-request traces; `duration` is the run's wall time."""
    good = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in good)
    per_s = 1.0 / duration if duration > 0 else math.nan
    return Summary(
        requests=len(results),
        completed=len(good),
        errors=len(bad),
        duration_s=duration,
        output_tokens=tokens,
        ttft_s=Stats.of(r.ttft for r in good if r.ttft is not None),
        itl_s=Stats.of(gap for r in good for gap in r.gaps),
        itl_neuron_s=Stats.of(r.neuron_itl for r in good if r.neuron_itl is not None),
        itl_llmperf_s=Stats.of(r.llmperf_itl for r in good if r.llmperf_itl is not None),
        tpot_s=Stats.of(r.tpot for r in good if r.tpot is not None),
        e2e_s=Stats.of(r.e2e for r in good if r.e2e is not None),
        output_throughput_tok_s=tokens * per_s,
        requests_per_minute=len(good) * per_s * 60.0,
        error_messages=sorted({r.error or f"HTTP {r.status}" for r in bad})[:10],
        error_codes=dict(sorted(Counter(failure_code(r) for r in bad).items())),
    )


def failure_code(result: RequestResult) -> int:
    """A failure's code: its own, else the HTTP status, else -1 (e.g. 200 but no token)."""
    if result.error_code is not None:
        return result.error_code
    if result.status is not None and result.status != 200:
        return result.status
    return -1


def make_prompt(tokens: int, index: int = 0) -> str:
    """A prompt of exactly `tokens` tokens for the simulator's tokenizer (BOS + one per word).

    Like llmperf's `number_input_tokens`, the count includes BOS and excludes the chat template.
    `index` rotates the text so every request has its own prompt.
    """
    words = max(tokens - 1, 0)
    start = index % len(_WORDS)
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(words))


def sample_positive_int(rng: random.Random, mean: float, stddev: float) -> int:
    """llmperf's draw: int(N(mean, stddev)), redrawn until positive."""
    value = 0
    while value < 1:
        value = int(rng.gauss(mean, stddev)) if stddev else int(mean)
    return value


def make_requests(
    count: int,
    input_tokens: int,
    output_mean: int,
    output_sd: float = 0.0,
    seed: int = 0,
) -> list[RequestSpec]:
    """Word prompts of an exact size; max_tokens drawn as llmperf draws it."""
    rng = random.Random(seed)
    return [
        RequestSpec(make_prompt(input_tokens, i), sample_positive_int(rng, output_mean, output_sd))
        for i in range(count)
    ]


def request_body(config: LoadConfig, spec: RequestSpec) -> dict[str, Any]:
    """llmperf's body shape for chat (empty system message + user prompt), vLLM's otherwise."""
    body: dict[str, Any] = {"model": config.model, "max_tokens": spec.max_tokens, "stream": True}
    if config.endpoint == "chat":
        body["messages"] = [
            {"role": "system", "content": ""},
            {"role": "user", "content": spec.prompt},
        ]
    else:
        body["prompt"] = spec.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(config.sampling)
    return body


def _content(choice: Mapping[str, Any], endpoint: Endpoint) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return str(delta.get("content") or "")
    return str(choice.get("text") or "")


async def send_request(
    client: httpx.AsyncClient, config: LoadConfig, spec: RequestSpec, index: int
) -> RequestResult:
    """Send one streaming request and record its trace; never raises for HTTP/stream errors."""
    body = orjson.dumps(request_body(config, spec))
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {config.api_key}"}
    url = config.url_for(index)
    result = RequestResult(index=index, send_time=time.perf_counter(), url=url)
    try:
        async with client.stream(
            "POST", url + PATHS[config.endpoint], content=body, headers=headers
        ) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                result.error_code = response.status_code
                return result
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments
                payload = line[5:].strip()
                if payload == "[DONE]":
                    continue
                event = orjson.loads(payload)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    code = error.get("code") if isinstance(error, dict) else None
                    result.error = f"in-stream error: {message}"
                    result.error_code = code if isinstance(code, int) else -1
                    continue
                usage = event.get("usage")
                if usage:
                    result.usage_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens")
                choices = event.get("choices") or []
                if choices and _content(choices[0], config.endpoint):
                    result.token_times.append(now)
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.error_code = -1
    finally:
        result.end_time = time.perf_counter()
    return result


@dataclass
class LoadRun:
    """The traces of one run, in send order, and its wall time (first send to last finish)."""

    results: list[RequestResult]
    duration_s: float

    def summary(self) -> Summary:
        return summarize(self.results, self.duration_s)


def make_client(config: LoadConfig) -> httpx.AsyncClient:
    """One pooled client: a kept-alive connection per worker, so no connect cost per request."""
    limits = httpx.Limits(
        max_connections=config.concurrency,
        max_keepalive_connections=config.concurrency,
        keepalive_expiry=60.0,
    )
    timeout = httpx.Timeout(connect=10.0, read=config.timeout_s, write=30.0, pool=config.timeout_s)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def run_load(
    config: LoadConfig,
    specs: Sequence[RequestSpec],
    client: httpx.AsyncClient | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LoadRun:
    """Send `specs` in order, closed or open loop (see the module docstring); `on_result` sees
    each request as it finishes (a progress bar). Requests never sent (`stop_after_s`) are not
    in the run."""
    if config.concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if config.request_rate is not None and config.request_rate <= 0:
        raise ValueError("request rate must be positive")
    results: list[RequestResult | None] = [None] * len(specs)
    start = time.perf_counter()

    def expired() -> bool:
        limit = config.stop_after_s
        return limit is not None and time.perf_counter() - start >= limit

    async def send(http: httpx.AsyncClient, index: int) -> None:
        result = await send_request(http, config, specs[index], index)
        results[index] = result
        if on_result is not None:
            on_result(result)

    own = client is None
    http = make_client(config) if client is None else client
    try:
        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            if config.request_rate is None:
                next_index = iter(range(len(specs)))

                async def worker() -> None:
                    for index in next_index:  # shared: each index is taken by one worker
                        if expired():
                            return
                        await send(http, index)

                for _ in range(min(config.concurrency, len(specs))):
                    group.create_task(worker())
            else:
                await _arrivals(config, len(specs), group, send, http, expired)
        duration = time.perf_counter() - start
    finally:
        if own:
            await http.aclose()
    return LoadRun([r for r in results if r is not None], duration)


async def _arrivals(
    config: LoadConfig,
    count: int,
    group: asyncio.TaskGroup,
    send: Callable[[httpx.AsyncClient, int], Awaitable[None]],
    http: httpx.AsyncClient,
    expired: Callable[[], bool],
) -> None:
    """Open loop: exponential gaps at `request_rate`; a request waits for a free slot only when
    `concurrency` are in flight (vLLM bench's `--max-concurrency`)."""
    assert config.request_rate is not None
    rng = random.Random(config.arrival_seed)
    slots = asyncio.Semaphore(config.concurrency)

    async def bounded(index: int) -> None:
        async with slots:
            await send(http, index)

    loop = asyncio.get_running_loop()
    due = loop.time()
    for index in range(count):
        if expired():
            return
        group.create_task(bounded(index))
        if index + 1 < count:
            # Each arrival is due at an absolute time: sleeping each gap after the last send
            # would add every timer's lateness to all later arrivals.
            due += rng.expovariate(config.request_rate)
            await asyncio.sleep(max(0.0, due - loop.time()))


async def warm_up(config: LoadConfig, spec: RequestSpec, client: httpx.AsyncClient) -> None:
    """Open `concurrency` pooled connections (and warm server code paths) before measuring."""
    await asyncio.gather(
        *(send_request(client, config, spec, -1) for _ in range(config.concurrency))
    )

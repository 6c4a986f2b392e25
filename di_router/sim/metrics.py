"""vLLM 0.7.2's engine metrics plus the simulator's own (`di_sim:*`).

Names, help texts, label names and buckets are those of `vllm/engine/metrics.py` (`Metrics`)
on branch neuron-2.24-vllm-v0.7.2; they differ from later releases (e.g. TTFT stops at 10 s).
Series vLLM only fills in for features the simulator lacks (speculative decoding, model forward
time, `vllm:tokens_total`) are declared without samples, as vLLM exposes them. vLLM disables
the `_created` series (`prometheus_client.disable_created_metrics()`); `api_server.main` does too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from di_router.sim.sequence import Sequence

# vLLM 0.7.2's histogram buckets (seconds), not the router's (di_router/wire/buckets.py).
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0)
# vLLM's list for enforce_eager; CUDA-graph capture sizes do not exist on Neuron.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8096)
# fmt: on

_REQUEST_TIMES = {
    "e2e": (
        "vllm:e2e_request_latency_seconds",
        "Histogram of end to end request latency in seconds.",
    ),
    "queue": (
        "vllm:request_queue_time_seconds",
        "Histogram of time spent in WAITING phase for request.",
    ),
    "inference": (
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
    ),
    "prefill": (
        "vllm:request_prefill_time_seconds",
        "Histogram of time spent in PREFILL phase for request.",
    ),
    "decode": (
        "vllm:request_decode_time_seconds",
        "Histogram of time spent in DECODE phase for request.",
    ),
    "in_queue": (
        "vllm:time_in_queue_requests",
        "Histogram of time the request spent in the queue in seconds.",
    ),
}
_REQUEST_SIZES = {
    "prompt_tokens": ("vllm:request_prompt_tokens", "Number of prefill tokens processed."),
    "generation_tokens": (
        "vllm:request_generation_tokens",
        "Number of generation tokens processed.",
    ),
    "max_generation_tokens": (
        "vllm:request_max_num_generation_tokens",
        "Histogram of maximum number of requested generation tokens.",
    ),
    "max_tokens": (
        "vllm:request_params_max_tokens",
        "Histogram of the max_tokens request parameter.",
    ),
}
_WITHOUT_SAMPLES = {
    "vllm:tokens_total": (Counter, "Number of prefill plus generation tokens processed."),
    "vllm:spec_decode_num_accepted_tokens_total": (Counter, "Number of accepted tokens."),
    "vllm:spec_decode_num_draft_tokens_total": (Counter, "Number of draft tokens."),
    "vllm:spec_decode_num_emitted_tokens_total": (Counter, "Number of emitted tokens."),
    "vllm:spec_decode_draft_acceptance_rate": (Gauge, "Speulative token acceptance rate."),
    "vllm:spec_decode_efficiency": (Gauge, "Speculative decoding system efficiency."),
}


def _buckets(mantissas: tuple[int, ...], max_value: int) -> tuple[int, ...]:
    """vLLM's `build_buckets`: each mantissa times 1, 10, 100, ... up to `max_value`."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in mantissas:
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class SimMetrics:
    """One registry per server, so several simulators can live in one process (benchmarks)."""

    def __init__(self, model_name: str, max_model_len: int) -> None:
        self.registry = CollectorRegistry()
        self._model = model_name
        registry = self.registry
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
            family = Histogram(name, doc, labels, registry=registry, buckets=tuple(buckets))
            return family.labels(model_name)

        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKEN_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            TPOT_BUCKETS,
        )
        self.request_times = {
            key: histogram(name, doc, REQUEST_LATENCY_BUCKETS)
            for key, (name, doc) in _REQUEST_TIMES.items()
        }
        sizes = _buckets((1, 2, 5), max_model_len)
        self.request_sizes = {
            key: histogram(name, doc, sizes) for key, (name, doc) in _REQUEST_SIZES.items()
        }
        self.request_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", (1, 2, 5, 10, 20)
        )
        for name, doc in (
            ("vllm:model_forward_time_milliseconds", "in the model forward pass in ms."),
            ("vllm:model_execute_time_milliseconds", "in the model execute function in ms."),
        ):
            Histogram(
                name,
                f"Histogram of time spent {doc}",
                labels,
                registry=registry,
                buckets=_buckets((1, 2, 3, 5, 8), 3000),
            )
        for name, (kind, doc) in _WITHOUT_SAMPLES.items():
            kind(name, doc, labels, registry=registry)
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labelnames=["model_name", "finished_reason"],
            registry=registry,
        )
        lora = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["running_lora_adapters", "max_lora", "waiting_lora_adapters"],
            registry=registry,
        )
        lora.labels("", "0", "").set_function(time.time)  # vLLM sets it to the log time
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            ["block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks"],
            registry=registry,
        )
        info.labels(str(max_model_len), "auto", "False", "0").set(1)

    def request_finished(self, seq: Sequence, finish_reason: str, now: float) -> None:
        """The per-request series vLLM records when a request finishes."""
        times = self.request_times
        queued = seq.scheduled_at - seq.arrived_at
        times["e2e"].observe(now - seq.arrived_at)
        times["queue"].observe(queued)
        times["in_queue"].observe(queued)
        times["inference"].observe(now - seq.scheduled_at)
        times["prefill"].observe(seq.first_token_at - seq.scheduled_at)
        times["decode"].observe(now - seq.first_token_at)
        sizes = self.request_sizes
        sizes["prompt_tokens"].observe(seq.prompt_tokens)
        sizes["generation_tokens"].observe(len(seq.generated))
        sizes["max_generation_tokens"].observe(seq.params.max_tokens)
        sizes["max_tokens"].observe(seq.params.max_tokens)
        self.request_n.observe(1)
        self.request_success.labels(self._model, finish_reason).inc()

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read from engine state at scrape time, so it can never drift."""
        Gauge(name, doc, ["model_name"], registry=self.registry).labels(self._model).set_function(
            read
        )

    def counter_from(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A counter whose value the engine already keeps (exposed as `<name>_total`)."""
        self.registry.register(_ReadCounter(name, doc, self._model, read))


class _ReadCounter(Collector):
    def __init__(self, name: str, doc: str, model: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._model, self._read = name, doc, model, read

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=["model_name"])
        family.add_metric([self._model], self._read())
        yield family

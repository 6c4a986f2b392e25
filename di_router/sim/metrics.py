"""vLLM 0.7.2's engine metrics (names, labels, buckets) plus the simulator's KV counters."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from di_router.wire.buckets import REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS


class SimMetrics:
    """One registry per server, so several simulators can live in one process (benchmarks)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._model = model_name
        labels = {"labelnames": ["model_name"], "registry": self.registry}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, **labels).labels(model_name)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            buckets=TTFT_BUCKETS,
            **labels,
        ).labels(model_name)
        self.time_per_output_token = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            buckets=TPOT_BUCKETS,
            **labels,
        ).labels(model_name)
        self.e2e_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency.",
            buckets=REQUEST_LATENCY_BUCKETS,
            **labels,
        ).labels(model_name)
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labelnames=["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.kv_pull_timeouts = counter(
            "di_sim:kv_pull_timeouts", "Consumer requests whose KV entry never appeared."
        )

    def labels_for_success(self, reason: str) -> Counter:
        return self.request_success.labels(self._model, reason)

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

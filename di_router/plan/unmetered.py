"""Engine metrics that record nothing: a plan scrapes no `/metrics`, and Prometheus' locks and
bucket scans cost a quarter of a virtual-time run (its timings come from the traces)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from di_router.sim.metrics import SimMetrics
from di_router.sim.sequence import Sequence


class _Histogram(Histogram):
    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        return None


class _Counter(Counter):
    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        return None


_HISTOGRAM = _Histogram("unrecorded", "not recorded", registry=None)
_COUNTER = _Counter("unrecorded", "not recorded", registry=None)


class Unmetered(SimMetrics):
    """The series the engine writes to, as no-ops; no registry is built (servers of a sweep
    are created by the hundred)."""

    def __init__(self) -> None:  # no super().__init__(): that builds the whole registry
        self.iteration_tokens = _HISTOGRAM
        self.time_to_first_token = _HISTOGRAM
        self.time_per_output_token = _HISTOGRAM
        self.generation_tokens = _COUNTER

    def request_finished(self, seq: Sequence, finish_reason: str, now: float) -> None:
        return None

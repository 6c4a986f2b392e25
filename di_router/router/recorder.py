"""What every finished request leaves behind: its metrics and one access line.

The request lifecycle reports to this narrow interface only, so it needs no handle on the rest
of the router to be counted.
"""

from __future__ import annotations

from collections.abc import Callable

from di_router.router.access_log import write_access_line
from di_router.router.metrics import RouterMetrics
from di_router.router.trace import RequestTrace


class Recorder:
    def __init__(
        self, metrics: RouterMetrics, model_label: Callable[[str | None], str], json_lines: bool
    ) -> None:
        self._metrics = metrics
        self._model_label = model_label
        self._json_lines = json_lines

    def started(self) -> None:
        self._metrics.in_flight.inc()

    def finished(self, trace: RequestTrace) -> None:
        self._metrics.in_flight.dec()
        self._metrics.observe(trace, self._model_label(trace.model))
        write_access_line(trace, self._json_lines)

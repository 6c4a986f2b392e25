"""`observe_all` leaves a histogram exactly as one `observe` per value would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from di_router.router.metrics import observe_all
from di_router.wire.buckets import TPOT_BUCKETS


def test_batched_observations_equal_one_by_one() -> None:
    values = [0.0, 0.001, 0.0105, 0.025, 0.025, 0.3, 7.0, 1e9, TPOT_BUCKETS[3]]
    exposed = []
    for batched in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("itl", "gaps", ("model",), buckets=TPOT_BUCKETS, registry=registry)
        child = histogram.labels("m")
        if batched:
            observe_all(child, values)
            observe_all(child, [])
        else:
            for value in values:
                child.observe(value)
        lines = generate_latest(registry).splitlines()
        exposed.append(b"\n".join(line for line in lines if b"_created" not in line))
    assert exposed[0] == exposed[1]
    assert b'itl_count{model="m"} 9.0' in exposed[1]

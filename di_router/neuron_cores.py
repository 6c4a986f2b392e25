"""NeuronCore range notation shared by the simulator (validation) and the launcher (planning).

`NEURON_RT_VISIBLE_CORES` takes a single core ("3"), a range ("32-63") or a comma list of
either; the Neuron runtime numbers cores absolutely, which is why `neuron_core_offset` exists.
"""

from __future__ import annotations

TRN2_LOGICAL_CORES = 64
"""Logical NeuronCores of a trn2.48xlarge at LNC=2 (the tutorial's default)."""


def parse_visible_cores(spec: str) -> list[int]:
    """Expand a `NEURON_RT_VISIBLE_CORES` value into a sorted list of core ids."""
    cores: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        if not part:
            raise ValueError(f"empty element in core list {spec!r}")
        first, sep, last = part.partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise ValueError(f"invalid core range {part!r} in {spec!r}; use e.g. 0-31 or 32-63")
        lo, hi = int(first), int(last) if sep else int(first)
        if hi < lo:
            raise ValueError(f"core range {part!r} ends before it starts")
        cores.update(range(lo, hi + 1))
    return sorted(cores)


def format_core_range(first: int, count: int) -> str:
    """The `NEURON_RT_VISIBLE_CORES` value for `count` consecutive cores starting at `first`."""
    return f"{first}-{first + count - 1}" if count > 1 else str(first)

"""Which NeuronCores each server gets, checked against the instance before anything starts.

The runtime numbers cores absolutely, so each server's `neuron_core_offset` is derived from the
first core it sees; deriving both from one range is what keeps them from disagreeing.
"""

from __future__ import annotations

from dataclasses import dataclass

from di_router.launcher.settings import OPTIONS, LaunchError, Settings
from di_router.neuron_cores import format_core_range, parse_visible_cores


@dataclass(frozen=True)
class CoreSlot:
    visible_cores: str | None
    """`NEURON_RT_VISIBLE_CORES`, or None to leave the runtime its default (every core)."""
    offset: int
    """`neuron_core_offset`: absolute index of the server's first core."""


def core_slots(settings: Settings, pair: int = 0) -> dict[str, CoreSlot]:
    """The prefill and decode slots of pair `pair` (baseline runs in the prefill slot); on one
    instance pair i takes the (2i)-th and (2i+1)-th blocks of `tp_degree` cores."""
    tp, total, pairs = settings.tp_degree, settings.instance_cores, settings.pairs
    prefill: str | None
    decode: str | None
    if settings.single_instance:
        servers = 2 * pairs
        if servers * tp > total:
            raise LaunchError(
                f"--tp-degree {tp} x {servers} servers ({pairs} prefill + {pairs} decode) needs "
                f"{servers * tp} logical cores but the instance has {total} (--instance-cores): "
                f"use --tp-degree {max(1, total // servers)} or --topology multi-instance"
            )
        if pairs > 1 and (settings.prefill_cores or settings.decode_cores):
            raise LaunchError(
                "--prefill-cores/--decode-cores name one pair's cores; with --pairs "
                f"{pairs} each pair gets the next {2 * tp} cores: leave them out"
            )
        prefill = settings.prefill_cores or format_core_range(2 * pair * tp, tp)
        decode = settings.decode_cores or format_core_range((2 * pair + 1) * tp, tp)
    else:
        if tp > total:
            raise LaunchError(
                f"--tp-degree {tp} needs {tp} logical cores but the instance has {total} "
                f"(--instance-cores): use --tp-degree {total} or fewer"
            )
        prefill, decode = settings.prefill_cores, settings.decode_cores
    slots = {
        "prefill": _slot("prefill_cores", prefill, settings),
        "decode": _slot("decode_cores", decode, settings),
    }
    if prefill is not None and decode is not None and settings.single_instance:
        shared = set(parse_visible_cores(prefill)) & set(parse_visible_cores(decode))
        if shared:
            raise LaunchError(
                f"--prefill-cores {prefill} and --decode-cores {decode} overlap on "
                f"{len(shared)} core(s) starting at {min(shared)}: give each server its own "
                f"cores, e.g. --prefill-cores {format_core_range(0, tp)} "
                f"--decode-cores {format_core_range(tp, tp)}"
            )
    return slots


def _slot(name: str, spec: str | None, settings: Settings) -> CoreSlot:
    if spec is None:
        return CoreSlot(None, 0)
    flag = OPTIONS[name].flag
    try:
        cores = parse_visible_cores(spec)
    except ValueError as exc:
        raise LaunchError(f"{flag} {spec}: {exc}") from None
    first, last, total = cores[0], cores[-1], settings.instance_cores
    if last >= total:
        raise LaunchError(
            f"{flag} {spec}: core {last} does not exist; the instance has cores 0-{total - 1} "
            "(--instance-cores)"
        )
    if cores != list(range(first, last + 1)):
        raise LaunchError(
            f"{flag} {spec}: cores must be one contiguous range because KV is paired core by "
            f"core from neuron_core_offset; use e.g. {format_core_range(first, len(cores))}"
        )
    if len(cores) != settings.tp_degree:
        raise LaunchError(
            f"{flag} {spec} has {len(cores)} cores but --tp-degree is {settings.tp_degree}: "
            f"use {format_core_range(first, settings.tp_degree)} or change --tp-degree"
        )
    return CoreSlot(format_core_range(first, len(cores)), first)

"""Core layout: the tutorial's split, and refusals that say which flag to change."""

from __future__ import annotations

import re

import pytest

from di_router.launcher.server_plan import plan_server
from di_router.launcher.settings import LaunchError
from di_router.launcher.topology import CoreSlot, core_slots
from tests.launcher.launcher_helpers import settings

SERVE = ["serve", "prefill", "--model-path", "/m"]


def test_single_instance_splits_the_instance_in_halves() -> None:
    assert core_slots(settings(SERVE)) == {
        "prefill": CoreSlot("0-31", 0),
        "decode": CoreSlot("32-63", 32),
    }
    assert core_slots(settings([*SERVE, "--tp-degree", "16", "--instance-cores", "32"])) == {
        "prefill": CoreSlot("0-15", 0),
        "decode": CoreSlot("16-31", 16),
    }


def test_multi_instance_uses_every_core_from_zero() -> None:
    slots = core_slots(settings([*SERVE, "--topology", "multi-instance"]))
    assert slots == {"prefill": CoreSlot(None, 0), "decode": CoreSlot(None, 0)}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tp-degree", "64"], "--tp-degree 64 x 2 servers .* needs 128 logical cores"),
        (["--topology", "multi-instance", "--tp-degree", "128"], "use --tp-degree 64 or fewer"),
        (
            ["--prefill-cores", "0-31", "--decode-cores", "16-47"],
            "--prefill-cores 0-31 and --decode-cores 16-47 overlap",
        ),
        (["--decode-cores", "48-79"], "--decode-cores 48-79: core 79 does not exist"),
        (["--decode-cores", "32-47"], "--decode-cores 32-47 has 16 cores but --tp-degree is 32"),
        (["--decode-cores", "32-40,42-63"], "one contiguous range"),
        (["--prefill-cores", "zero"], "--prefill-cores zero: invalid core range"),
    ],
)
def test_layouts_that_do_not_fit_are_refused(flags, message) -> None:
    with pytest.raises(LaunchError, match=message):
        core_slots(settings([*SERVE, *flags]))


def test_multi_instance_needs_both_ips_on_two_hosts() -> None:
    multi = [*SERVE, "--topology", "multi-instance"]
    with pytest.raises(LaunchError, match="--decode-ip is required for multi-instance"):
        plan_server("prefill", settings([*multi, "--prefill-ip", "10.0.0.1"]))
    with pytest.raises(
        LaunchError, match=re.escape("both 10.0.0.1: multi-instance needs two hosts")
    ):
        plan_server(
            "decode", settings([*multi, "--prefill-ip", "10.0.0.1", "--decode-ip", "10.0.0.1"])
        )
    # The baseline has no peer, so it needs no IPs.
    assert plan_server("baseline", settings(multi)).kv_config is None


def test_model_path_is_required() -> None:
    with pytest.raises(LaunchError, match="--model-path is required"):
        plan_server("prefill", settings(["serve", "prefill"]))

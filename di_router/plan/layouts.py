"""Candidate deployments on a budget of trn2.48xlarge instances, and each server's timing.

A layout is either colocated (`servers` baseline servers, requests taken in turn as Neuron's
`llmperf_dp.patch` does) or disaggregated (`prefills` P and `decodes` D servers behind the
router). Every server of a layout has the same tensor-parallel degree and batch (`di-router
compile` builds one artifact per TP degree and batch, used by both roles).

TP degree: the simulator's profiles are named per degree (`<family>-tp32`, `<family>-tp64`),
each with its own published fit, so a degree is a candidate only if its family has a profile
for it; nothing is extrapolated. A profile without a `-tp<N>` suffix (e.g. `instant`) is used as
it is for every degree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from di_router.sim.profiles import PROFILES, TimingProfile

INSTANCE_CORES = 64  # logical NeuronCores of a trn2.48xlarge at LNC=2
TP_DEGREES = (32, 64)
BATCHES = (1, 2, 4, 8, 16)
QUICK_BATCHES = (1, 4, 16)
Kind = Literal["baseline", "di"]
_TP_SUFFIX = re.compile(r"-tp(\d+)$")


@dataclass(frozen=True)
class Layout:
    kind: Kind
    tp: int
    batch: int
    servers: int = 0
    """Colocated servers (baseline only)."""
    prefills: int = 0
    decodes: int = 0

    @property
    def name(self) -> str:
        if self.kind == "baseline":
            return f"{self.servers}x baseline TP{self.tp} b{self.batch}"
        return f"{self.prefills}P{self.decodes}D TP{self.tp} b{self.batch}"

    @property
    def server_count(self) -> int:
        return self.servers + self.prefills + self.decodes

    @property
    def cores(self) -> int:
        return self.server_count * self.tp

    @property
    def instances(self) -> int:
        """trn2.48xlarge instances it occupies (servers never straddle two)."""
        per_instance = INSTANCE_CORES // self.tp
        return -(-self.server_count // per_instance)

    @property
    def static_pairing(self) -> bool:
        """P = D: Neuron 2.24's fixed pairs work; otherwise pairing must be any-to-any."""
        return self.kind == "di" and self.prefills == self.decodes


def family_profiles(name: str) -> dict[int, TimingProfile]:
    """TP degree -> profile for `--sim-profile NAME`: a family (`trn2-llama3.3-70b`) or one of
    its members (`trn2-llama3.3-70b-tp32`) gives every degree the family has; any other
    profile is used for every degree."""
    family = _TP_SUFFIX.sub("", name)
    members = {
        int(match.group(1)): profile
        for key, profile in PROFILES.items()
        if (match := _TP_SUFFIX.search(key)) and _TP_SUFFIX.sub("", key) == family
    }
    if members:
        return {tp: members[tp] for tp in TP_DEGREES if tp in members}
    if name in PROFILES:
        return dict.fromkeys(TP_DEGREES, PROFILES[name])
    raise ValueError(
        f"unknown --sim-profile {name!r}; choose one of {', '.join(sorted(profile_names()))}"
    )


def profile_names() -> set[str]:
    """Every profile and every family name `family_profiles` accepts."""
    return set(PROFILES) | {_TP_SUFFIX.sub("", key) for key in PROFILES if _TP_SUFFIX.search(key)}


def candidates(instances: int, degrees: list[int], batches: tuple[int, ...]) -> list[Layout]:
    """Colocated baselines using the whole budget, and every xPyD that fits in it."""
    layouts: list[Layout] = []
    for tp in degrees:
        fit = instances * INSTANCE_CORES // tp
        for batch in batches:
            if fit >= 1:
                layouts.append(Layout("baseline", tp, batch, servers=fit))
            for prefills in range(1, fit):
                for decodes in range(1, fit - prefills + 1):
                    layouts.append(Layout("di", tp, batch, prefills=prefills, decodes=decodes))
    return layouts

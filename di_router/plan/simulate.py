"""One workload through one layout, on the simulator's own engines, in virtual time.

Every server is the simulator's `Engine` (the code the HTTP servers run), driven on a
`VirtualEventLoop`. What the HTTP layers add is replaced by its in-process equivalent:
- the router: each DI request is sent to a prefill (`max_tokens` 1) and a decode server at once,
  picked by the router's own `Selection` (static pairs when P = D, as Neuron 2.24 pairs them;
  any-to-any otherwise); the client's first token is prefill's, the rest are decode's after
  the token it repeats. The HTTP path's cost is a constant added to every token the client sees
  (`benchmarks/README.md`, router_overhead on 2 cores: a direct request's TTFT about 2 ms, the
  router adds about 6 ms; its per-token relay cost, ~0.04 ms, is left out): small next to
  Trn2's steps of tens of milliseconds, but it is what a real run of the simulators measures;
- the KV side channel: the decode engine's lookup takes the entry from the chosen prefill's
  `KVEntryStore` (the producer's code path), without the TCP hop;
- colocated servers: requests taken in turn, as the load generator does with several URLs;
- the client: `RequestResult` traces timed by the loop's clock, so `loadgen.summarize` (the
  bench's metric definitions) reads them as it reads a real run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from di_router.bench.loadgen import LoadRun, RequestResult, RequestSpec
from di_router.plan import vclock
from di_router.plan.layouts import Layout
from di_router.plan.unmetered import Unmetered
from di_router.router.backends import Backend, BackendPool, Selection
from di_router.sim.clock import Clock
from di_router.sim.engine import Engine, Role
from di_router.sim.kv_channel import KVEntryStore
from di_router.sim.profiles import TimingProfile
from di_router.sim.sequence import (
    SamplingParams,
    SequenceError,
    TokenOutput,
)
from di_router.sim.sequence import (
    Sequence as SimSequence,
)

DIRECT_S = 0.002
"""Client -> server -> client over loopback HTTP, a server's TTFT on the `instant` profile."""
ROUTER_S = 0.006
"""What the router adds to that path."""


@dataclass(frozen=True)
class Load:
    """Closed loop (`concurrency` clients, llmperf) or open loop (Poisson at `request_rate`,
    at most `concurrency` in flight when given), as `loadgen.run_load` sends; or `arrivals`."""

    request_rate: float | None = None
    concurrency: int | None = None
    seed: int = 0
    arrivals: tuple[float, ...] | None = None
    """Each request's send time after the first's, replayed as they are (a measured run's:
    its client's timers run late under load, which is not the servers' doing)."""


class Recorder(asyncio.Queue[tuple[int, TokenOutput | SequenceError]]):
    """A sequence's output queue that timestamps each token instead of waking a reader."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self._clock = clock
        self.times: list[float] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def put_nowait(self, item: tuple[int, TokenOutput | SequenceError]) -> None:
        out = item[1]
        if isinstance(out, TokenOutput):
            self.times.append(self._clock.now())
        if (
            isinstance(out, SequenceError) or out.finish_reason is not None
        ) and not self.done.done():
            self.done.set_result(None)


class Servers:
    """The engines of one layout, and how a request reaches them."""

    def __init__(
        self, layout: Layout, profile: TimingProfile, clock: Clock, seed: int, selection: str
    ) -> None:
        self.layout = layout
        self.clock = clock
        self.engines: list[Engine] = []
        if layout.kind == "baseline":
            self.baselines = [self._engine(Role.BASELINE, profile) for _ in range(layout.servers)]
            return
        self._stores: dict[str, KVEntryStore] = {}
        self._by_backend: dict[Backend, Engine] = {}
        pools = []
        for role, count in ((Role.PREFILL, layout.prefills), (Role.DECODE, layout.decodes)):
            backends = []
            for i in range(count):
                engine = self._engine(role, profile)
                backend = _backend(str(role), f"http://{role}-{i}")
                self._by_backend[backend] = engine
                backends.append(backend)
            pools.append(BackendPool(str(role), backends))
        pairing = "static" if layout.static_pairing else "any"
        self.selection = Selection(pools[0], pools[1], pairing, selection, seed)

    def _engine(self, role: Role, profile: TimingProfile) -> Engine:
        store = None
        lookup = None
        if role is Role.PREFILL:
            store = KVEntryStore(self.clock, 0.0, profile.kv_transfer_seconds)
        elif role is Role.DECODE:
            lookup = self._lookup
        engine = Engine(role, profile, self.layout.batch, Unmetered(), self.clock, store, lookup)
        self.engines.append(engine)
        return engine

    async def _lookup(self, engine_id: str) -> tuple[int, int]:
        """The consumer's pull, in process: the producer's `take` on the chosen prefill."""
        entry = await self._stores.pop(engine_id).take(engine_id)
        return entry.token_id, entry.num_tokens

    async def send(self, index: int, spec: RequestSpec) -> RequestResult:
        result = RequestResult(index=index, send_time=self.clock.now())
        tokens = spec.input_tokens or 1
        engine_id = f"cmpl-{index}-0"
        if self.layout.kind == "baseline":
            result.url = f"baseline-{index % len(self.baselines)}"
            out = self._submit(
                self.baselines[index % len(self.baselines)],
                engine_id,
                index,
                tokens,
                spec.max_tokens,
            )
            await out.done
            result.token_times = [t + DIRECT_S for t in out.times]
        else:
            prefill, decode = self.selection.pick()
            result.url = f"{prefill.url} {decode.url}"
            producer = self._by_backend[prefill]
            assert producer.kv_store is not None
            self._stores[engine_id] = producer.kv_store
            prefill.outstanding += 1
            decode.outstanding += 1
            first = self._submit(producer, engine_id, index, tokens, 1)
            rest = self._submit(self._by_backend[decode], engine_id, index, tokens, spec.max_tokens)
            first.done.add_done_callback(lambda _: _leave(prefill))
            await rest.done
            _leave(decode)
            await first.done
            # The router relays prefill's token, then decode's after the one it repeats.
            path = DIRECT_S + ROUTER_S
            result.token_times = [t + path for t in first.times[:1] + rest.times[1:]]
        result.status = 200
        result.usage_tokens = len(result.token_times)
        result.prompt_tokens = tokens
        result.end_time = result.token_times[-1] if result.token_times else self.clock.now()
        return result

    def _submit(
        self, engine: Engine, engine_id: str, key: int, tokens: int, max_tokens: int
    ) -> Recorder:
        out = Recorder(self.clock)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.submit(SimSequence(engine_id, 0, tokens, key, params, outputs=out))
        return out


def _backend(role: str, url: str) -> Backend:
    """A router `Backend` that is only ever picked, never sent to: healthy, no I/O."""
    transport = httpx.MockTransport(lambda _: httpx.Response(503))
    probe = httpx.AsyncClient(transport=transport, trust_env=False)
    return Backend(role, url, transport, probe, healthy=True)


def _leave(backend: Backend) -> None:
    backend.outstanding -= 1


async def drive(
    layout: Layout,
    profile: TimingProfile,
    specs: Sequence[RequestSpec],
    load: Load,
    clock: Clock,
    on_result: Callable[[RequestResult], Any] | None = None,
    selection: str = "least_outstanding",
) -> LoadRun:
    """Run `specs` through `layout` on whatever loop is running (virtual or real); `selection`
    is the router's `--selection`."""
    servers = Servers(layout, profile, clock, load.seed, selection)
    for engine in servers.engines:
        engine.start()
    results: list[RequestResult | None] = [None] * len(specs)

    async def send(index: int) -> None:
        results[index] = result = await servers.send(index, specs[index])
        if on_result is not None:
            on_result(result)

    start = clock.now()
    try:
        async with asyncio.TaskGroup() as group:
            if load.arrivals is not None:
                await _replay(group, send, load.arrivals, clock)
            elif load.request_rate is None:
                await _closed_loop(group, send, len(specs), load.concurrency or 1)
            else:
                await _open_loop(group, send, len(specs), load, clock)
        duration = clock.now() - start
    finally:
        for engine in servers.engines:
            await engine.stop()
    return LoadRun([r for r in results if r is not None], duration)


async def _closed_loop(
    group: asyncio.TaskGroup, send: Callable[[int], Any], count: int, concurrency: int
) -> None:
    next_index = iter(range(count))

    async def worker() -> None:
        for index in next_index:
            await send(index)

    for _ in range(min(concurrency, count)):
        group.create_task(worker())


async def _open_loop(
    group: asyncio.TaskGroup, send: Callable[[int], Any], count: int, load: Load, clock: Clock
) -> None:
    """Exponential gaps drawn as the load generator draws them (same seed, same arrivals)."""
    assert load.request_rate is not None
    rng = random.Random(load.seed)
    slots = asyncio.Semaphore(load.concurrency or count or 1)

    async def bounded(index: int) -> None:
        async with slots:
            await send(index)

    for index in range(count):
        group.create_task(bounded(index))
        if index + 1 < count:
            await clock.sleep(rng.expovariate(load.request_rate))


async def _replay(
    group: asyncio.TaskGroup, send: Callable[[int], Any], arrivals: Sequence[float], clock: Clock
) -> None:
    start = clock.now()
    for index, offset in enumerate(arrivals):
        await clock.sleep(max(start + offset - clock.now(), 0.0))
        group.create_task(send(index))


def simulate(
    layout: Layout,
    profile: TimingProfile,
    specs: Sequence[RequestSpec],
    load: Load,
    selection: str = "least_outstanding",
) -> LoadRun:
    """`drive` on a fresh virtual loop: its times are virtual seconds."""
    return vclock.run(lambda clock: drive(layout, profile, specs, load, clock, selection=selection))

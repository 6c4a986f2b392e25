"""Continuous batching as vLLM V0 on Neuron schedules it, in simulated time on the event loop.

Roles differ only in which half they run:
- baseline: prefills (one at a time, FIFO, ahead of decode steps, stalling running sequences)
  and decode steps over every running sequence;
- producer (prefill): prefills only; the finished sequence's slot stays pinned in the KV store
  until a consumer pulls it;
- consumer (decode): reserves a slot on arrival, pulls the first token and KV from the producer,
  waits the modelled transfer, emits that token as its own first output, then decodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum

from di_router.sim.kv_channel import KVEntry, KVEntryStore, KVPullTimeoutError
from di_router.sim.metrics import SimMetrics
from di_router.sim.profiles import TimingProfile
from di_router.sim.sequence import Sequence, SequenceError, TokenOutput


class Role(StrEnum):
    BASELINE = "baseline"
    PREFILL = "prefill"
    DECODE = "decode"


PullFn = Callable[[str, float], Awaitable[tuple[int, int]]]


class Engine:
    def __init__(
        self,
        role: Role,
        profile: TimingProfile,
        max_num_seqs: int,
        metrics: SimMetrics,
        kv_store: KVEntryStore | None = None,
        pull: PullFn | None = None,
        kv_timeout_s: float = 30.0,
    ) -> None:
        self.role = role
        self.profile = profile
        self.max_num_seqs = max_num_seqs
        self.metrics = metrics
        self.kv_store = kv_store
        self._pull = pull
        self._kv_timeout_s = kv_timeout_s
        self.slots_in_use = 0
        self.waiting: deque[Sequence] = deque()
        self.prefill_queue: deque[Sequence] = deque()
        self.transferring: dict[Sequence, asyncio.Task[None]] = {}
        self.running: list[Sequence] = []
        self.aborted = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._arrival: dict[Sequence, float] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name=f"sim-engine-{self.role}")

    async def stop(self) -> None:
        for task in [self._loop_task, *self.transferring.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- requests ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        self._arrival[seq] = time.monotonic()
        self.waiting.append(seq)
        self._admit()
        self._wake.set()

    def abort(self, seq: Sequence, client_gone: bool = True) -> None:
        """Drop the sequence wherever it is and free what it holds.

        `client_gone` counts it in `aborted`; a sibling cancelled because another sequence of
        the same request failed (a KV pull timeout) is not a client abort.
        """
        if seq.finished or seq.aborted:
            return
        seq.aborted = True
        self.aborted += client_gone
        self._arrival.pop(seq, None)
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq in self.prefill_queue:
            self.prefill_queue.remove(seq)
        elif seq in self.transferring:
            self.transferring.pop(seq).cancel()
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return  # mid-prefill: the loop sees `aborted` when the prefill step ends
        self._release_slot()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.prefill_queue)

    @property
    def num_running(self) -> int:
        return len(self.running) + len(self.transferring)

    # -- scheduling ----------------------------------------------------------------------------
    def _release_slot(self) -> None:
        self.slots_in_use -= 1
        self._admit()
        self._wake.set()

    def _admit(self) -> None:
        while self.waiting and self.slots_in_use < self.max_num_seqs:
            seq = self.waiting.popleft()
            self.slots_in_use += 1
            if self.role is Role.DECODE:
                self.transferring[seq] = asyncio.create_task(self._receive(seq))
            else:
                self.prefill_queue.append(seq)

    async def _run(self) -> None:
        while True:
            if self.prefill_queue:
                await self._prefill(self.prefill_queue.popleft())
            elif self.running:
                await self._decode_step()
            else:
                self._wake.clear()
                await self._wake.wait()

    async def _prefill(self, seq: Sequence) -> None:
        await asyncio.sleep(self.profile.prefill_seconds(seq.prompt_tokens))
        if seq.aborted:
            self._release_slot()
            return
        token = seq.sample()
        self._emit(seq, seq.append(token))
        if self.role is Role.PREFILL:
            # The slot stays pinned until the consumer has pulled the KV (or the entry expires).
            assert self.kv_store is not None
            self.kv_store.put(
                seq.engine_id, KVEntry(token, seq.prompt_tokens, release=self._release_slot)
            )
        elif seq.finished:
            self._release_slot()
        else:
            self.running.append(seq)

    async def _receive(self, seq: Sequence) -> None:
        assert self._pull is not None
        try:
            token, num_tokens = await self._pull(seq.engine_id, self._kv_timeout_s)
            await asyncio.sleep(self.profile.kv_transfer_seconds(num_tokens))
        except KVPullTimeoutError:
            self.transferring.pop(seq, None)
            self._arrival.pop(seq, None)
            self.metrics.kv_pull_timeouts.inc()
            seq.finished = True
            message = (
                f"KV transfer failed: no prefill entry for engine request id {seq.engine_id!r} "
                f"within {self._kv_timeout_s:g}s (was the same X-Request-Id sent to the prefill "
                "server?)"
            )
            seq.outputs.put_nowait((seq.index, SequenceError(500, message)))
            self._release_slot()
            return
        self.transferring.pop(seq, None)
        # The consumer's first step skips the forward pass and outputs the pulled token.
        self._emit(seq, seq.append(token))
        if seq.finished:
            self._release_slot()
        else:
            self.running.append(seq)
            self._wake.set()

    async def _decode_step(self) -> None:
        batch = list(self.running)
        await asyncio.sleep(self.profile.decode_step_seconds(len(batch)))
        for seq in batch:
            if seq.aborted:
                continue
            self._emit(seq, seq.append(seq.sample()))
            if seq.finished:
                self.running.remove(seq)
                self._release_slot()

    def _emit(self, seq: Sequence, out: TokenOutput) -> None:
        now = time.monotonic()
        arrival = self._arrival.get(seq, now)
        if len(seq.generated) == 1:
            self.metrics.time_to_first_token.observe(now - arrival)
        else:
            self.metrics.time_per_output_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()
        if out.finish_reason is not None:
            self._arrival.pop(seq, None)
            self.metrics.e2e_latency.observe(now - arrival)
            self.metrics.labels_for_success(out.finish_reason).inc()
        seq.outputs.put_nowait((seq.index, out))

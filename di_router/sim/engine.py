"""Continuous batching as vLLM V0 on Neuron schedules it, in simulated time on the event loop.

Roles differ only in which half they run:
- baseline: prefills (one at a time, FIFO, ahead of decode steps, stalling running sequences)
  and decode steps over every running sequence;
- producer (prefill): prefills, then decodes on if `max_tokens` > 1 (vLLM does not refuse it);
  a finished sequence whose KV has not been pulled stays in `transferring` with its slot
  (`Scheduler.free_finished_seq_groups`, `free_transferred_seq_groups`);
- consumer (decode): admission allocates a slot and moves the request to `transferring`
  (`Scheduler._schedule_waiting_to_transferring`); it stays there until its KV arrives, however
  long that takes, then emits the pulled token as its own first output and decodes on.

`Scheduler.abort_seq_group` scans `waiting`, `running` and `swapped`, never `transferring`, so
an abort (client disconnect) of a transferring request does nothing: it keeps its slot, runs
once its KV arrives and finishes with nobody listening. `abort_transferring` departs from that.
(References: `vllm/core/scheduler.py` on branch neuron-2.24-vllm-v0.7.2.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from enum import StrEnum

from di_router.sim.clock import Clock
from di_router.sim.kv_channel import KVEntry, KVEntryStore, KVMissing
from di_router.sim.metrics import SimMetrics
from di_router.sim.profiles import TimingProfile
from di_router.sim.sequence import Sequence, SequenceError, TokenOutput


class Role(StrEnum):
    BASELINE = "baseline"
    PREFILL = "prefill"
    DECODE = "decode"
    NIXL = "nixl"
    """vLLM V1 with NixlConnector: a baseline whose requests may offer or pull KV (per request)."""


LookupFn = Callable[[str], Awaitable[tuple[int, int]]]


class Engine:
    def __init__(
        self,
        role: Role,
        profile: TimingProfile,
        max_num_seqs: int,
        metrics: SimMetrics,
        clock: Clock,
        kv_store: KVEntryStore | None = None,
        lookup: LookupFn | None = None,
        kv_timeout_s: float = 0.0,
        abort_transferring: bool = False,
    ) -> None:
        self.role = role
        self.profile = profile
        self.max_num_seqs = max_num_seqs
        self.metrics = metrics
        self.clock = clock
        self.kv_store = kv_store
        self._lookup = lookup
        self._kv_timeout_s = kv_timeout_s
        self._abort_transferring = abort_transferring
        self.slots_in_use = 0
        self.waiting: deque[Sequence] = deque()
        self.prefill_queue: deque[Sequence] = deque()
        # Decode: waiting for KV (with the task receiving it). Prefill: finished, KV not pulled.
        self.transferring: dict[Sequence, asyncio.Task[None] | None] = {}
        self.running: list[Sequence] = []
        self.aborted = 0
        self.aborts_ignored = 0
        self.kv_timeouts = 0
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._free_at = 0.0
        """When the device ends its current step (see `_busy`)."""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._free_at = self.clock.now()
        self._loop_task = asyncio.create_task(self._run(), name=f"sim-engine-{self.role}")

    async def stop(self) -> None:
        for task in [self._loop_task, *self.transferring.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- requests ------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> None:
        seq.arrived_at = self.clock.now()
        self.waiting.append(seq)
        self._admit()
        self._wake.set()

    def abort(self, seq: Sequence, client_gone: bool = True) -> None:
        """vLLM's abort: drop the sequence from waiting/running and free its slot.

        A sequence in `transferring` is not found (see the module docstring) unless
        `abort_transferring`. `client_gone` counts the abort; a sibling stopped because another
        sequence of the same request failed is not a client abort.
        """
        if seq.finished or seq.aborted:
            return
        if seq in self.transferring and not (self._abort_transferring or seq.v1):
            self.aborts_ignored += client_gone
            return
        seq.aborted = True
        self.aborted += client_gone
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq in self.prefill_queue:
            self.prefill_queue.remove(seq)
        elif seq in self.transferring:
            task = self.transferring.pop(seq)
            if task is not None:
                task.cancel()
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return  # mid-prefill: the loop sees `aborted` when the prefill step ends
        self._release_slot()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.prefill_queue)

    # -- scheduling ----------------------------------------------------------------------------
    def _release_slot(self) -> None:
        self.slots_in_use -= 1
        self._admit()
        self._wake.set()

    def _admit(self) -> None:
        while self.waiting and self.slots_in_use < self.max_num_seqs:
            seq = self.waiting.popleft()
            seq.scheduled_at = self.clock.now()
            self.slots_in_use += 1
            if self.role is Role.DECODE or seq.kv_pull is not None:
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
                self._free_at = self.clock.now()

    async def _busy(self, seconds: float, ready_at: float = 0.0) -> None:
        """One step on the device, for work that arrived at `ready_at`. Back-to-back steps start
        where the previous one ended (or when their work arrived, if later), not when this
        process got round to it: a timer served late on a busy event loop or CPU must not
        stretch the profile's step times (on the virtual clock the two are the same)."""
        self._free_at = max(self._free_at, ready_at) + seconds
        await self.clock.sleep(max(self._free_at - self.clock.now(), 0.0))

    async def _prefill(self, seq: Sequence) -> None:
        await self._busy(self.profile.prefill_seconds(seq.prompt_tokens), seq.arrived_at)
        self.metrics.iteration_tokens.observe(seq.prompt_tokens)
        if seq.aborted:
            self._release_slot()
            return
        token = seq.sample()
        self._emit(seq, seq.append(token))
        if self.role is Role.PREFILL:
            # The KV is offered at the prefill step; the slot stays until it has been pulled.
            self._offer(seq, token)
        self._continue(seq)

    def _offer(self, seq: Sequence, token: int) -> None:
        assert self.kv_store is not None
        seq.kv_pending = True
        self.kv_store.put(
            seq.engine_id, KVEntry(token, seq.prompt_tokens, release=lambda: self._kv_sent(seq))
        )

    def _continue(self, seq: Sequence) -> None:
        """After a sequence's first token: run on, or finish."""
        if seq.finished:
            self._finish(seq)
        else:
            self.running.append(seq)
            self._wake.set()

    def _finish(self, seq: Sequence) -> None:
        if seq.kv_offer and seq.finish_reason == "length":
            # V1 `NixlConnector.request_finished`: only a length-capped request keeps its blocks.
            self._offer(seq, seq.generated[-1])
        if seq.kv_pending:
            self.transferring[seq] = None  # pinned until the consumer has pulled the KV
        else:
            self._release_slot()

    def _kv_sent(self, seq: Sequence) -> None:
        seq.kv_pending = False
        if seq in self.transferring:
            del self.transferring[seq]
            self._release_slot()

    async def _receive(self, seq: Sequence) -> None:
        pull = seq.kv_pull
        if pull is None:
            assert self._lookup is not None
            pull = functools.partial(self._lookup, seq.engine_id)
        try:
            async with asyncio.timeout(self._kv_timeout_s or None):
                token, num_tokens = await pull()
        except TimeoutError:
            self._kv_timed_out(seq)
            return
        except KVMissing as exc:
            self._kv_failed(seq, str(exc))
            return
        await self.clock.sleep(self.profile.kv_transfer_seconds(num_tokens))
        self.transferring.pop(seq, None)
        # V0 (Neuron): the first step skips the forward pass and outputs the pulled token.
        # V1: the consumer recomputes the last prompt token and samples its first token itself.
        self._emit(seq, seq.append(seq.sample() if seq.v1 else token))
        self._continue(seq)

    def _kv_timed_out(self, seq: Sequence) -> None:
        """`--sim-kv-timeout` only: fail the request instead of waiting for its KV forever."""
        self.kv_timeouts += 1
        self._kv_failed(
            seq,
            f"KV transfer failed: no prefill entry for engine request id {seq.engine_id!r} "
            f"within {self._kv_timeout_s:g}s (was the same X-Request-Id sent to the prefill "
            "server?)",
        )

    def _kv_failed(self, seq: Sequence, message: str) -> None:
        """The request fails and frees its slot (V1's `kv_load_failure_policy` "fail")."""
        self.transferring.pop(seq, None)
        seq.finished = True
        seq.outputs.put_nowait((seq.index, SequenceError(500, message)))
        self._release_slot()

    async def _decode_step(self) -> None:
        batch = list(self.running)
        await self._busy(self.profile.decode_step_seconds(len(batch)))
        self.metrics.iteration_tokens.observe(len(batch))
        for seq in batch:
            if seq.aborted:
                continue
            self._emit(seq, seq.append(seq.sample()))
            if seq.finished:
                self.running.remove(seq)
                self._finish(seq)

    def _emit(self, seq: Sequence, out: TokenOutput) -> None:
        now = self.clock.now()
        if len(seq.generated) == 1:
            seq.first_token_at = now
            self.metrics.time_to_first_token.observe(now - seq.arrived_at)
        else:
            self.metrics.time_per_output_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()
        if out.finish_reason is not None:
            self.metrics.request_finished(seq, out.finish_reason, now)
        seq.outputs.put_nowait((seq.index, out))

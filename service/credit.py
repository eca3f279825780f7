"""One worker's side of the cluster's shared quotas ([cluster], service.cluster): credit fetched for
what the gate set aside, this host's totals reported, and the global harvest guard asked before a
bad answer leaves the host.

The gate spends the host's credit in the shared quota slot (fastpath.quota.CreditFile) under the
slot's mutex, with no Redis call. A lookup it holds no credit for is set aside (SHORT): this module
takes a block for the practitioner (one Redis round trip, coalesced per slot), and the server asks
the gate again in the mode the reply calls for: LIMIT when Redis answered, BACKEND when it did not
(the host has spent what it held: UNAVAILABLE, QUOTA_BACKEND_UNAVAILABLE), OPEN with the explicit
fail-open opt-in. A background task reports this host's totals every report interval and gives
unused credit back after a while without lookups.

What a host reports is its totals for the day (lookups counted, new beneficiaries), read from its
slot, and what it was granted as it knows it: a report that times out but was applied, or is sent
twice, changes nothing. Only the beneficiaries themselves (pseudonyms, for the day's set: adding
one twice is harmless) and the guard's outcomes (numbered) travel as deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastpath import Practitioner, rules
from fastpath.quota import (
    CREDIT_RING,
    DISTINCT_CAPACITY,
    FLAG_SUSPENDED,
    SHADOW_GUARD,
    SLOT_HEAD,
    CreditFile,
    QuotaFile,
)
from service.cluster import Backend, BackendUnavailable, ClusterSettings, CreditReply, CreditRequest

log = logging.getLogger("covergate.credit")

MAX_BLOCK = 100_000  # the largest block a busy practitioner's pace asks for

# The global guard's verdict on a call's bad outcomes.
GUARD_OK, GUARD_FIRED, GUARD_UNAVAILABLE = 0, 1, 2


def _outcomes(bits: int, n: int) -> str:
    """The credit file's outcome bits (newest in bit 0) as the guard script reads them."""
    return "".join("1" if bits >> i & 1 else "0" for i in range(n - 1, -1, -1))


@dataclass
class Snapshot:
    """A slot's totals for the day, and the deltas taken out of it (put back if Redis fails)."""

    used: int = 0
    distinct_used: int = 0
    granted: int = 0
    distinct_granted: int = 0
    held_daily: int = 0
    rate_tokens: int = 0  # valid ones still held
    ring: list[int] = field(default_factory=list)


class CreditAgent:
    """Per worker. `files` returns the worker's current (QuotaFile, CreditFile): a worker maps them
    again when practitioners are added."""

    def __init__(
        self,
        settings: ClusterSettings,
        files: Callable[[], tuple[QuotaFile, CreditFile]],
        backend: Backend | None = None,
    ) -> None:
        self.settings = settings
        self._files = files
        self.backend = backend if backend is not None else Backend(settings)
        self.touched: dict[int, tuple[Practitioner, int, float]] = {}  # slot: (who, day, last)
        self._reported: dict[int, tuple[int, int, int]] = {}  # slot: (day, used, distinct)
        self._guard_pending: dict[int, tuple[int, str]] = {}  # slot: (number, outcomes)
        self._numbers = itertools.count(1)
        self._inflight: dict[int, asyncio.Future[int]] = {}
        self._rebuild: set[int] = set()
        # Per slot: (lookups used so far, when, smoothed lookups per second), to size blocks.
        self._pace: dict[int, tuple[int, float, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._lease_ms = int(settings.credit_lease_seconds * 1000)
        self._rate_ms = int(settings.rate_lease_seconds * 1000)
        self._idle = max(1.0, 4 * settings.report_interval_seconds)
        self.lookups_reported = 0  # for "Redis calls per 1,000 lookups"

    @property
    def degraded(self) -> bool:
        return self.backend.breaker.degraded

    def _no_backend_mode(self) -> int:
        return rules.CREDIT_OPEN if self.settings.fail_open else rules.CREDIT_BACKEND

    # -- the slot ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, slot: int) -> Iterator[tuple[QuotaFile, CreditFile]]:
        quota, credit = self._files()
        quota.lock(slot)
        try:
            yield quota, credit
        finally:
            quota.unlock(slot)

    def _snapshot(self, slot: int, today: int, *, give_back: bool = False) -> Snapshot:
        """The slot's totals, and its new beneficiaries taken out of the ring."""
        with self._locked(slot) as (quota, credit):
            state = quota.read(slot)
            quota.roll_day(slot, state, today)
            quota.write(slot, state)
            cs = credit.read(slot)
            credit.roll_day(cs, today)
            granted, distinct_granted = credit.totals(slot, today)
            snap = Snapshot(
                used=state.daily_count, distinct_used=state.distinct_count, granted=granted,
                distinct_granted=distinct_granted, held_daily=cs.daily,
                rate_tokens=cs.rate_tokens if cs.rate_expiry_ms > time.time() * 1000 else 0,
                ring=credit.ring(slot, cs),
            )  # fmt: skip
            cs.ring_len = 0
            if give_back:
                cs.daily = cs.distinct = 0
            credit.write(slot, cs)
        return snap

    def _put_back(self, slot: int, today: int, ring: list[int]) -> None:
        """Redis did not answer: the new beneficiaries go with the next call."""
        with self._locked(slot) as (_quota, credit):
            cs = credit.read(slot)
            if cs.day != today:
                return
            for fp in ring:
                if cs.ring_len < CREDIT_RING:
                    credit.push(slot, cs, fp)
            credit.write(slot, cs)

    def _table(self, slot: int) -> list[int]:
        """Every beneficiary this host saw today (its whole day, for a rebuild)."""
        with self._locked(slot) as (quota, _credit):
            base = quota.offset(slot) + SLOT_HEAD
            table = quota.map[base : base + 8 * DISTINCT_CAPACITY]
        fps = (int.from_bytes(table[i : i + 8], "little") for i in range(0, len(table), 8))
        return [fp for fp in fps if fp]

    def _apply(self, slot: int, today: int, reply: CreditReply, started_ms: int) -> None:
        with self._locked(slot) as (quota, credit):
            state = quota.read(slot)
            quota.roll_day(slot, state, today)
            cs = credit.read(slot)
            credit.roll_day(cs, today)
            # What is left of the grants: granted in all, less what this host has used.
            cs.daily = max(0, reply.granted - state.daily_count)
            cs.distinct = max(0, reply.distinct_granted - state.distinct_count)
            credit.set_totals(slot, today, reply.granted, reply.distinct_granted)
            cs.lease_expiry_ms = started_ms + self._lease_ms  # Redis's ends later than this
            if reply.rate:
                cs.rate_tokens = reply.rate  # older tokens are dropped: each is spent within L
                cs.rate_expiry_ms = started_ms + self._rate_ms
            if cs.epoch and cs.epoch != reply.epoch and reply.status != CreditReply.LEARNING:
                self._rebuild.add(slot)  # Redis lost the state this host reported to
            cs.epoch = reply.epoch
            credit.write(slot, cs)
            for fp in reply.members:
                # Everyone seen today anywhere: a repeat beneficiary needs no distinct slot.
                quota.seen_or_add(slot, fp or 1, True)
            if reply.suspended and not state.flags & FLAG_SUSPENDED:
                state.flags |= FLAG_SUSPENDED
            quota.write(slot, state)

    # -- Redis ---------------------------------------------------------------------------------

    async def _take(
        self, who: Practitioner, today: int, snap: Snapshot, *, give_back: bool = False,
        **wants: Any,
    ) -> CreditReply:  # fmt: skip
        """One credit call with this host's totals (and the rebuild a lost state calls for)."""
        slot = who.slot
        profile = who.quota
        assert profile is not None
        rebuild = slot in self._rebuild
        pseudonyms = self._table(slot) if rebuild else snap.ring

        def request(rebuild: bool, pseudonyms: list[int]) -> CreditRequest:
            return CreditRequest(
                practitioner_id=who.practitioner_id, day=today, daily_limit=profile.daily_limit,
                distinct_limit=profile.distinct_limit, interval_ms=profile.interval_ms,
                tolerance_ms=profile.tolerance_ms, used=snap.used,
                granted=0 if rebuild else snap.granted, distinct_used=snap.distinct_used,
                distinct_granted=0 if rebuild else snap.distinct_granted, give_back=give_back,
                rebuild=rebuild, pseudonyms=tuple(pseudonyms), **wants,
            )  # fmt: skip

        started_ms = int(time.time() * 1000)
        reply = await self.backend.take(request(rebuild, pseudonyms))
        if reply.status == CreditReply.LOST:
            log.warning("Redis lost the quota state of a practitioner: rebuilding from this host")
            reply = await self.backend.take(request(True, self._table(slot)))
            rebuild = True
        if reply.status != CreditReply.DAY_BEHIND:
            if rebuild:
                self._rebuild.discard(slot)
            self._apply(slot, today, reply, started_ms)
            previous = self._reported.get(slot, (today, 0, 0))
            if previous[0] == today:
                self.lookups_reported += max(0, snap.used - previous[1])
            self._reported[slot] = (today, snap.used, snap.distinct_used)
        return reply

    async def refill(self, who: Practitioner, today: int, need: int) -> int:
        """Credit for `need` lookups set aside: the credit mode to ask the gate again in."""
        slot = who.slot
        pending = self._inflight.get(slot)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = future
        mode = self._no_backend_mode()
        try:
            mode = await self._refill(who, today, need)
        finally:
            self._inflight.pop(slot, None)
            future.set_result(mode)
        return mode

    async def _refill(self, who: Practitioner, today: int, need: int) -> int:
        profile = who.quota
        assert profile is not None
        block = self.settings.block_max
        per_lease = profile.rate_per_minute * self.settings.rate_lease_seconds / 60
        snap = self._snapshot(who.slot, today)
        # A busy practitioner's block lasts about a second of its own pace (Redis still cuts it
        # to a share of what is left near the limit): one round trip per second, not per 64.
        now = time.monotonic()
        used_before, at, pace = self._pace.get(who.slot, (snap.used, now, 0.0))
        if now > at:
            pace = 0.5 * pace + 0.5 * max(0, snap.used - used_before) / (now - at)
        self._pace[who.slot] = (snap.used, now, pace)
        block = max(block, min(int(pace), MAX_BLOCK))
        # Rate tokens only when short of them: each is taken from the global GCRA (so asking
        # for more never admits more than r * (w + L) + burst), and unused ones are thrown away
        # when new ones come. A busy practitioner asks for a lease of its own pace, as for the
        # daily block: one round trip per lease, not one per r * L lookups.
        paced = min(int(pace * self.settings.rate_lease_seconds), MAX_BLOCK)
        want_rate = 0 if snap.rate_tokens >= need else max(need, int(per_lease) + 1, paced)
        try:
            reply = await self._take(
                who, today, snap,
                want_daily=max(4 * need, block), need_daily=need,
                want_distinct=min(max(2 * need, block), CREDIT_RING),
                need_distinct=min(need, CREDIT_RING),
                want_rate=want_rate, members_wanted=True,
            )  # fmt: skip
        except BackendUnavailable:
            self._put_back(who.slot, today, snap.ring)
            return self._no_backend_mode()
        self.touched[who.slot] = (who, today, time.monotonic())
        if reply.status in (CreditReply.LEARNING, CreditReply.DAY_BEHIND):
            return self._no_backend_mode()
        return rules.CREDIT_LIMIT

    async def _send_guard(self, who: Practitioner, today: int) -> tuple[int, bool]:
        """The slot's guard outcomes not yet reported, to the global window: (verdict,
        suspended). A report that failed is sent again with its number."""
        profile = who.quota
        assert profile is not None
        slot = who.slot
        pending = self._guard_pending.pop(slot, None)
        if pending is None:
            with self._locked(slot) as (_quota, credit):
                cs = credit.read(slot)
                credit.roll_day(cs, today)
                bits, n = cs.outcomes_bits, cs.outcomes_len
                cs.outcomes_bits = cs.outcomes_len = 0
                credit.write(slot, cs)
            if not n:
                return GUARD_OK, False
            pending = (next(self._numbers), _outcomes(bits, n))
        number, outcomes = pending
        try:
            reply = await self.backend.guard(
                who.practitioner_id, outcomes, profile.guard_window, profile.guard_min_lookups,
                profile.guard_bad_percent, bool(profile.shadow & SHADOW_GUARD), number,
            )  # fmt: skip
        except BackendUnavailable:
            self._guard_pending[slot] = pending
            return GUARD_UNAVAILABLE, False
        if reply.fired or reply.suspended:
            with self._locked(slot) as (quota, _credit):
                state = quota.read(slot)
                state.flags |= FLAG_SUSPENDED
                quota.write(slot, state)
            return GUARD_FIRED, True
        return GUARD_OK, False

    async def guard(self, who: Practitioner, today: int) -> int:
        """The global harvest guard on the outcomes not yet reported (this call's bad ones among
        them), before the call is answered: GUARD_OK, GUARD_FIRED (refuse it, suspended), or
        GUARD_UNAVAILABLE (fail closed: NO_MATCH answers need the guard; fail-open admits)."""
        verdict, _ = await self._send_guard(who, today)
        if verdict == GUARD_UNAVAILABLE and self.settings.fail_open:
            return GUARD_OK
        return verdict

    # -- reports -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.report_interval_seconds)
            try:
                await self.report()
            except Exception:  # a report must never take the worker down
                log.exception("cluster report failed; retrying at the next interval")

    async def report(self) -> None:
        """Each touched slot's totals to Redis when they moved; unused credit back after a
        while idle."""
        now = time.monotonic()
        for slot, (who, day, last) in list(self.touched.items()):
            idle = now - last > self._idle
            snap = self._snapshot(slot, day, give_back=idle)
            moved = self._reported.get(slot) != (day, snap.used, snap.distinct_used)
            holds = snap.granted > snap.used or snap.distinct_granted > snap.distinct_used
            if moved or snap.ring or slot in self._rebuild or (idle and holds):
                try:
                    await self._take(who, day, snap, give_back=idle)
                except BackendUnavailable:
                    self._put_back(slot, day, snap.ring)
                    continue
            with contextlib.suppress(BackendUnavailable):
                await self._send_guard(who, day)
            if idle and slot not in self._guard_pending:
                self.touched.pop(slot, None)

    async def share_new(self, who: Practitioner, today: int) -> None:
        """The beneficiaries this host just saw for the first time, into the day's set before
        the answer leaves: another host then knows them as repeat beneficiaries at the cap."""
        _quota, credit = self._files()
        if not credit.read(who.slot).ring_len:
            return
        snap = self._snapshot(who.slot, today)
        try:
            await self._take(who, today, snap)
        except BackendUnavailable:
            self._put_back(who.slot, today, snap.ring)

    def holds(self, who: Practitioner, need: int) -> bool:
        """Whether this host holds the daily credit and rate tokens for `need` lookups now (read
        without the lock: a hint that saves a batch being set aside in part)."""
        _quota, credit = self._files()
        cs = credit.read(who.slot)
        now_ms = time.time() * 1000
        return (cs.daily >= need and cs.lease_expiry_ms > now_ms
                and cs.rate_tokens >= need and cs.rate_expiry_ms > now_ms)  # fmt: skip

    def seen(self, who: Practitioner, today: int) -> None:
        self.touched[who.slot] = (who, today, time.monotonic())

    async def close(self) -> None:
        """Report the totals and give the rest back (a worker stopping)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.touched = {s: (w, d, 0.0) for s, (w, d, _) in self.touched.items()}  # all idle
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.report(), 2.0)
        await self.backend.close()

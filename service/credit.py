"""One worker's side of the cluster's shared quotas ([cluster], service.cluster): credit fetched for
what the gate set aside, what it spent reported, and the global harvest guard asked before a bad
answer leaves the host.

The gate spends the host's credit in the shared quota slot (fastpath.quota.CreditFile) under the
slot's mutex, with no Redis call. A lookup it holds no credit for is set aside (SHORT): this module
takes a block for the practitioner (one Redis round trip, coalesced per slot), and the server asks
the gate again in the mode the reply calls for: LIMIT when Redis answered, BACKEND when it did not
(the host has spent what it held: UNAVAILABLE, QUOTA_BACKEND_UNAVAILABLE), OPEN with the explicit
fail-open opt-in. A background task reports what was spent every report interval and gives unused
credit back after a while without lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
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

# The global guard's verdict on a call's bad outcomes.
GUARD_OK, GUARD_FIRED, GUARD_UNAVAILABLE = 0, 1, 2


@dataclass
class Drained:
    """What a slot had spent and not reported, taken out of it (put back if Redis fails)."""

    used: int = 0
    ring: list[int] = field(default_factory=list)
    outcomes: str = ""  # "0" good, "1" bad, oldest first
    returned_daily: int = 0
    returned_distinct: int = 0
    epoch: int = 0
    rate_tokens: int = 0  # valid ones still held (not reported: for sizing a refill)

    def empty(self) -> bool:
        return not (self.used or self.ring or self.outcomes or self.returned_daily
                    or self.returned_distinct)  # fmt: skip


def _outcomes(bits: int, n: int) -> str:
    """The credit file's outcome bits (newest in bit 0) as the guard script reads them."""
    return "".join("1" if bits >> i & 1 else "0" for i in range(n - 1, -1, -1))


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
        self._inflight: dict[int, asyncio.Future[int]] = {}
        self._rebuild: set[int] = set()
        self.reported = 0  # lookups reported to Redis, for "Redis calls per 1,000 lookups"
        self._task: asyncio.Task[None] | None = None
        self._lease_ms = int(settings.credit_lease_seconds * 1000)
        self._rate_ms = int(settings.rate_lease_seconds * 1000)
        self._idle = max(1.0, 4 * settings.report_interval_seconds)

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

    def _drain(self, slot: int, today: int, *, idle: bool = False) -> Drained:
        with self._locked(slot) as (_quota, credit):
            cs = credit.read(slot)
            credit.roll_day(cs, today)
            bits = cs.outcomes_bits
            drained = Drained(
                used=cs.used,
                ring=credit.ring(slot, cs),
                outcomes=_outcomes(bits, cs.outcomes_len),
                epoch=cs.epoch,
                rate_tokens=cs.rate_tokens if cs.rate_expiry_ms > time.time() * 1000 else 0,
            )
            cs.used = cs.ring_len = cs.outcomes_len = cs.outcomes_bits = 0
            if idle:
                drained.returned_daily, drained.returned_distinct = cs.daily, cs.distinct
                cs.daily = cs.distinct = 0
            credit.write(slot, cs)
        return drained

    def _undrain(self, slot: int, today: int, drained: Drained) -> None:
        """Redis did not take it: back into the slot, to go with the next report."""
        with self._locked(slot) as (_quota, credit):
            cs = credit.read(slot)
            if cs.day != today:
                return  # another day: what was spent yesterday can no longer be reported
            cs.used += drained.used
            cs.daily += drained.returned_daily
            cs.distinct += drained.returned_distinct
            for fp in drained.ring:
                if cs.ring_len < CREDIT_RING:
                    credit.push(slot, cs, fp)
            older = drained.outcomes[-64:]
            bits = int(older or "0", 2)
            cs.outcomes_bits = ((bits << cs.outcomes_len) | cs.outcomes_bits) & ((1 << 64) - 1)
            cs.outcomes_len = min(64, cs.outcomes_len + len(older))
            credit.write(slot, cs)

    def _day_totals(self, slot: int) -> tuple[int, list[int]]:
        """This host's whole day for the slot: lookups, and every beneficiary in its table."""
        with self._locked(slot) as (quota, _credit):
            state = quota.read(slot)
            base = quota.offset(slot) + SLOT_HEAD
            table = quota.map[base : base + 8 * DISTINCT_CAPACITY]
        fps = [int.from_bytes(table[i : i + 8], "little") for i in range(0, len(table), 8)]
        return state.daily_count, [fp for fp in fps if fp]

    def _apply(self, slot: int, today: int, reply: CreditReply, started_ms: int) -> None:
        with self._locked(slot) as (quota, credit):
            cs = credit.read(slot)
            credit.roll_day(cs, today)
            cs.daily += reply.daily
            cs.distinct += reply.distinct
            cs.lease_expiry_ms = started_ms + self._lease_ms  # Redis's ends later than this
            if reply.rate:
                cs.rate_tokens = reply.rate  # older tokens are dropped: each is spent within L
                cs.rate_expiry_ms = started_ms + self._rate_ms
            if cs.epoch and cs.epoch != reply.epoch:
                self._rebuild.add(slot)  # Redis lost the state this host reported to
            cs.epoch = reply.epoch
            credit.write(slot, cs)
            for fp in reply.members:
                # Everyone seen today anywhere: a repeat beneficiary needs no distinct slot.
                quota.seen_or_add(slot, fp or 1, True)
            if reply.suspended:
                state = quota.read(slot)
                if not state.flags & FLAG_SUSPENDED:
                    state.flags |= FLAG_SUSPENDED
                    quota.write(slot, state)

    # -- Redis ---------------------------------------------------------------------------------

    def _request(
        self, who: Practitioner, today: int, drained: Drained, **more: Any
    ) -> CreditRequest:
        profile = who.quota
        assert profile is not None
        return CreditRequest(
            practitioner_id=who.practitioner_id, day=today, daily_limit=profile.daily_limit,
            distinct_limit=profile.distinct_limit, interval_ms=profile.interval_ms,
            tolerance_ms=profile.tolerance_ms, used=drained.used,
            returned_daily=drained.returned_daily, returned_distinct=drained.returned_distinct,
            pseudonyms=tuple(drained.ring), **more,
        )  # fmt: skip

    async def _take(self, who: Practitioner, today: int, drained: Drained,
                    **more: Any) -> CreditReply:  # fmt: skip
        """One credit call, and the rebuild it may call for (the state was lost)."""
        slot = who.slot
        started_ms = int(time.time() * 1000)
        rebuild = slot in self._rebuild
        if rebuild:
            used, fps = self._day_totals(slot)
            drained = Drained(used=used, ring=fps)
        reply = await self.backend.take(self._request(who, today, drained, rebuild=rebuild, **more))
        if not rebuild and reply.status != CreditReply.LOST:
            self.reported += drained.used
        if reply.status == CreditReply.LOST:
            log.warning("Redis lost the quota state of a practitioner: rebuilding from this host")
            self._rebuild.add(slot)
            used, fps = self._day_totals(slot)
            reply = await self.backend.take(
                self._request(who, today, Drained(used=used, ring=fps), rebuild=True, **more)
            )
        if reply.status != CreditReply.DAY_BEHIND:
            if rebuild or reply.status == CreditReply.LEARNING:
                self._rebuild.discard(slot)
            self._apply(slot, today, reply, started_ms)
        return reply

    async def refill(self, who: Practitioner, today: int, need: int) -> int:
        """Credit for `need` lookups set aside: the credit mode to ask the gate again in."""
        slot = who.slot
        pending = self._inflight.get(slot)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._inflight[slot] = future
        try:
            mode = await self._refill(who, today, need)
        except BaseException:
            mode = self._no_backend_mode()
            raise
        finally:
            self._inflight.pop(slot, None)
            future.set_result(mode)
        return mode

    async def _refill(self, who: Practitioner, today: int, need: int) -> int:
        profile = who.quota
        assert profile is not None
        block = self.settings.block_max
        per_lease = profile.rate_per_minute * self.settings.rate_lease_seconds / 60
        drained = self._drain(who.slot, today)
        # Rate tokens only when short of them: each is taken from the global GCRA, and unused
        # ones are thrown away when new ones come.
        want_rate = 0 if drained.rate_tokens >= need else max(need, int(per_lease) + 1)
        try:
            reply = await self._take(
                who, today, drained,
                want_daily=max(2 * need, block), need_daily=need,
                want_distinct=min(max(2 * need, block), CREDIT_RING),
                need_distinct=min(need, CREDIT_RING),
                want_rate=want_rate, members_wanted=True,
            )  # fmt: skip
        except BackendUnavailable:
            self._undrain(who.slot, today, drained)
            return self._no_backend_mode()
        self.touched[who.slot] = (who, today, time.monotonic())
        if reply.status in (CreditReply.LEARNING, CreditReply.DAY_BEHIND):
            return self._no_backend_mode()
        return rules.CREDIT_LIMIT

    async def guard(self, who: Practitioner, today: int) -> int:
        """The global harvest guard on the outcomes not yet reported (this call's bad ones among
        them), before the call is answered: GUARD_OK, GUARD_FIRED (refuse it, suspended), or
        GUARD_UNAVAILABLE (fail closed: NO_MATCH answers need the guard)."""
        profile = who.quota
        assert profile is not None
        slot = who.slot
        drained = Drained()
        with self._locked(slot) as (_quota, credit):
            cs = credit.read(slot)
            credit.roll_day(cs, today)
            bits, n = cs.outcomes_bits, cs.outcomes_len
            cs.outcomes_bits = cs.outcomes_len = 0
            credit.write(slot, cs)
        drained.outcomes = _outcomes(bits, n)
        if not drained.outcomes:
            return GUARD_OK
        try:
            reply = await self.backend.guard(
                who.practitioner_id, drained.outcomes, profile.guard_window,
                profile.guard_min_lookups, profile.guard_bad_percent,
                bool(profile.shadow & SHADOW_GUARD),
            )  # fmt: skip
        except BackendUnavailable:
            self._undrain(slot, today, drained)
            return GUARD_OK if self.settings.fail_open else GUARD_UNAVAILABLE
        if reply.fired or reply.suspended:
            with self._locked(slot) as (quota, _credit):
                state = quota.read(slot)
                state.flags |= FLAG_SUSPENDED
                quota.write(slot, state)
            return GUARD_FIRED
        return GUARD_OK

    # -- reports -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.report_interval_seconds)
            with contextlib.suppress(Exception):
                await self.report()

    async def report(self) -> None:
        """What each touched slot spent, to Redis; unused credit back after a while idle."""
        now = time.monotonic()
        for slot, (who, day, last) in list(self.touched.items()):
            idle = now - last > self._idle
            drained = self._drain(slot, day, idle=idle)
            if drained.empty() and slot not in self._rebuild:
                if idle:
                    del self.touched[slot]
                continue
            outcomes, drained.outcomes = drained.outcomes, ""
            try:
                await self._take(who, day, drained)
                if outcomes:
                    profile = who.quota
                    assert profile is not None
                    reply = await self.backend.guard(
                        who.practitioner_id, outcomes, profile.guard_window,
                        profile.guard_min_lookups, profile.guard_bad_percent,
                        bool(profile.shadow & SHADOW_GUARD),
                    )  # fmt: skip
                    if reply.fired or reply.suspended:
                        with self._locked(slot) as (quota, _credit):
                            state = quota.read(slot)
                            state.flags |= FLAG_SUSPENDED
                            quota.write(slot, state)
            except BackendUnavailable:
                drained.outcomes = outcomes
                self._undrain(slot, day, drained)
            if idle:
                self.touched.pop(slot, None)

    def seen(self, who: Practitioner, today: int) -> None:
        self.touched[who.slot] = (who, today, time.monotonic())

    async def close(self) -> None:
        """Report what was spent and give the rest back (a worker stopping)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.touched = {s: (w, d, 0.0) for s, (w, d, _) in self.touched.items()}  # all idle
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.report(), 2.0)
        await self.backend.close()

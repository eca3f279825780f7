"""The cluster's Redis protocol (service.cluster) against a real redis-server started by the test:
credit blocks never let two hosts together pass a limit, expired leases go back, a repeat
beneficiary costs no distinct slot, rate tokens follow Redis's clock, the global guard trips, the
circuit breaker opens, and a lost state is reported.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import RedisServer

from service import cluster as cl

DAY = 20261201
PID = "10001234567"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


def backend(server: RedisServer, host: str, **settings: Any) -> cl.Backend:
    return cl.Backend(cl.ClusterSettings(redis=server.url, host_id=host, timeout_ms=500,
                                         **settings))  # fmt: skip


def request(**kw: Any) -> cl.CreditRequest:
    values: dict[str, Any] = {
        "practitioner_id": PID, "day": DAY, "daily_limit": 100, "distinct_limit": 10,
        "interval_ms": 1, "tolerance_ms": 10_000,
    }  # fmt: skip
    values.update(kw)
    return cl.CreditRequest(**values)


class Host:
    """A host as Redis sees it: its totals for the day, reported with every call."""

    def __init__(self, server: RedisServer, name: str, **settings: Any) -> None:
        self.backend = backend(server, name, **settings)
        self.used = self.granted = self.distinct_used = self.distinct_granted = 0

    @property
    def held(self) -> int:
        return self.granted - self.used

    async def take(self, **kw: Any) -> cl.CreditReply:
        reply = await self.backend.take(
            request(
                used=self.used,
                granted=self.granted,
                distinct_used=self.distinct_used,
                distinct_granted=self.distinct_granted,
                **kw,
            )
        )
        if reply.status in (cl.CreditReply.OK, cl.CreditReply.LEARNING):
            self.granted, self.distinct_granted = reply.granted, reply.distinct_granted
        return reply

    async def close(self) -> None:
        await self.backend.close()


def test_hosts_spending_blocks_never_pass_the_daily_limit(redis_server: RedisServer) -> None:
    """Three hosts take blocks of random sizes and spend some; some reports are sent twice (a
    reply lost): together they are granted and spend exactly the limit, never more."""

    async def run() -> tuple[int, int]:
        hosts = [Host(redis_server, h) for h in ("a", "b", "c")]
        rng = random.Random(5)
        for _ in range(400):
            host = rng.choice(hosts)
            host.used += rng.randrange(host.held + 1)
            want = rng.randrange(1, 20)
            reply = await host.take(want_daily=want, need_daily=rng.choice((0, want)))
            if rng.random() < 0.2:  # the same report again: changes nothing
                assert (await host.take()).granted == reply.granted
            assert sum(h.granted for h in hosts) <= 100
        for host in hosts:  # everyone spends what it holds
            host.used = host.granted
            await host.take()
        more = await hosts[0].take(want_daily=5, need_daily=5)
        for h in hosts:
            await h.close()
        return sum(h.used for h in hosts), more.granted - hosts[0].used

    assert asyncio.run(run()) == (100, 0)


def test_a_silent_hosts_expired_lease_goes_back_to_the_others(redis_server: RedisServer) -> None:
    async def run() -> tuple[int, int, int, int]:
        a = Host(redis_server, "a", credit_lease_seconds=0.3)
        b = Host(redis_server, "b", credit_lease_seconds=0.3)
        await a.take(want_daily=60, need_daily=60)
        a.used = 5  # and reported: a then dies holding 55
        await a.take()
        await b.take(want_daily=60, need_daily=60)  # only 40 left
        held_b = b.held
        await asyncio.sleep(0.5)  # a's lease ends; b's first call after marks it ...
        b.used = b.granted
        soon = (await b.take(want_daily=60, need_daily=60)).granted - b.used
        await asyncio.sleep(1.1)  # ... and a stays silent past the grace: its lease goes back
        again = (await b.take(want_daily=60, need_daily=60)).granted - b.used
        await a.close()
        await b.close()
        return a.granted, held_b, soon, again

    assert asyncio.run(run()) == (60, 40, 0, 55)


def test_a_repeat_beneficiary_gives_its_slot_back_and_the_set_is_shared(
    redis_server: RedisServer,
) -> None:
    async def run() -> tuple[cl.CreditReply, ...]:
        a, b = Host(redis_server, "a"), Host(redis_server, "b")
        first = await a.take(want_distinct=6, need_distinct=6)  # 6 slots
        second = await b.take(want_distinct=6, need_distinct=6)  # 4 left
        # a spent 3 slots on 3 people; b spent 3 on 2 people a had seen and a new one.
        a.distinct_used = 3
        after_a = await a.take(pseudonyms=(11, 12, 13))
        b.distinct_used = 3
        after_b = await b.take(pseudonyms=(11, 12, 14), want_distinct=10, need_distinct=10,
                               members_wanted=True)  # fmt: skip
        await a.close()
        await b.close()
        return first, second, after_a, after_b

    first, second, after_a, after_b = asyncio.run(run())
    assert (first.distinct_granted, second.distinct_granted) == (6, 4)
    assert after_a.distinct_count == 3
    # 4 people seen; a holds 3 slots it has not used (6 - 3); b gets the 3 left (its 4 - 3 + 3).
    assert after_b.distinct_count == 4 and after_b.distinct_granted == 3 + 3
    assert set(after_b.members) == {11, 12, 13, 14}  # short at the cap: the whole set


def test_rate_tokens_follow_redis_clock(redis_server: RedisServer) -> None:
    """A GCRA on Redis's TIME: the burst at once, then one token per interval."""

    async def run() -> tuple[int, int]:
        a = Host(redis_server, "a")
        first = (await a.take(want_rate=50, interval_ms=100, tolerance_ms=900)).rate
        await asyncio.sleep(0.35)
        later = (await a.take(want_rate=50, interval_ms=100, tolerance_ms=900)).rate
        await a.close()
        return first, later

    first, later = asyncio.run(run())
    assert first == 10  # tolerance / interval + 1
    assert 3 <= later <= 5


def test_a_busy_hosts_rate_lease_is_granted_in_one_step(redis_server: RedisServer) -> None:
    """A host at 100k lookups/s asks for a second of tokens: the GCRA grants them at once (what
    the tolerance allows, no more), and the next ask finds the tolerance spent."""

    async def run() -> tuple[int, int, int]:
        a, b = Host(redis_server, "a"), Host(redis_server, "b")
        whole = (await a.take(want_rate=100_000, interval_ms=1, tolerance_ms=10**9)).rate
        cut = (await b.take(want_rate=100_000, interval_ms=10, tolerance_ms=5_000)).rate
        after = (await b.take(want_rate=100_000, interval_ms=10, tolerance_ms=5_000)).rate
        await a.close()
        await b.close()
        return whole, cut, after

    whole, cut, after = asyncio.run(run())
    assert whole == 100_000
    # The same practitioner's GCRA: a's 100,000 tokens at 1 ms put its TAT 100 s ahead, past
    # b's 5 s tolerance, so b gets nothing until that much time has passed.
    assert cut == 0 and after == 0


def test_an_idle_admin_stream_is_not_an_outage(redis_server: RedisServer) -> None:
    """The sync process waits on the admin stream; a quiet wait is not a Redis failure, even
    with the workers' short deadline in the settings."""

    async def run() -> tuple[list[Any], bool]:
        settings = cl.ClusterSettings(redis=redis_server.url, host_id="a", timeout_ms=50)
        sync = cl.sync_backend(settings)
        got: list[Any] = []
        for _ in range(4):
            got += await sync.read_admin("$", block_ms=cl.ADMIN_BLOCK_MS)
        degraded = sync.breaker.degraded
        await sync.close()
        return got, degraded

    got, degraded = asyncio.run(run())
    assert got == [] and degraded is False


def test_the_global_guard_trips_once_and_a_repeated_report_counts_once(
    redis_server: RedisServer,
) -> None:
    async def run() -> list[cl.GuardReply]:
        a, b = backend(redis_server, "a"), backend(redis_server, "b")
        replies = [
            await a.guard(PID, "0110", 10, 5, 50, False, 1),
            await a.guard(PID, "0110", 10, 5, 50, False, 1),  # sent again: not counted again
            # 0110 then 0: 2 bad of 5 (40%); then 1: 3 bad of 6, half: it fires there (index 1).
            await b.guard(PID, "0111", 10, 5, 50, False, 1),
            await a.guard(PID, "1", 10, 5, 50, False, 2),
        ]
        taken = await a.take(request(want_daily=5))
        replies.append(cl.GuardReply(False, -1, taken.suspended, 0, taken.granted))
        await a.close()
        await b.close()
        return replies

    first, again, second, third, credit = asyncio.run(run())
    assert not first.fired and again.window == first.window == 4
    assert second.fired and second.index == 1 and second.suspended
    assert not third.fired and third.suspended  # fires once
    assert credit.suspended and credit.bad == 0  # no credit granted to a suspended practitioner


def test_a_lost_state_is_reported_and_a_behind_day_refused(redis_server: RedisServer) -> None:
    async def run() -> tuple[int, int, int]:
        a = Host(redis_server, "a")
        await a.take(want_daily=10)
        redis_server.client().flushall()
        a.used = 4
        lost = (await a.take()).status
        b = Host(redis_server, "b")
        fresh = (await b.take(want_daily=10)).status
        await b.close()
        behind = (await a.take(day=DAY - 1, want_daily=1)).status
        await a.close()
        return lost, fresh, behind

    assert asyncio.run(run()) == (
        cl.CreditReply.LOST,
        cl.CreditReply.OK,
        cl.CreditReply.DAY_BEHIND,
    )


def test_a_rebuild_after_a_loss_counts_every_host_and_grants_wait(
    redis_server: RedisServer,
) -> None:
    """State loss: each host reports its whole day (rebuild); no grant for a lease."""

    async def run() -> list[cl.CreditReply]:
        a = Host(redis_server, "a", credit_lease_seconds=0.4)
        b = Host(redis_server, "b", credit_lease_seconds=0.4)
        await a.take(want_daily=30, need_daily=30)
        await b.take(want_daily=30, need_daily=30)
        a.used, b.used = 25, 30
        redis_server.client().flushall()
        out = [await a.take()]  # lost
        a.granted = b.granted = 0  # what a rebuild sends: totals, no grant known
        out.append(await a.take(rebuild=True, pseudonyms=(1, 2)))
        out.append(await a.take(rebuild=True, pseudonyms=(1, 2)))  # twice: counted once
        out.append(await b.take(rebuild=True, pseudonyms=(2, 3), want_daily=10, need_daily=10))
        await asyncio.sleep(0.5)
        out.append(await b.take(want_daily=100, need_daily=100))
        await a.close()
        await b.close()
        return out

    lost, first, again, other, later = asyncio.run(run())
    assert lost.status == cl.CreditReply.LOST
    assert first.status == again.status == other.status == cl.CreditReply.LEARNING
    assert other.granted == 30 and other.used == 55 and other.distinct_count == 3
    assert later.status == cl.CreditReply.OK and later.granted == 30 + 45  # 100 - 55 left


def test_a_frozen_redis_opens_the_circuit_fast(redis_server: RedisServer) -> None:
    """Every call has a short deadline; after a few failures calls fail at once."""

    async def run() -> list[float]:
        import time

        a = backend(redis_server, "a")
        a.breaker = cl.CircuitBreaker(3, 5.0)
        await a.take(request(want_daily=1))
        a._timeout = 0.05
        redis_server.freeze()
        times = []
        try:
            for _ in range(6):
                started = time.monotonic()
                with pytest.raises(cl.BackendUnavailable):
                    await a.take(request(want_daily=1))
                times.append(time.monotonic() - started)
        finally:
            redis_server.thaw()
        assert a.breaker.degraded
        await a.close()
        return times

    times = asyncio.run(run())
    assert max(times) < 1.0  # never a hang
    assert max(times[3:]) < 0.01  # the circuit is open: no call is even made

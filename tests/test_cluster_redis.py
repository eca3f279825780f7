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


def test_two_hosts_spending_blocks_never_pass_the_daily_limit(redis_server: RedisServer) -> None:
    """Hosts take blocks of random sizes, spend some, report; together they are granted exactly
    the limit and never more."""

    async def run() -> tuple[int, int]:
        hosts = [backend(redis_server, h) for h in ("a", "b", "c")]
        held = dict.fromkeys(range(3), 0)
        spent = 0
        rng = random.Random(5)
        for _ in range(400):
            i = rng.randrange(3)
            use = rng.randrange(held[i] + 1)
            want = rng.randrange(1, 20)
            reply = await hosts[i].take(request(want_daily=want, need_daily=rng.choice((0, want)),
                                                used=use))  # fmt: skip
            held[i] += reply.daily - use
            spent += use
            assert reply.used + sum(held.values()) <= 100
        for i in range(3):  # everyone spends what they hold
            await hosts[i].take(request(used=held[i]))
            spent += held[i]
            held[i] = 0
        final = await hosts[0].take(request(want_daily=5))
        for h in hosts:
            await h.close()
        return spent, final.daily

    spent, more = asyncio.run(run())
    assert spent == 100 and more == 0


def test_an_expired_lease_goes_back_to_the_others(redis_server: RedisServer) -> None:
    async def run() -> tuple[int, int, int]:
        a = backend(redis_server, "a", credit_lease_seconds=0.3)
        b = backend(redis_server, "b", credit_lease_seconds=0.3)
        got_a = (await a.take(request(want_daily=60, need_daily=60))).daily
        got_b = (await b.take(request(want_daily=60, need_daily=60))).daily  # only 40 left
        await asyncio.sleep(0.5)  # a dies holding 60: its lease ends
        again = (await b.take(request(want_daily=60, need_daily=60, used=got_b))).daily
        await a.close()
        await b.close()
        return got_a, got_b, again

    assert asyncio.run(run()) == (60, 40, 60)


def test_a_repeat_beneficiary_gives_its_slot_back_and_the_set_is_shared(
    redis_server: RedisServer,
) -> None:
    async def run() -> list[Any]:
        a, b = backend(redis_server, "a"), backend(redis_server, "b")
        out = []
        out.append(await a.take(request(want_distinct=6, need_distinct=6)))  # 6 slots
        out.append(await b.take(request(want_distinct=6, need_distinct=6)))  # 4 left
        # a spent 3 slots on 3 people; b spent 2 on people a had already seen, 1 on a new one.
        out.append(await a.take(request(pseudonyms=(11, 12, 13), returned_distinct=3)))
        out.append(await b.take(request(pseudonyms=(11, 12, 14), returned_distinct=1,
                                        want_distinct=10, need_distinct=10,
                                        members_wanted=True)))  # fmt: skip
        await a.close()
        await b.close()
        return out

    first, second, after_a, after_b = asyncio.run(run())
    assert (first.distinct, second.distinct) == (6, 4)
    assert after_a.distinct_count == 3
    # 4 people seen; 10 - 4 = 6 slots free, all to b; the whole set comes back when short.
    assert after_b.distinct_count == 4 and after_b.distinct == 6
    assert set(after_b.members) == {11, 12, 13, 14}


def test_rate_tokens_follow_redis_clock(redis_server: RedisServer) -> None:
    """A GCRA on Redis's TIME: the burst at once, then one token per interval."""

    async def run() -> tuple[int, int]:
        a = backend(redis_server, "a")
        first = (await a.take(request(want_rate=50, interval_ms=100, tolerance_ms=900))).rate
        await asyncio.sleep(0.35)
        later = (await a.take(request(want_rate=50, interval_ms=100, tolerance_ms=900))).rate
        await a.close()
        return first, later

    first, later = asyncio.run(run())
    assert first == 10  # tolerance / interval + 1
    assert 3 <= later <= 5


def test_the_global_guard_trips_once_and_says_on_which_outcome(redis_server: RedisServer) -> None:
    async def run() -> list[cl.GuardReply]:
        a, b = backend(redis_server, "a"), backend(redis_server, "b")
        replies = [
            await a.guard(PID, "0110", 10, 5, 50, False),
            # 0110 then 0: 2 bad of 5 (40%); then 1: 3 bad of 6, half: it fires there (index 1).
            await b.guard(PID, "0111", 10, 5, 50, False),
            await a.guard(PID, "1", 10, 5, 50, False),
        ]
        taken = await a.take(request(want_daily=5))
        replies.append(cl.GuardReply(False, -1, taken.suspended, 0, taken.daily))
        await a.close()
        await b.close()
        return replies

    first, second, third, credit = asyncio.run(run())
    assert not first.fired
    assert second.fired and second.index == 1 and second.suspended
    assert not third.fired and third.suspended  # fires once
    assert credit.suspended and credit.bad == 0  # no credit granted to a suspended practitioner


def test_a_lost_state_is_reported_and_a_behind_day_refused(redis_server: RedisServer) -> None:
    async def run() -> tuple[int, int, int]:
        a = backend(redis_server, "a")
        await a.take(request(want_daily=10))
        redis_server.client().flushall()
        lost = (await a.take(request(used=4))).status
        fresh = (await a.take(request(want_daily=10))).status
        behind = (await a.take(request(day=DAY - 1, want_daily=1))).status
        await a.close()
        return lost, fresh, behind

    assert asyncio.run(run()) == (
        cl.CreditReply.LOST,
        cl.CreditReply.OK,
        cl.CreditReply.DAY_BEHIND,
    )


def test_a_rebuild_after_a_loss_counts_every_host_once_and_grants_wait(
    redis_server: RedisServer,
) -> None:
    """State loss: each host reports its whole day once (rebuild); no grant for a lease."""

    async def run() -> list[cl.CreditReply]:
        a = backend(redis_server, "a", credit_lease_seconds=0.4)
        b = backend(redis_server, "b", credit_lease_seconds=0.4)
        await a.take(request(want_daily=30, need_daily=30))
        await b.take(request(want_daily=30, need_daily=30))
        redis_server.client().flushall()
        out = [await a.take(request(used=20))]  # lost
        out.append(await a.take(request(rebuild=True, used=25, pseudonyms=(1, 2))))
        out.append(await a.take(request(rebuild=True, used=25, pseudonyms=(1, 2))))  # once
        out.append(await b.take(request(rebuild=True, used=30, pseudonyms=(2, 3),
                                        want_daily=10, need_daily=10)))  # fmt: skip
        await asyncio.sleep(0.5)
        out.append(await b.take(request(want_daily=100, need_daily=100)))
        await a.close()
        await b.close()
        return out

    lost, first, again, other, later = asyncio.run(run())
    assert lost.status == cl.CreditReply.LOST
    assert first.status == again.status == other.status == cl.CreditReply.LEARNING
    assert other.daily == 0 and other.used == 55 and other.distinct_count == 3
    assert later.status == cl.CreditReply.OK and later.daily == 45  # 100 - 55


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

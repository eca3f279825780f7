"""One practitioner's baselines merged across hosts ([cluster] with [baselines]), as real servers
on their own loopback addresses sharing one Redis: a beneficiary seen on one host is a repeat on
the other, a list walk split over two hosts is suspended at the lookup it would be on one host, a
merge applied again changes nothing, and with Redis stopped each host goes on judging from its own
record.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import PHARMACIST_ID, Dataset, RedisServer, build_dataset, cli, error_reason
from test_baselines_server import PARIS, covered_requests, learned_yesterday
from test_cluster_hosts import Host, until

from covergate.v1 import covergate_pb2 as pb
from fastpath.baselines import BaselineFile, BaselineState
from service.cluster import Backend, ClusterSettings
from service.quotas import BASELINE_FILE, QUOTA_SUBDIR
from service.shared_baselines import MERGED_FILE, BaselineSync, baseline_key
from service.store import Store

pytestmark = pytest.mark.slow

# min_lookups pinned at 20 (the default is 15): the split walk below counts on it.
ENFORCE = '\n[baselines]\nenforce = ["new_today", "new_share"]\nmin_lookups = 20\n'


def record(host: Host, slot: int) -> BaselineState:
    base = BaselineFile(host.data_dir / QUOTA_SUBDIR / BASELINE_FILE, 0)
    try:
        return base.read(slot)
    finally:
        base.close()


def today() -> int:
    return int(datetime.datetime.now(PARIS).strftime("%Y%m%d"))


def ask(host: Host, ds: Dataset, request: pb.CheckCoverageRequest) -> str:
    md = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    try:
        answer = host.stub().CheckCoverage(request, metadata=md, timeout=10)
    except grpc.RpcError as error:
        return error_reason(error) or error.code().name
    assert answer.decision == pb.DECISION_COVERED
    return "OK"


def merged_to(host: Host, slot: int, lookups: int) -> None:
    """Wait until `host`'s record counts `lookups` today (its own and the other hosts')."""
    until(lambda: (s := record(host, slot)).day == today() and s.lookups == lookups,
          f"{host.name} counting {lookups} lookups")  # fmt: skip


@pytest.fixture
def two_hosts(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Dataset, RedisServer, int, Host, Host]]:
    """Two hosts on one Redis, each with the pharmacist's learned month (last worked yesterday);
    the test's parameter adds [cluster] settings."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "redis").mkdir()
    ds = build_dataset(tmp_path / "ds", extra_beneficiaries=40)
    cli("practitioner", "quota", PHARMACIST_ID, "--set", "rate_per_minute=100000",
        "--set", "burst=100000", data_dir=ds.data_dir)  # fmt: skip
    slot = learned_yesterday(ds)
    redis = RedisServer(tmp_path / "redis")
    extra = "baseline_interval_seconds = 0.1\n" + getattr(request, "param", "") + ENFORCE
    a, b = (Host(ds, tmp_path, address, redis, extra) for address in ("127.0.0.2", "127.0.0.3"))
    try:
        yield ds, redis, slot, a, b
    finally:
        for host in (a, b):
            if host.server is not None:
                host.server.stop()
        redis.stop()


def test_a_walk_split_over_two_hosts_is_judged_on_everything_it_did(
    two_hosts: tuple[Dataset, RedisServer, int, Host, Host],
) -> None:
    ds, redis, slot, a, b = two_hosts
    a.serve()
    b.serve()
    people = covered_requests(ds)
    assert ask(b, ds, people[0]) == "OK"
    assert ask(a, ds, people[1]) == "OK"
    merged_to(a, slot, 2)
    merged_to(b, slot, 2)
    # The person a checked is a repeat on b: b's day counts it, but not as new.
    assert (record(b, slot).lookups, record(b, slot).new) == (2, 2)
    assert ask(b, ds, people[1]) == "OK"
    assert (record(b, slot).lookups, record(b, slot).new) == (3, 2)

    # A walk of new people, alternating hosts, each lookup made once the other host merged the
    # last: on one host the policy suspends at the 20th lookup (test_baselines_server), and here
    # too, though neither host answered more than 10 of them.
    answered = {a.name: 1, b.name: 2}
    host = a
    for total, request in enumerate(people[2:19], start=4):
        merged_to(host, slot, total - 1)
        assert ask(host, ds, request) == "OK", host.server.log()  # type: ignore[union-attr]
        answered[host.name] += 1
        host = b if host is a else a
    last = a if host is b else b
    assert max(answered.values()) <= 10 and sum(answered.values()) == 20
    assert ask(last, ds, people[19]) == "PRACTITIONER_SUSPENDED"
    assert "baseline policy suspended practitioner" in last.server.log()  # type: ignore[union-attr]
    until(lambda: ask(host, ds, people[20]) == "PRACTITIONER_SUSPENDED", "suspended everywhere")
    until(lambda: record(a, slot).lookups == record(b, slot).lookups, "both hosts merged")
    fired = {record(h, slot).fired for h in (a, b)}
    # new_share, new_today (and new_excess, in shadow), the same on both hosts
    assert len(fired) == 1 and fired.pop() == 1 | 2 | 16
    a.server.stop()  # type: ignore[union-attr]
    b.server.stop()  # type: ignore[union-attr]
    a.server = b.server = None
    assert redis.client().hget(baseline_key(PHARMACIST_ID), "seq") is not None

    # A merge applied again (a fresh sync, which reads every publication) changes no byte.
    def files(host: Host) -> tuple[bytes, bytes]:
        quota = host.data_dir / QUOTA_SUBDIR
        return (quota / BASELINE_FILE).read_bytes(), (quota / MERGED_FILE).read_bytes()

    for host in (a, b):
        before = files(host)
        backend = Backend(ClusterSettings(redis=redis.url, host_id=host.name, timeout_ms=2000))
        sync = BaselineSync(host.data_dir, backend, lambda h=host: practitioners(h), 0.1)

        async def twice(sync: BaselineSync = sync, backend: Backend = backend) -> list[int]:
            merged = [await sync.run_once(today()), await sync.run_once(today())]
            sync.close()
            await backend.close()
            return merged

        assert asyncio.run(twice()) == [1, 0]  # read once; the second round had nothing new
        assert files(host) == before


def practitioners(host: Host) -> dict[int, str]:
    with Store(host.data_dir) as store:
        return {r.slot: r.practitioner_id for r in store.practitioners() if r.slot >= 0}


@pytest.mark.parametrize("two_hosts", ["fail_open = true\n"], indirect=True)
def test_with_redis_stopped_each_host_judges_from_its_own_record(
    two_hosts: tuple[Dataset, RedisServer, int, Host, Host],
) -> None:
    """fail_open, so that lookups go on without Redis (without it they are refused
    QUOTA_BACKEND_UNAVAILABLE once the held credit is spent: the quotas' rule, not this one)."""
    ds, redis, slot, a, b = two_hosts
    a.serve()
    b.serve()
    people = covered_requests(ds)
    for i in range(4):
        assert ask((a, b)[i % 2], ds, people[i]) == "OK"
    merged_to(a, slot, 4)
    merged_to(b, slot, 4)
    redis.kill()
    for i in range(4, 10):
        assert ask((a, b)[i % 2], ds, people[i]) == "OK"
    # Each counted its own lookups on what it had merged, and nothing more came in.
    assert (record(a, slot).lookups, record(b, slot).lookups) == (7, 7)
    redis.start()  # empty: every host publishes again
    merged_to(a, slot, 10)
    merged_to(b, slot, 10)
    assert (record(a, slot).new, record(b, slot).new) == (10, 10)
    for host in (a, b):
        log = host.server.log()  # type: ignore[union-attr]
        assert "Traceback" not in log and "cluster sync exited" not in log, log

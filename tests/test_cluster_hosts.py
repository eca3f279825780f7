"""Several covergate hosts on one Redis, as real processes on their own loopback addresses
(127.0.0.2-4): what an administrator does on one host reaches every host, open streams included,
and a host that loses Redis keeps enforcing what it knew.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import (
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    RedisServer,
    RunningServer,
    build_dataset,
    cli,
)

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Host:
    """One covergate host: its own data dir (a copy of the dataset's), config and server."""

    def __init__(self, ds: Dataset, root: Path, address: str, redis: RedisServer) -> None:
        self.name = f"host-{address.rsplit('.', 1)[1]}"
        self.data_dir = root / self.name
        shutil.copytree(ds.data_dir, self.data_dir)
        self.config = root / f"{self.name}.toml"
        self.config.write_text(
            f'[cluster]\nredis = "{redis.url}"\nhost_id = "{self.name}"\ntimeout_ms = 200\n'
        )
        self.address = address
        self.server: RunningServer | None = None

    def serve(self, **env: str) -> RunningServer:
        self.server = RunningServer(
            self.data_dir, args=["--config", str(self.config)], listen_host=self.address, env=env
        )
        return self.server

    def cli(self, *args: str, check: bool = True) -> Any:
        return cli(*args, "--config", str(self.config), data_dir=self.data_dir, check=check)

    def stub(self) -> pb_grpc.CoverageServiceStub:
        assert self.server is not None
        return pb_grpc.CoverageServiceStub(self.server.channel())


def _reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return exc.code().name


def outcome(stub: pb_grpc.CoverageServiceStub, token: str, ds: Dataset) -> str:
    request = pb.CheckCoverageRequest(
        **ds.covered.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
    )
    try:
        stub.CheckCoverage(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    except grpc.RpcError as exc:
        return _reason(exc)
    return "OK"


def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    """Seconds until `predicate` held (polled every 20 ms); fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Dataset, RedisServer, list[Host]]]:
    (tmp_path / "ds").mkdir()
    (tmp_path / "redis").mkdir()
    ds = build_dataset(tmp_path / "ds", extra_beneficiaries=10)
    cli("practitioner", "quota", PHARMACIST_ID, "--set", "rate_per_minute=100000",
        "--set", "burst=100000", data_dir=ds.data_dir)  # fmt: skip
    redis = RedisServer(tmp_path / "redis")
    hosts = [Host(ds, tmp_path, address, redis) for address in HOSTS]
    try:
        yield ds, redis, hosts
    finally:
        for host in hosts:
            if host.server is not None:
                host.server.stop()
        redis.stop()


def test_admin_changes_made_on_one_host_reach_every_host(
    cluster: tuple[Dataset, RedisServer, list[Host]],
) -> None:
    ds, _redis, (a, b, c) = cluster
    b.serve()
    c.serve()
    # A token made on host a (which serves nothing) works on b and c.
    out = a.cli("token", "create", PHARMACIST_ID).stdout
    assert "shared with every host" in out
    token = out.strip().splitlines()[-1]
    delays = {}
    for host in (b, c):
        stub = host.stub()
        delays[f"token on {host.name}"] = until(lambda s=stub: outcome(s, token, ds) == "OK",
                                                f"the token on {host.name}")  # fmt: skip

    # A suspension made on a: b's open stream and c's next call are refused.
    request = pb.CheckCoverageRequest(
        **ds.covered.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
    )
    import queue

    q: queue.Queue[Any] = queue.Queue()
    responses = b.stub().CheckCoverageStream(
        iter(q.get, None), metadata=(("authorization", f"Bearer {token}"),), timeout=60
    )
    q.put(request)
    assert next(responses).decision == pb.DECISION_COVERED
    a.cli("practitioner", "suspend", PHARMACIST_ID, "--reason", "stolen laptop, ticket 42")
    suspended_at = time.monotonic()
    delays["suspension on c"] = until(
        lambda: outcome(c.stub(), token, ds) == "PRACTITIONER_SUSPENDED", "the suspension on c"
    )
    until(lambda: "suspended" in b.cli("practitioner", "show", PHARMACIST_ID).stdout,
          "the suspension in b's store")  # fmt: skip
    q.put(request)
    with pytest.raises(grpc.RpcError) as ended:
        next(responses)
    q.put(None)
    delays["suspension on b's open stream"] = time.monotonic() - suspended_at
    assert _reason(ended.value) == "PRACTITIONER_SUSPENDED"
    history = b.cli("practitioner", "history", PHARMACIST_ID).stdout
    assert "stolen laptop, ticket 42" in history

    a.cli("practitioner", "reinstate", PHARMACIST_ID)
    delays["reinstatement on b"] = until(lambda: outcome(b.stub(), token, ds) == "OK",
                                         "the reinstatement on b")  # fmt: skip

    a.cli("practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=77")
    delays["override on c"] = until(
        lambda: "77/day" in c.cli("practitioner", "show", PHARMACIST_ID).stdout, "the override"
    )

    a.cli("token", "revoke", PHARMACIST_ID)
    delays["revocation on b"] = until(
        lambda: outcome(b.stub(), token, ds) == "CREDENTIAL_INVALID", "the revocation on b"
    )
    print("propagation delays (s):", {k: round(v, 3) for k, v in delays.items()})


def test_a_host_that_lost_redis_keeps_enforcing_what_it_knew(
    cluster: tuple[Dataset, RedisServer, list[Host]],
) -> None:
    ds, redis, (a, b, _c) = cluster
    b.serve()
    token = a.cli("token", "create", PHARMACIST_ID).stdout.strip().splitlines()[-1]
    until(lambda: outcome(b.stub(), token, ds) == "OK", "the token on b")
    a.cli("practitioner", "suspend", PHARMACIST_ID)
    until(lambda: outcome(b.stub(), token, ds) == "PRACTITIONER_SUSPENDED", "the suspension")
    redis.kill()
    time.sleep(1.5)
    assert outcome(b.stub(), token, ds) == "PRACTITIONER_SUSPENDED"
    # An admin command while Redis is down says the change stayed on its own host.
    proc = a.cli("practitioner", "reinstate", PHARMACIST_ID, check=False)
    assert proc.returncode == 1 and "changed on this host only" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert outcome(b.stub(), token, ds) == "PRACTITIONER_SUSPENDED"

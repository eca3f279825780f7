"""Imports while the server is under load: a valid rights import swaps the whole dataset at once
(no failed call, no batch answered half from each dataset); an invalid one changes nothing.

A real `covergate serve --workers 2` on loopback, client threads calling it over gRPC, and the real
`covergate import rights` run beside them on the same data dir.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import pytest
from harness import (
    PHARMACY_AMC,
    Dataset,
    Identity,
    Right,
    RunningServer,
    build_dataset,
    cli,
    make_identity,
    write_rights_csv,
)

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

CARE_DATE = "20250310"
OLD, NEW = "old", "new"
UNARY_THREADS = 2
BATCH_THREADS = 2
# Generous: a busy 2-core CI host can stall a call for seconds while the import commits and the
# workers switch datasets. Conditions are waited for; no deadline here decides a verdict.
CALL_TIMEOUT = 120
WAIT_TIMEOUT = 600


Server = RunningServer


# -- the two datasets --
#
# covered:  COVERED in both, at 100 % in the old dataset and 80 % in the new one
# gaining:  NOT_COVERED (expired rights) in the old dataset, COVERED (convention NEW1) in the new
# leaving:  COVERED (convention LUNA) in the old dataset, absent (NO_MATCH) from the new


@dataclass
class Datasets:
    ds: Dataset
    old_csv: Path
    new_csv: Path
    bad_csv: Path
    bad_line: int

    @property
    def covered(self) -> Identity:
        return self.ds.covered

    @property
    def gaining(self) -> Identity:
        return self.ds.not_covered

    @property
    def leaving(self) -> Identity:
        return self.ds.lunar


def new_rights(ds: Dataset, extra: int) -> list[Right]:
    rng = random.Random(99)
    rights = []
    for right in ds.rights:
        if right.identity == ds.lunar:
            continue
        if right.identity == ds.covered and right.domain == "PHAR":
            right = replace(right, rate_percent=80)
        if right.identity == ds.not_covered:
            right = replace(right, end_date="20991231", convention_type="NEW1")
        rights.append(right)
    # Enough rows that the import is not instantaneous next to the load.
    rights += [Right(make_identity(rng), PHARMACY_AMC, "PHAR") for _ in range(extra)]
    return rights


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> Datasets:
    tmp = tmp_path_factory.mktemp("live")
    ds = build_dataset(tmp)
    old_csv = write_rights_csv(tmp / "old.csv", ds.rights)
    new_csv = write_rights_csv(tmp / "new.csv", new_rights(ds, extra=20_000))
    # The new dataset again, with one bad row in the middle (line numbers count the header).
    lines = new_csv.read_text().splitlines(keepends=True)
    bad_line = len(lines) // 2 + 1
    fields = lines[bad_line - 1].rstrip("\n").split(",")
    fields[2] = "19991340"  # birth date, month 13
    lines[bad_line - 1] = ",".join(fields) + "\n"
    bad_csv = tmp / "bad.csv"
    bad_csv.write_text("".join(lines))
    return Datasets(ds, old_csv, new_csv, bad_csv, bad_line)


@pytest.fixture(scope="module")
def server(datasets: Datasets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Quotas in shadow mode: the load is far above a pharmacist's rate limit.
    config = tmp_path_factory.mktemp("config") / "covergate.toml"
    config.write_text('[quota]\nshadow = ["rate", "daily", "distinct", "guard"]\n')
    with Server(datasets.ds.data_dir, workers=2, args=["--config", str(config)]) as srv:
        yield srv


# -- reading an answer as "old" or "new" --


def request(identity: Identity, request_id: str) -> pb.CheckCoverageRequest:
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=identity.nir,
        nir_key=identity.nir_key,
        birth_date=identity.birth_date,
        birth_rank=identity.birth_rank,
        amc_number=PHARMACY_AMC,
        domain=pb.CARE_DOMAIN_PHARMACY,
        care_date=CARE_DATE,
    )


def classify(role: str, resp: pb.CheckCoverageResponse) -> str:
    """OLD or NEW when the answer is exactly one dataset's answer, else what is wrong with it."""
    d = resp.decision
    got = (d, resp.rate_percent, resp.convention_type, resp.rights_end_date, bool(resp.attestation))
    covered = pb.DECISION_COVERED
    expected = {
        "covered": {
            OLD: (covered, 100, "TP01", "20991231", True),
            NEW: (covered, 80, "TP01", "20991231", True),
        },
        "gaining": {
            OLD: (pb.DECISION_NOT_COVERED, 0, "", "", False),
            NEW: (covered, 100, "NEW1", "20991231", True),
        },
        "leaving": {
            OLD: (covered, 100, "LUNA", "20991231", True),
            NEW: (pb.DECISION_NO_MATCH, 0, "", "", False),
        },
    }[role]
    if resp.HasField("error"):
        return f"{role}: error {resp.error.code} {resp.error.message}"
    for name, answer in expected.items():
        if got == answer:
            return name
    return f"{role}: unexpected {got}"


@dataclass
class Observation:
    thread: int
    started: float
    ended: float
    kind: str  # unary or batch
    verdict: str  # OLD, NEW, or what was wrong


@dataclass
class Load:
    """Client threads calling the server (unary and batch) until stopped; every outcome kept."""

    datasets: Datasets
    target: str
    observations: list[Observation] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        kinds = ["unary"] * UNARY_THREADS + ["batch"] * BATCH_THREADS
        self._threads = [
            threading.Thread(target=self._run, args=(n, kind), daemon=True)
            for n, kind in enumerate(kinds)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=CALL_TIMEOUT + 30)
        assert not any(t.is_alive() for t in self._threads)

    def _run(self, n: int, kind: str) -> None:
        d = self.datasets
        roles = {"covered": d.covered, "gaining": d.gaining, "leaving": d.leaving}
        metadata = (("authorization", f"Bearer {d.ds.tokens['pharmacist']}"),)
        i = 0
        with grpc.insecure_channel(self.target) as ch:
            stub = pb_grpc.CoverageServiceStub(ch)
            while not self._stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    if kind == "unary":
                        role = list(roles)[i % 3]
                        resp = stub.CheckCoverage(
                            request(roles[role], f"t{n}-{i}"),
                            metadata=metadata,
                            timeout=CALL_TIMEOUT,
                        )
                        assert resp.request_id == f"t{n}-{i}"
                        verdict = classify(role, resp)
                    else:
                        items = [request(identity, role) for role, identity in roles.items()] * 3
                        batch = stub.CheckCoverageBatch(
                            pb.CheckCoverageBatchRequest(items=items),
                            metadata=metadata,
                            timeout=CALL_TIMEOUT,
                        )
                        verdicts = {classify(r.request_id, r) for r in batch.items}
                        assert len(batch.items) == len(items)
                        verdict = verdicts.pop() if len(verdicts) == 1 else f"mixed {verdicts}"
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failures.append(f"{kind}: {exc.code()} {exc.details()}")  # type: ignore[attr-defined]
                    continue
                except AssertionError as exc:
                    verdict = f"bad answer: {exc}"
                with self._lock:
                    self.observations.append(
                        Observation(n, started, time.monotonic(), kind, verdict)
                    )

    def count(self, since: float = 0.0, thread: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for o in self.observations
                if o.started > since and (thread is None or o.thread == thread)
            )

    def wait_for(
        self, answers: int, since: float = 0.0, timeout: float = WAIT_TIMEOUT, each: bool = False
    ) -> None:
        """Until `answers` calls started after `since` were answered (by each thread, with
        `each`)."""
        deadline = time.monotonic() + timeout
        threads = range(len(self._threads)) if each else [None]
        while any(self.count(since, t) < answers for t in threads):
            assert time.monotonic() < deadline, f"load stalled: {self.failures[:5]}"
            assert all(t.is_alive() for t in self._threads), "a load thread died"
            time.sleep(0.01)


def current_dataset(datasets: Datasets, target: str) -> str:
    """OLD or NEW: what the server answers right now (one batch, so one dataset)."""
    roles = {"covered": datasets.covered, "gaining": datasets.gaining, "leaving": datasets.leaving}
    with grpc.insecure_channel(target) as ch:
        batch = pb_grpc.CoverageServiceStub(ch).CheckCoverageBatch(
            pb.CheckCoverageBatchRequest(items=[request(i, r) for r, i in roles.items()]),
            metadata=(("authorization", f"Bearer {datasets.ds.tokens['pharmacist']}"),),
            timeout=CALL_TIMEOUT,
        )
    verdicts = {classify(r.request_id, r) for r in batch.items}
    assert len(verdicts) == 1 and verdicts <= {OLD, NEW}, verdicts
    return verdicts.pop()


def import_rights(datasets: Datasets, path: Path, *, check: bool = True) -> tuple[int, str, float]:
    """Run the real import; (exit code, stderr, monotonic time it finished)."""
    proc = cli(
        "import", "rights", str(path), "--no-progress", data_dir=datasets.ds.data_dir, check=check
    )
    return proc.returncode, proc.stderr, time.monotonic()


# -- the tests --


def test_import_under_load_switches_datasets_atomically(datasets: Datasets, server: Server) -> None:
    if current_dataset(datasets, server.target) != OLD:
        import_rights(datasets, datasets.old_csv)
    assert current_dataset(datasets, server.target) == OLD

    with Load(datasets, server.target) as load:
        load.wait_for(50, each=True)
        import_started = time.monotonic()
        code, _, import_ended = import_rights(datasets, datasets.new_csv)
        assert code == 0
        # Every client thread goes on past the import: each one's switch to the new data is seen.
        load.wait_for(50, since=import_ended, each=True)

    assert load.failures == [], load.failures[:10]
    verdicts = [o.verdict for o in load.observations]
    wrong = [v for v in verdicts if v not in (OLD, NEW)]
    assert wrong == [], wrong[:10]  # every answer, every batch as a whole, from one dataset
    before = [o.verdict for o in load.observations if o.ended < import_started]
    after = [o.verdict for o in load.observations if o.started > import_ended]
    assert before and set(before) == {OLD}
    assert after and set(after) == {NEW}
    # The load ran while the import did: some call was in flight during it (every thread calls
    # back to back, so this holds however slow the host; how many calls fit in is timing).
    during = [o for o in load.observations if o.started < import_ended and o.ended > import_started]
    assert during, "the load did not run while the import did"
    assert {o.kind for o in load.observations if o.started > import_ended} == {"unary", "batch"}
    # Each client, calling one call after another, never goes back to the old dataset.
    for n in range(UNARY_THREADS + BATCH_THREADS):
        seq = [
            o.verdict for o in sorted(load.observations, key=lambda o: o.started) if o.thread == n
        ]
        first_new = seq.index(NEW)
        assert set(seq[first_new:]) == {NEW}, f"thread {n} saw the old dataset after the new one"
    assert current_dataset(datasets, server.target) == NEW
    assert server.proc.poll() is None
    assert "Traceback" not in server.log()


def test_invalid_import_under_load_changes_nothing(datasets: Datasets, server: Server) -> None:
    if current_dataset(datasets, server.target) != OLD:
        import_rights(datasets, datasets.old_csv)
    assert current_dataset(datasets, server.target) == OLD

    # The bad file is the new dataset with one invalid row: served, it would show.
    with Load(datasets, server.target) as load:
        load.wait_for(50, each=True)
        code, stderr, import_ended = import_rights(datasets, datasets.bad_csv, check=False)
        load.wait_for(50, since=import_ended, each=True)

    assert code != 0
    assert f"line {datasets.bad_line}" in stderr
    assert "birth_date" in stderr
    bad_row = datasets.bad_csv.read_text().splitlines()[datasets.bad_line - 1].split(",")
    assert bad_row[0] not in stderr  # the NIR of the bad row is not echoed
    assert load.failures == [], load.failures[:10]
    assert {o.verdict for o in load.observations} == {OLD}
    assert current_dataset(datasets, server.target) == OLD
    assert server.proc.poll() is None

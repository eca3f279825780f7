"""The baseline policy over a real server: a credential whose own past is a handful of regular
patients a day starts walking a list of people it never saw; with `[baselines] enforce`, the
server suspends it through the guard's persisted suspension, with the policy as the reason, and
the suspension holds across a restart until `practitioner reinstate`.
"""

from __future__ import annotations

import datetime
import sys
import time
import zoneinfo
from pathlib import Path

import grpc
from harness import PHARMACIST_ID, Dataset, RunningServer, build_dataset, cli, error_reason

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from fastpath import baselines
from fastpath.baselines import BaselineFile
from service.config import Config
from service.quotas import BASELINE_FILE, QUOTA_SUBDIR, open_quota_file
from service.store import Store

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
F = baselines.FIXED


def learned_yesterday(ds: Dataset) -> int:
    """Write the pharmacist's baseline as a month of ~40 lookups a day, 2 new, 5% new, at every
    hour (so no lookup of this test is off its hours), last worked yesterday. Returns its slot."""
    store = Store(ds.data_dir)
    try:
        record = store.practitioner(PHARMACIST_ID)
        assert record is not None
        slot = record.slot
        quota = open_quota_file(ds.data_dir, Config(), store.quota_slots_used())
        slots = quota.slots
        quota.close()
    finally:
        store.close()
    base = BaselineFile(ds.data_dir / QUOTA_SUBDIR / BASELINE_FILE, slots)
    try:
        s = base.read(slot)
        yesterday = datetime.datetime.now(PARIS).date() - datetime.timedelta(days=1)
        s.day = int(yesterday.strftime("%Y%m%d"))
        s.days_active, s.lookups, s.new = 30, 40, 2
        s.mean_lookups, s.square_lookups = 40 * F, (1600 + 40) * F
        s.mean_new, s.square_new, s.mean_share = 2 * F, 6 * F, 5 * F
        s.hours, s.hours_total = [1000] * 24, 24_000
        s.pack_into(base.map, base.offset(slot))
    finally:
        base.close()
    return slot


def covered_requests(ds: Dataset) -> list[pb.CheckCoverageRequest]:
    """One request per extra beneficiary of the dataset: people the pharmacist never checked,
    each COVERED (a leaked list is real people: the harvest guard sees nothing wrong)."""
    requests = []
    for i, right in enumerate(ds.rights[6:]):
        who = right.identity
        requests.append(
            pb.CheckCoverageRequest(
                request_id=f"w{i}",
                nir=who.nir,
                nir_key=who.nir_key,
                birth_date=who.birth_date,
                birth_rank=who.birth_rank,
                amc_number=right.amc_number,
                domain=pb.CARE_DOMAIN_PHARMACY,
            )
        )
    return requests


def walk(
    server: RunningServer, ds: Dataset, requests: list[pb.CheckCoverageRequest]
) -> tuple[int, str]:
    """Lookups until the first refusal: (how many were answered, the refusal's reason)."""
    md = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)
    with server.channel() as channel:
        stub = pb_grpc.CoverageServiceStub(channel)
        for i, request in enumerate(requests):
            try:
                answer = stub.CheckCoverage(request, metadata=md, timeout=10)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
                return i, error_reason(error)
            assert answer.decision == pb.DECISION_COVERED
    return len(requests), ""


def test_a_list_walk_is_suspended_by_the_policy_until_reinstated(tmp_path: Path) -> None:
    ds = build_dataset(tmp_path, extra_beneficiaries=40)
    slot = learned_yesterday(ds)
    config = tmp_path / "baselines.toml"
    config.write_text('[baselines]\nenforce = ["new_today", "new_share"]\n')
    requests = covered_requests(ds)
    with RunningServer(ds.data_dir, args=["--config", str(config)]) as server:
        # new_today is raised at the 10th new person, new_share once 15 lookups are made (the
        # default min_lookups): both, so the 15th lookup suspends and the 16th is refused.
        answered, reason = walk(server, ds, requests)
        assert (answered, reason) == (15, "PRACTITIONER_SUSPENDED"), server.log()
        assert "baseline policy suspended practitioner" in server.log()
    shown = cli(
        "practitioner", "show", PHARMACIST_ID, "--config", str(config), data_dir=ds.data_dir
    ).stdout
    assert "suspended (baseline policy: new_share+new_today" in shown, shown
    assert "raised: new_share, new_today" in shown and "last suspended by baseline" in shown
    # The walked people are nowhere in what show prints (the filter keeps bits, not people).
    assert not any(r.nir in shown or r.birth_date in shown for r in requests)

    with RunningServer(ds.data_dir, args=["--config", str(config)]) as server:
        assert walk(server, ds, requests[20:22]) == (0, "PRACTITIONER_SUSPENDED")
    cli(
        "practitioner",
        "reinstate",
        PHARMACIST_ID,
        "--reason",
        "ticket 7",
        "--config",
        str(config),
        data_dir=ds.data_dir,
    )
    base = BaselineFile(ds.data_dir / QUOTA_SUBDIR / BASELINE_FILE, 0)
    try:
        assert base.read(slot).suspended_by == 0
    finally:
        base.close()
    with RunningServer(ds.data_dir, args=["--config", str(config)]) as server:
        # Today's signals were raised already: they do not suspend again the same day.
        assert walk(server, ds, requests[20:30]) == (10, "")


def test_in_shadow_a_walk_is_an_anomaly_event_and_a_metric_by_profession_and_signal(
    tmp_path: Path,
) -> None:
    from spans import attributes

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.otlp_receiver import OtlpReceiver

    ds = build_dataset(tmp_path, extra_beneficiaries=30)
    learned_yesterday(ds)
    requests = covered_requests(ds)
    with OtlpReceiver() as receiver:
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
        }
        with RunningServer(ds.data_dir, env=env) as server:
            # Shadow (no [baselines] enforce): every lookup is answered.
            assert walk(server, ds, requests) == (len(requests), "")
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not anomalies(receiver):
                time.sleep(0.1)
            events = [
                (span, event)
                for span in receiver.spans()
                for event in span.events
                if event.name == "covergate.anomaly"
            ]
        counted = anomalies(receiver)
    raised = {
        {kv.key: kv.value for kv in event.attributes}["covergate.anomaly.signal"].string_value
        for _, event in events
    }
    assert raised == {"new_today", "new_share", "new_excess"}, raised
    for span, event in events:
        values = {kv.key: kv.value for kv in event.attributes}
        assert values["covergate.anomaly.score"].int_value > 0
        assert attributes(span)["covergate.practitioner.id"] == PHARMACIST_ID
    assert counted == {
        ("pharmacist", "new_today"): 1,
        ("pharmacist", "new_share"): 1,
        ("pharmacist", "new_excess"): 1,
    }


def anomalies(receiver: object) -> dict[tuple[str, str], int]:
    """The latest covergate.anomalies points, by (profession, signal): never a practitioner."""
    latest: dict[tuple[str, str], int] = {}
    for export in receiver.metric_exports():  # type: ignore[attr-defined]
        for rm in export.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != "covergate.anomalies":
                        continue
                    for point in m.sum.data_points:
                        labels = {kv.key: kv.value.string_value for kv in point.attributes}
                        assert set(labels) == {
                            "covergate.practitioner.profession",
                            "covergate.anomaly.signal",
                        }
                        key = (
                            labels["covergate.practitioner.profession"],
                            labels["covergate.anomaly.signal"],
                        )
                        latest[key] = int(point.as_int)
    return latest


def test_the_baseline_survives_killed_workers(tmp_path: Path) -> None:
    """Two workers write one record under the slot's mutex; both are killed (SIGKILL) between
    calls and replaced: what they had written is all there, and counting goes on."""
    import os
    import signal

    from test_server_workers import Server, fresh_channel

    ds = build_dataset(tmp_path, extra_beneficiaries=20)
    slot = learned_yesterday(ds)
    requests = covered_requests(ds)
    md = (("authorization", f"Bearer {ds.tokens['pharmacist']}"),)

    def ask(server: Server, batch: list[pb.CheckCoverageRequest]) -> None:
        for request in batch:
            with fresh_channel(server.target) as channel:  # spread over both workers
                answer = pb_grpc.CoverageServiceStub(channel).CheckCoverage(
                    request, metadata=md, timeout=10, wait_for_ready=True
                )
                assert answer.decision == pb.DECISION_COVERED

    def today_counts() -> tuple[int, int, int]:
        base = BaselineFile(ds.data_dir / QUOTA_SUBDIR / BASELINE_FILE, 0)
        try:
            s = base.read(slot)
            return s.lookups, s.new, s.days_active
        finally:
            base.close()

    with Server(ds.data_dir, workers=2) as server:
        server.wait_log(r"worker \d+ listening", 2)
        ask(server, requests[:10])
        for index, victim in sorted(server.worker_pids().items()):
            os.kill(victim, signal.SIGKILL)
            server.wait_log(rf"worker {index} exited", 1)
        server.wait_log(r"worker \d+ listening", 4)
        assert today_counts() == (10, 10, 31)
        ask(server, requests[:5] + requests[10:20])  # five repeats: not new
        # Each killed worker was replaced once: no replacement died reporting itself ready.
        assert "Traceback" not in server.log() and server.log().count("restarting it") == 2
    assert today_counts() == (25, 20, 31)

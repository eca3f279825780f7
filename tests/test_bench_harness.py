"""The benchmark harness's own logic: gRPC framing, request building and answer checks, h2load
output parsing, the arithmetic of medians, percentiles, ratios and goals, and the run plan.

No server, no h2load and no timing here: the benchmark itself is never a test.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from google.rpc import status_pb2

# bench/ is a directory of scripts beside the packages, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import audit, audit_client, dataset, frames, h2load, otlp_receiver, plan, report, stats
from bench.frames import COVERED, INVALID, NO_MATCH, NOT_COVERED, CheckSpec
from bench.scenarios import SCENARIOS
from bench.variants import VARIANTS, ServerContext
from covergate.v1 import covergate_pb2 as pb

SPEC = CheckSpec(
    COVERED, "1850775123456", "39", "19850701", 1, "310457218", "A0001234", 1, "20250615"
)


def spec(kind: str, n: int = 0) -> CheckSpec:
    return CheckSpec(
        kind, f"{1850775123456 + n}", "39", "19850701", 1, "310457218", "", 1, "20250615"
    )


# -- framing ---------------------------------------------------------------------------------------


def test_grpc_frame_has_the_5_byte_prefix() -> None:
    frame = frames.grpc_frame(b"hello")
    assert frame == b"\x00\x00\x00\x00\x05hello"


def test_split_frames_reads_messages_back_to_back() -> None:
    data = frames.grpc_frame(b"a") + frames.grpc_frame(b"") + frames.grpc_frame(b"xyz" * 100)
    assert frames.split_frames(data) == [b"a", b"", b"xyz" * 100]


@pytest.mark.parametrize(
    "data", [b"\x00\x00\x00", b"\x00\x00\x00\x00\x05abc", b"\x01\x00\x00\x00\x00"]
)
def test_split_frames_rejects_truncated_or_compressed(data: bytes) -> None:
    with pytest.raises(ValueError):
        frames.split_frames(data)


def test_request_bytes_carry_every_field() -> None:
    req = pb.CheckCoverageRequest.FromString(frames.request_bytes(SPEC, "r1"))
    assert (req.request_id, req.nir, req.nir_key, req.birth_date, req.birth_rank) == (
        "r1",
        SPEC.nir,
        SPEC.nir_key,
        SPEC.birth_date,
        SPEC.birth_rank,
    )
    assert (req.amc_number, req.member_number, req.domain, req.care_date) == (
        SPEC.amc_number,
        SPEC.member_number,
        SPEC.domain,
        SPEC.care_date,
    )


def test_batch_bytes_keep_order_and_number_request_ids() -> None:
    specs = [spec(COVERED, i) for i in range(3)]
    batch = pb.CheckCoverageBatchRequest.FromString(frames.batch_bytes(specs, "x"))
    assert [i.nir for i in batch.items] == [s.nir for s in specs]
    assert [i.request_id for i in batch.items] == ["x0000", "x0001", "x0002"]


def test_mixed_follows_weights_and_uses_distinct_identities() -> None:
    pools = {k: [spec(k, i) for i in range(50)] for k in frames.KINDS}
    out = frames.mixed(pools, {COVERED: 6, NOT_COVERED: 2, NO_MATCH: 1, INVALID: 1}, 100)
    assert frames.kinds_count(out) == {COVERED: 60, NOT_COVERED: 20, NO_MATCH: 10, INVALID: 10}
    covered = [s.nir for s in out if s.kind == COVERED]
    assert len(set(covered)) == 50  # cycles through the pool before repeating


def test_mixed_refuses_an_empty_pool() -> None:
    with pytest.raises(ValueError):
        frames.mixed({COVERED: []}, {COVERED: 1}, 3)


def test_spec_json_round_trip() -> None:
    assert CheckSpec.from_json(SPEC.to_json()) == SPEC


# -- expected answers ------------------------------------------------------------------------------


def answer(decision: int, **kw: object) -> bytes:
    return pb.CheckCoverageResponse(decision=decision, **kw).SerializeToString()  # type: ignore[arg-type]


def test_check_unary_accepts_the_expected_decision() -> None:
    assert frames.check_unary(SPEC, 0, answer(pb.DECISION_COVERED), decisions=True) is None


def test_check_unary_reports_a_wrong_decision_without_identity() -> None:
    problem = frames.check_unary(SPEC, 0, answer(pb.DECISION_NO_MATCH), decisions=True)
    assert problem == "covered: decision NO_MATCH, expected COVERED"
    assert SPEC.nir not in problem


def test_check_unary_expects_invalid_argument_for_invalid_requests() -> None:
    bad = spec(INVALID)
    assert frames.check_unary(bad, 3, None, decisions=True) is None
    assert "grpc-status 0" in (frames.check_unary(bad, 0, answer(1), decisions=True) or "")


def test_check_unary_reports_grpc_errors() -> None:
    assert frames.check_unary(SPEC, 8, None, decisions=True) == (
        "covered: grpc-status 8, expected 0"
    )


def test_check_unary_without_decisions_checks_only_status_and_shape() -> None:
    # The no-op ceiling answers COVERED to everything, including invalid requests.
    assert frames.check_unary(spec(INVALID), 0, answer(1), decisions=False) is None
    assert frames.check_unary(spec(INVALID), 3, None, decisions=False) is not None
    assert frames.check_unary(SPEC, 0, answer(0), decisions=False) is not None


def test_check_batch_checks_count_and_each_item() -> None:
    specs = [spec(COVERED, 0), spec(NOT_COVERED, 1), spec(INVALID, 2)]
    items = [
        pb.CheckCoverageResponse(decision=pb.DECISION_COVERED),
        pb.CheckCoverageResponse(decision=pb.DECISION_NOT_COVERED),
        pb.CheckCoverageResponse(error=status_pb2.Status(code=3, message="invalid")),
    ]
    good = pb.CheckCoverageBatchResponse(items=items).SerializeToString()
    assert frames.check_batch(specs, 0, good, decisions=True) == []
    short = pb.CheckCoverageBatchResponse(items=items[:2]).SerializeToString()
    assert frames.check_batch(specs, 0, short, decisions=True) == ["batch of 3: 2 items answered"]
    swapped = pb.CheckCoverageBatchResponse(items=[items[1], items[0], items[2]])
    problems = frames.check_batch(specs, 0, swapped.SerializeToString(), decisions=True)
    assert len(problems) == 2
    assert frames.check_batch(specs, 14, None, decisions=True) == [
        "batch of 3: grpc-status 14, expected 0"
    ]


def test_check_item_reads_refusals_in_error() -> None:
    refused = pb.CheckCoverageResponse(error=status_pb2.Status(code=8)).SerializeToString()
    assert frames.check_item(spec(INVALID), refused, decisions=True) == (
        "invalid: item error 8, expected code 3"
    )
    assert "refused with code 8" in (frames.check_item(SPEC, refused, decisions=True) or "")


# -- h2load ----------------------------------------------------------------------------------------

H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 5s of main duration for measurements.
Application protocol: h2c

finished in 5.00s, 2066.75 req/s, 331.60KB/s
requests: 10334 total, 10334 started, 10333 done, 10330 succeeded, 3 failed, 0 errored, 1 timeout
status codes: 10330 2xx, 0 3xx, 3 4xx, 0 5xx
traffic: 3.13MB (3285915) total, 58.89KB (60300) headers (space savings 96.28%), 2.12MB (2220000) data
                     min         max         mean         sd        +/- sd
time for request:      347us    125.10ms     61.72ms     13.45ms    75.23%
time for connect:      697us      1.25ms       968us       233us    50.00%
time to 1st byte:    12.95ms     79.85ms     41.87ms     33.30ms    75.00%
req/s           :     516.71      517.81      517.12        0.51    75.00%
"""  # noqa: E501


def test_parse_summary() -> None:
    s = h2load.parse_summary(H2LOAD_OUTPUT)
    assert s.seconds == 5.0
    assert s.req_per_s == 2066.75
    assert s.done == 10333 and s.succeeded == 10330
    assert s.http_failures == 4
    assert s.status_codes == {"2xx": 10330, "3xx": 0, "4xx": 3, "5xx": 0}
    assert s.traffic_bytes == {"total": 3285915, "headers": 60300, "data": 2220000}
    assert s.time_for_request["min"] == pytest.approx(347e-6)
    assert s.time_for_request["max"] == pytest.approx(0.1251)


def test_parse_summary_refuses_other_output() -> None:
    with pytest.raises(ValueError):
        h2load.parse_summary("-D: value error 0.500\n")


@pytest.mark.parametrize(("text", "seconds"), [("347us", 347e-6), ("9.06ms", 9.06e-3), ("2s", 2.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert h2load.parse_duration(text) == pytest.approx(seconds)


def test_parse_log_keeps_durations_of_2xx_and_counts_statuses() -> None:
    log = "1700000000000000\t200\t1045\n1700000000000100\t200\t2000\n1700000000000200\t-1\t5\n\n"
    durations, statuses = h2load.parse_log(log)
    assert durations == [1045, 2000]
    assert statuses == {200: 2, -1: 1}


def test_body_check() -> None:
    assert h2load.body_check(960, 10, 96)["ok"]
    missing = h2load.body_check(960 - 96 * 3, 10, 96)
    assert (missing["ok"], missing["responses_off"]) == (False, 3)
    # A different answer (a few bytes more or less) is a wrong answer too.
    assert h2load.body_check(960 - 7, 10, 96)["responses_off"] == 1
    # Calls cut off at the end may have part of their body counted, never a missing one.
    assert h2load.body_check(960 + 150, 10, 96, in_flight=2)["ok"]
    assert not h2load.body_check(960 + 96 * 3, 10, 96, in_flight=2)["ok"]
    # An expected trailers-only error has no body at all.
    assert h2load.body_check(0, 10, 0)["ok"]
    assert h2load.body_check(96, 10, 0)["responses_off"] == 10


def test_h2load_command() -> None:
    run = h2load.H2loadRun(
        url="http://127.0.0.1:1/covergate.v1.CoverageService/CheckCoverage",
        body=Path("/tmp/body.bin"),
        headers=h2load.grpc_headers("tok"),
        duration=0.5,
        clients=4,
        streams=8,
        rps=12.5,
        log_file=Path("/tmp/log.tsv"),
    )
    cmd = run.command("h2load")
    assert cmd[cmd.index("--duration") + 1] == "500ms"
    assert cmd[cmd.index("--rps") + 1] == "12.500"
    assert cmd[cmd.index("--log-file") + 1] == "/tmp/log.tsv"
    headers = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--header"]
    assert headers == [
        "content-type: application/grpc",
        "te: trailers",
        "authorization: Bearer tok",
    ]
    assert cmd[-1] == run.url
    five = h2load.H2loadRun(run.url, run.body, (), 5, 1, 1).command()
    assert five[five.index("--duration") + 1] == "5s" and "--rps" not in five


# -- arithmetic ------------------------------------------------------------------------------------


def test_median() -> None:
    assert stats.median([3, 1, 2]) == 2
    assert stats.median([4, 1, 3, 2]) == 2.5
    assert stats.median([None, 5.0]) == 5.0
    assert stats.median([]) is None


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1, 2, 3, 4]
    assert stats.percentile(xs, 50) == 2.5
    assert stats.percentile(xs, 0) == 1 and stats.percentile(xs, 100) == 4
    assert stats.percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_latency_summary_in_milliseconds() -> None:
    s = stats.latency_summary(list(range(1000, 101_000, 1000)))  # 1..100 ms
    assert s["count"] == 100
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["max_ms"] == 100
    assert stats.latency_summary([]) == {"count": 0}


def test_paired_ratios_pair_rounds() -> None:
    r = stats.paired_ratios([100, 200, 90], [50, 100, 100])
    assert r["per_round"] == [2.0, 2.0, 0.9]
    assert r["ratio"] == 2.0
    assert r["ratio_of_medians"] == pytest.approx(1.0)
    assert stats.paired_ratios([1.0], [0.0])["ratio"] is None


def test_goal_met() -> None:
    assert stats.goal_met(0.9, 0.85) is True
    assert stats.goal_met(0.8, 0.85) is False
    assert stats.goal_met(4.0, 5.0, higher_is_better=False) is True
    assert stats.goal_met(None, 1.0) is None


def test_open_loop_rate() -> None:
    assert stats.open_loop_rate(1000, 0.7, 16) == (700, 43.75)
    with pytest.raises(ValueError):
        stats.open_loop_rate(None, 0.7, 16)


def test_split_clients_by_weight() -> None:
    assert stats.split_clients({"a": 6, "b": 2, "c": 1, "d": 1}, 20) == {
        "a": 12,
        "b": 4,
        "c": 2,
        "d": 2,
    }
    assert stats.split_clients({"a": 1}, 16) == {"a": 16}
    assert stats.split_clients({"a": 99, "b": 1}, 4)["b"] == 1  # never zero connections


def test_relative_to_best() -> None:
    assert stats.relative_to_best([50.0, 100.0, 80.0]) == [0.5, 1.0, 0.8]
    assert stats.relative_to_best([]) == []


def test_cpu_share() -> None:
    assert stats.cpu_share(5.0, 5.0) == 1.0
    assert stats.cpu_share(None, 5.0) is None


# -- the plan --------------------------------------------------------------------------------------


def test_comparisons_and_goals_name_known_things() -> None:
    names = {c.name for c in plan.COMPARISONS}
    for c in plan.COMPARISONS:
        assert c.subject in VARIANTS and c.baseline in VARIANTS
        assert all(s in SCENARIOS for s in c.scenarios)
    for g in plan.GOALS:
        if g.source[0] == "ratio":
            comparison = next(c for c in plan.COMPARISONS if c.name == g.source[1])
            assert g.source[2] in comparison.scenarios
        if g.source[0] == "latency":
            assert (g.source[1], g.source[2]) in plan.OPEN_LOOP
        if g.source[0] == "latency_ratio":
            assert {(g.source[1], g.source[3]), (g.source[2], g.source[3])} <= set(plan.OPEN_LOOP)
    assert {"ceiling", "reference", "workers", "conventional"} <= names


def test_cells_cover_every_comparison_and_respect_a_selection() -> None:
    cells = plan.cells()
    for c in plan.COMPARISONS:
        for s in c.scenarios:
            assert (c.subject, s) in cells and (c.baseline, s) in cells
    assert ("covergate", "batch-100-mix") in cells
    assert len(cells) == len(set(cells))
    only = plan.cells(["unary"], ["covergate", "noop"])
    assert only == [("covergate", "unary"), ("noop", "unary")]


def test_rotated_alternates_order() -> None:
    assert plan.rotated(["a", "b"], 0) == ["a", "b"]
    assert plan.rotated(["a", "b"], 1) == ["b", "a"]
    assert plan.rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
    assert plan.rotated([], 3) == []


def test_reference_variant_forces_the_python_gate() -> None:
    env = VARIANTS["reference"].environment({"COVERGATE_REQUIRE_EXTENSIONS": "1", "PATH": "/bin"})
    assert env["COVERGATE_NO_EXTENSIONS"] == "1"
    assert "COVERGATE_REQUIRE_EXTENSIONS" not in env  # both set is a startup error
    assert VARIANTS["covergate"].environment({})["COVERGATE_REQUIRE_EXTENSIONS"] == "1"


def test_variant_commands() -> None:
    ctx = ServerContext("py", "/v/bin/covergate", Path("/d"), 2, "redis://127.0.0.1:1/0")
    cmd = VARIANTS["covergate-Nw"].command(ctx)
    assert cmd[:3] == ["/v/bin/covergate", "serve", "--insecure"]
    assert cmd[cmd.index("--workers") + 1] == "2" and cmd[cmd.index("--data") + 1] == "/d"
    assert VARIANTS["noop"].command(ctx)[:3] == ["py", "-m", "bench.noop_server"]
    conv = VARIANTS["conventional"].command(ctx)
    assert conv[conv.index("--redis") + 1] == "redis://127.0.0.1:1/0"
    assert VARIANTS["covergate-Nw"].worker_count(8) == 8
    assert VARIANTS["covergate"].worker_count(8) == 1


def test_config_placeholders_take_this_runs_redis_and_spool() -> None:
    ctx = ServerContext(
        "py", "cg", Path("/d"), 1, "redis://127.0.0.1:7/0", spool_dir=Path("/run/spool-x")
    )
    cluster = VARIANTS["covergate-cluster"]
    text = cluster.config_text(ctx)
    assert text is not None and 'redis = "redis://127.0.0.1:7/0"' in text
    assert cluster.needs_redis and cluster.own_data and "@" not in text
    tracing = VARIANTS["covergate-tracing"].config_text(ctx)
    assert tracing is not None and 'spool_dir = "/run/spool-x"' in tracing
    assert VARIANTS["covergate"].config_text(ctx) == VARIANTS["covergate"].config
    with pytest.raises(ValueError, match="redis_url"):
        cluster.config_text(ServerContext("py", "cg", Path("/d"), 1))


def test_cluster_comparisons_and_goals() -> None:
    comparisons = {c.name: c for c in plan.COMPARISONS}
    assert (comparisons["cluster"].subject, comparisons["cluster"].baseline) == (
        "covergate-cluster",
        "covergate",
    )
    assert comparisons["cluster-conventional"].baseline == "conventional"
    goals = {g.source: g.threshold for g in plan.GOALS}
    assert goals[("ratio", "cluster", "unary")] == 0.95
    assert goals[("ratio", "cluster", "batch-100")] == 0.95
    assert goals[("ratio", "tracing", "batch-100")] == 0.85
    cells = plan.cells(["unary", "batch-100"], ["covergate-cluster", "conventional"])
    assert ("covergate-cluster", "batch-100") in cells and ("conventional", "unary") in cells


# -- spans at the receiver, Redis calls, audit phases ---------------------------------------------


def _export_request(spans: bytes, schema_url: bool = False) -> bytes:
    from fastpath import trace as tr

    request = tr.export_trace_request(b"\x0a\x00", b"\x0a\x05scope", spans)
    if schema_url:  # ScopeSpans.schema_url after the spans: the field-by-field path
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        message = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
        message.resource_spans[0].scope_spans[0].schema_url = "https://example.org/schema"
        request = message.SerializeToString()
    return request


def _spans(lookups: int, unary: int, batches: int) -> bytes:
    from fastpath import trace as tr

    rng = random.Random(7)

    def ids(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    decision = tr.attr_str("covergate.decision", "COVERED")
    out = []
    for _ in range(lookups):
        name = tr.LOOKUP_SPAN_NAME
        out.append(tr.encode_span(ids(16), ids(8), ids(8), name, 1, 1, 2, decision))
    for _ in range(unary):
        name = tr.RPC_SPAN_NAMES[tr.METHODS.index("CheckCoverage")]
        out.append(tr.encode_span(ids(16), ids(8), b"", name, 2, 1, 2, decision))
    batch = tr.METHODS.index("CheckCoverageBatch")
    for _ in range(batches):
        out.append(tr.rpc_span(ids(16), ids(8), b"", batch, 0, b"", 100, 1, 2))
    return b"".join(out)


@pytest.mark.parametrize("schema_url", [False, True])
def test_count_spans_tells_lookups_from_call_spans(schema_url: bool) -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    request = _export_request(_spans(lookups=250, unary=30, batches=3), schema_url)
    counted = otlp_receiver.count_spans(request)
    assert (counted.spans, counted.lookup_spans) == (283, 280)
    decoded = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
    spans = [s for rs in decoded.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(spans) == counted.spans


def test_receiver_counts_over_grpc_and_in_its_counts_file() -> None:
    import grpc

    receiver = otlp_receiver.OtlpReceiver(keep=False).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
            export = channel.unary_unary(f"/{otlp_receiver.TRACE_SERVICE}/Export")
            export(_export_request(_spans(lookups=10, unary=2, batches=1)), timeout=5)
            export(_export_request(_spans(lookups=5, unary=0, batches=0)), timeout=5)
        counts = otlp_receiver.counts(f"127.0.0.1:{receiver.port}")
    finally:
        receiver.stop()
    assert (counts["spans"], counts["lookup_spans"], counts["trace_calls"]) == (18, 17, 2)
    assert counts["first_spans"] == 13 and counts["last_at"] >= counts["first_at"] > 0


def test_span_audit_counts_lost_lookups_and_the_edge() -> None:
    before = {"spans": 100, "lookup_spans": 90}
    after = {"spans": 10_201, "lookup_spans": 10_090}
    ok = stats.span_audit(10_000, before, after, in_flight=200)
    assert ok["lookup_spans"] == 10_000 and ok["spans"] == 10_101
    assert ok["spans_per_lookup"] == 1.0 and ok["lost"] == 0 and ok["in_flight_lookups"] == 200
    short = stats.span_audit(12_000, before, after)
    assert short["lost"] == 2_000 and short["spans_per_lookup"] == pytest.approx(10_000 / 12_000)
    assert stats.span_audit(0, before, before)["spans_per_lookup"] is None


def test_redis_per_lookups_takes_off_the_readings_own_calls() -> None:
    before = {"reads": 1_000, "commands": 5_000}
    after = {"reads": 1_011, "commands": 5_041}
    figures = stats.redis_per_lookups(before, after, 10_000)
    assert (figures["round_trips"], figures["commands"]) == (10, 40)
    assert figures["round_trips_per_1000"] == 1.0 and figures["commands_per_1000"] == 4.0
    assert stats.redis_per_lookups(before, before, 0)["round_trips_per_1000"] is None


def test_window_rate_uses_whole_seconds_inside_the_window() -> None:
    timeline = [[100, 50, 0], [101, 1000, 0], [102, 2000, 0], [103, 3000, 5], [104, 10, 0]]
    assert audit.window_rate(timeline, 100.5, 103.0) == 1500.0  # seconds 101 and 102
    assert audit.window_rate(timeline, 103.0, 104.0) == 3000.0
    assert audit.window_rate(timeline, 200.0, 300.0) is None


def test_refusal_summary_and_labels_from_error_info() -> None:
    import grpc
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="AUDIT_BACKLOG", domain="covergate"))
    status = status_pb2.Status(code=14, message="audit backlog", details=[detail])
    trailing = (("grpc-status-details-bin", status.SerializeToString()),)
    label = audit_client.refusal_label(grpc.StatusCode.UNAVAILABLE, trailing)
    assert label == "UNAVAILABLE AUDIT_BACKLOG"
    assert audit_client.refusal_label(grpc.StatusCode.DEADLINE_EXCEEDED, ()) == (
        "DEADLINE_EXCEEDED"
    )
    summary = audit.refusal_summary({label: 30, "UNAVAILABLE": 10})
    assert summary == {"refused": 40, "backlog_share": 0.75}
    assert audit.refusal_summary({}) == {"refused": 0, "backlog_share": None}


def test_settle_waits_for_an_empty_spool_and_a_stable_count(tmp_path: Path) -> None:
    from service import spool as sp

    spool = tmp_path / "spool"
    writer_dir = spool / "w-1-1"
    writer_dir.mkdir(parents=True)
    header = sp.segment_header(b"", b"")
    (writer_dir / sp.segment_name(0)).write_bytes(header + b"\x12\x01\x00")
    arrived = iter([0, 0, 0, 1, 1, 1, 1])
    seen: list[int] = []

    def counts() -> dict[str, int]:
        n = next(arrived)
        seen.append(n)
        if n:  # the receiver acknowledged: the shipper moved the cursor past the span
            sp.write_cursor(writer_dir, 0, len(header) + 3)
        return {"spans": n}

    result, _ = audit.settle(spool, counts, timeout=10)
    assert result == {"spans": 1}
    assert seen[-2:] == [1, 1]  # the count was the same twice with nothing pending
    (writer_dir / sp.segment_name(1)).write_bytes(header + b"\x12\x01\x00")  # never shipped
    never, _ = audit.settle(spool, lambda: {"spans": 1}, timeout=0.6)
    assert never is None


# -- report ----------------------------------------------------------------------------------------


def closed_cell(variant: str, scenario: str, items: list[float]) -> dict[str, object]:
    return {
        "variant": variant,
        "scenario": scenario,
        "rounds": [
            {"calls_per_s": x, "items_per_s": x, "server_cpu": 1.0, "client_cpu": 0.1}
            for x in items
        ],
        "median_calls_per_s": stats.median(items),
        "median_items_per_s": stats.median(items),
        "median_server_cpu": 1.0,
        "median_client_cpu": 0.1,
    }


def synthetic_results() -> dict[str, object]:
    closed = [
        closed_cell("covergate", "unary", [900, 950, 1000]),
        closed_cell("noop", "unary", [1000, 1000, 1000]),
        closed_cell("covergate", "batch-100", [50_000, 60_000, 70_000]),
        closed_cell("noop", "batch-100", [100_000, 100_000, 100_000]),
    ]
    results: dict[str, object] = {
        "started_at": "2025-06-15T10:00:00",
        "options": {"rounds": 3, "duration": 5.0, "open_fraction": 0.7},
        "environment": {
            "cpu_model": "test CPU",
            "cores": 2,
            "fastpath": "cython",
            "grpcio": "1",
            "python": "3.11",
        },
        "dataset": {"beneficiaries": 1_000_000, "rights_rows": 4_000_000},
        "placement": {"summary": "test placement"},
        "noise": {},
        "closed_loop": closed,
        "open_loop": [
            {
                "variant": "covergate",
                "scenario": "unary",
                "rounds": [{"p99_ms": 6.0}],
                "median": {"p50_ms": 1.0, "p99_ms": 6.0},
            },
            {
                "variant": "noop",
                "scenario": "unary",
                "rounds": [{"p99_ms": 4.0}],
                "median": {"p50_ms": 1.0, "p99_ms": 4.0},
            },
        ],
        "micro": {
            "decisions": {
                "cython": {"batch_100": {"median": 2_000_000.0, "rounds": [2e6]}},
                "python": {"batch_100": {"median": 100_000.0, "rounds": [1e5]}},
                "ratios": {"batch_100": 20.0},
            }
        },
        "checks": {"probe_calls": 10, "stream_checked": 0},
        "failures": [],
    }
    results["comparisons"] = report.comparisons(closed)  # type: ignore[arg-type]
    results["goals"] = report.evaluate_goals(results)
    return results


def test_comparisons_and_goals_from_results() -> None:
    results = synthetic_results()
    ceiling = {c["scenario"]: c for c in results["comparisons"]}  # type: ignore[attr-defined]
    assert ceiling["unary"]["ratio"] == pytest.approx(0.95)
    assert ceiling["batch-100"]["ratio"] == pytest.approx(0.6)
    goals = {g["name"]: g for g in results["goals"]}  # type: ignore[attr-defined]
    assert goals["unary vs ceiling"]["met"] is True
    assert goals["batch-100 vs ceiling"]["met"] is False
    assert goals["fast path rate"]["met"] is True
    assert goals["fast path vs reference"]["value"] == 20.0
    assert (goals["unary p99 at 70%"]["met"], goals["unary p99 at 70%"]["value"]) == (False, 1.5)
    assert goals["workers on batches"]["met"] is None  # not measured


def test_render_marks_goals() -> None:
    text = report.render(synthetic_results())
    assert "| unary     | covergate |" in text
    assert "**MISSED**" in text and "| met" in text and "not measured" in text
    assert "no failure." in text


def test_markdown_table_alignment() -> None:
    text = report.table(["a", "b"], [["x", "1"], ["yy", "22"]])
    assert text.splitlines() == ["| a  |  b |", "|:---|---:|", "| x  |  1 |", "| yy | 22 |"]


# -- dataset ---------------------------------------------------------------------------------------


def test_cache_key_names_size_and_formats() -> None:
    key = dataset.cache_key(1_000_000)
    assert key.startswith("b1000000-store") and f"fmt{dataset.CACHE_FORMAT}" in key


RIGHTS = """\
nir,nir_key,birth_date,birth_rank,amc_number,member_number,domain,rate_percent,convention_type,start_date,end_date
1850775123456,39,19850701,1,310457218,A1,PHAR,100,TP01,20240101,20261231
1850775123456,39,19850701,1,310457218,A1,MEDE,70,TP01,20240101,20261231
1850775123456,39,19850701,2,310457218,A2,HOSP,100,HO01,20240101,20261231
2900101234567,40,19900101,1,440198362,,PHAR,100,TP02,20200101,20201231
"""


def test_beneficiaries_group_rows_by_identity(tmp_path: Path) -> None:
    path = tmp_path / "rights.csv"
    path.write_text(RIGHTS)
    groups = list(dataset.beneficiaries(path))
    assert [ident for ident, _ in groups] == [
        ("1850775123456", "39", "19850701", 1),
        ("1850775123456", "39", "19850701", 2),
        ("2900101234567", "40", "19900101", 1),
    ]
    assert len(groups[0][1]) == 2


def test_classify_picks_covered_then_not_covered(tmp_path: Path) -> None:
    path = tmp_path / "rights.csv"
    path.write_text(RIGHTS)
    groups = list(dataset.beneficiaries(path))
    kinds = [dataset.classify(i, rows, "20250615") for i, rows in groups]
    assert kinds[0] is not None and kinds[0][0] == COVERED and kinds[0][1].member_number == "A1"
    assert kinds[1] is not None and kinds[1][0] == NOT_COVERED  # hospital only: no PHAR
    assert kinds[2] is not None and kinds[2][0] == NOT_COVERED  # PHAR ended in 2020


def test_no_match_and_invalid_variants_of_a_card() -> None:
    nm = dataset.no_match(SPEC)
    assert (nm.kind, nm.birth_rank) == (NO_MATCH, 9) and nm.nir == SPEC.nir
    bad = dataset.invalid(SPEC)
    assert bad.kind == INVALID and bad.nir_key != SPEC.nir_key and len(bad.nir_key) == 2
    assert dataset.invalid(CheckSpec(**{**SPEC.to_json(), "nir_key": "97"})).nir_key == "01"  # type: ignore[arg-type]


def test_reservoir_is_a_uniform_sample_of_k() -> None:
    sample = dataset.reservoir(iter(range(1000)), 10, random.Random(1))
    assert len(sample) == 10 and len(set(sample)) == 10
    assert dataset.reservoir(iter(range(3)), 10, random.Random(1)) == [0, 1, 2]


def test_items_per_call() -> None:
    assert SCENARIOS["unary"].items_per_call == 1
    assert SCENARIOS["batch-500"].items_per_call == 500
    assert SCENARIOS["stream-100"].items_per_call == 100  # one h2load call, 100 messages
    assert SCENARIOS["stream"].items_per_call == 1  # grpc.aio client counts messages itself


def test_load_bound_marks_a_saturated_pinned_generator() -> None:
    cell = {"median_client_cpu": 0.95, "rounds": [{"client_cpus": "1"}]}
    assert report.load_bound(cell)
    assert not report.load_bound({**cell, "median_client_cpu": 0.5})
    assert not report.load_bound({**cell, "rounds": [{"client_cpus": "0,1"}]})
    assert not report.load_bound({"median_client_cpu": None, "rounds": []})


def test_comparisons_pair_rounds_on_rate_and_on_rate_per_server_cpu() -> None:
    from bench import report

    def cell(variant: str, rounds: list[tuple[float, float]]) -> dict[str, object]:
        return {
            "variant": variant,
            "scenario": "unary",
            "rounds": [{"items_per_s": r, "server_cpu": c} for r, c in rounds],
        }

    # Round 2: the host took half the subject's core away (steal): its rate halves, its rate
    # per CPU-second does not.
    closed = [
        cell("covergate-tracing", [(900, 1.0), (450, 0.5), (920, 1.0)]),
        cell("covergate", [(1000, 1.0), (1000, 1.0), (1000, 1.0)]),
    ]
    (tracing,) = [c for c in report.comparisons(closed) if c["name"] == "tracing"]
    assert tracing["per_round"] == [0.9, 0.45, 0.92]
    assert tracing["ratio"] == 0.9
    assert tracing["per_round_per_cpu"] == [0.9, 0.9, 0.92]
    assert tracing["ratio_per_cpu"] == 0.9
    assert stats.per_cpu(100.0, 0.0) is None and stats.per_cpu(None, 1.0) is None

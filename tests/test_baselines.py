"""Per-practitioner baselines in the fast path, on both implementations: the Paris clock, the
rolling Bloom window (a repeat never counts as new), the signals and the policy that suspends, and
a differential property test over every byte of the baseline file with a clock the test controls.
"""

from __future__ import annotations

import datetime
import zoneinfo
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import NOW, UNKNOWN_IDENTITY, RightsStore
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from spans import masked_spans

from covergate.v1 import covergate_pb2 as pb
from fastpath import baselines, rules
from fastpath import trace as tr
from fastpath.baselines import BaselineFile, BaselineProfile
from fastpath.quota import FLAG_SUSPENDED, SHADOW_GUARD, QuotaFile, QuotaProfile
from fastpath.rules import Practitioner

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
QUOTA = QuotaProfile(
    rate_per_minute=6000, burst=6000, daily_limit=100_000, distinct_limit=3000, shadow=SHADOW_GUARD
)
AMCS = frozenset({"123456789"})


def person(i: int) -> bytes:
    """A synthetic beneficiary (valid, in no record): one birth date and rank per index."""
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=i // 9)
    return UNKNOWN_IDENTITY.request(
        request_id=f"r{i}", birth_date=day.strftime("%Y%m%d"), birth_rank=1 + i % 9
    ).SerializeToString()


def practitioner(profile: BaselineProfile, slot: int = 1) -> Practitioner:
    return Practitioner(
        practitioner_id="10001234567",
        profession="pharmacist",
        amc_numbers=AMCS,
        slot=slot,
        domains=rules.ALL_DOMAINS,
        quota=QUOTA,
        baseline=profile,
    )


def paris_day(now: float) -> int:
    return int(datetime.datetime.fromtimestamp(now, PARIS).strftime("%Y%m%d"))


@pytest.mark.parametrize("year", [2024, 2025, 2026, 2031])
def test_the_paris_hour_in_integers_is_zoneinfo_s(year: int) -> None:
    start = datetime.datetime(year, 1, 1, tzinfo=datetime.UTC).timestamp()
    for step in range(0, 366 * 24 * 4, 7):  # every 105 minutes through the year
        now = start + step * 900
        local = datetime.datetime.fromtimestamp(now, PARIS)
        assert baselines.paris_hour(paris_day(now), int(now * 1000)) == local.hour, local
        assert (
            baselines.day_number(paris_day(now)) == (local.date() - datetime.date(1970, 1, 1)).days
        )


@pytest.fixture
def files(tmp_path: Path) -> Any:
    quota = QuotaFile(tmp_path / "quota" / "state", 4)
    base = BaselineFile(tmp_path / "quota" / "baseline", 4)
    yield quota, base
    base.close()
    quota.close()


def traced_gate(gate_module: ModuleType, rights_env: RightsStore, quota: Any, base: Any) -> Any:
    """A gate with quotas, baselines and tracing (spans of a fixed seed)."""
    return gate_module.Gate(
        rights_env.env,
        rights_env.db,
        rights_env.keys,
        quota=quota,
        baseline=base,
        trace=True,
        trace_seed=5,
    )


def run_days(
    gate: Any, p: Practitioner, days: list[list[int]], start: float = NOW, hour: int = 10
) -> float:
    """Each day's beneficiaries looked up from `hour` (Paris, summer), one a minute."""
    now = start
    for people in days:
        day_start = now - (now + 7200) % 86400 + hour * 3600
        for k, i in enumerate(people):
            t = day_start + 60 * k
            gate.check(p, person(i), paris_day(t), t)
        now = day_start - hour * 3600 + 86400
    return now


def test_a_repeat_patient_never_counts_as_new(
    gate_module: ModuleType, rights_env: RightsStore, files: Any
) -> None:
    quota, base = files
    gate = gate_module.Gate(
        rights_env.env, rights_env.db, rights_env.keys, quota=quota, baseline=base
    )
    p = practitioner(BaselineProfile())
    try:
        patients = list(range(400))
        # 55 days: every patient comes back at least once a fortnight, across segment rotations.
        days = [[patients[(d * 29 + k) % 400] for k in range(30)] for d in range(55)]
        run_days(gate, p, days[:28])
        seen_before = set(i for day in days[:28] for i in day)
        now = run_days(gate, p, days[28:], start=NOW + 28 * 86400)
        state = base.read(p.slot)
        assert state.day == paris_day(now - 86400 + 11 * 3600)
        # Today's patients were all seen in the window: none is new.
        assert set(days[-1]) <= seen_before and state.new == 0, state.new
        assert state.days_active == 54 and state.lookups == 30
        assert gate.anomaly_counts() == (0,) * (tr.N_PROFESSIONS * baselines.N_SIGNALS)
    finally:
        gate.close()


def test_a_list_walker_is_flagged_on_its_first_day_and_the_policy_suspends(
    gate_module: ModuleType, rights_env: RightsStore, files: Any
) -> None:
    quota, base = files
    gate = traced_gate(gate_module, rights_env, quota, base)
    enforce = baselines.SIG_NEW_TODAY | baselines.SIG_NEW_SHARE
    p = practitioner(BaselineProfile(enforce=enforce))
    try:
        regulars = [[(d * 7 + k) % 60 for k in range(25)] for d in range(20)]
        now = run_days(gate, p, regulars)
        gate.take_spans()
        assert gate.suspensions == [] and not any(gate.anomaly_counts())
        # Stolen: a leaked list of people it never saw, at night.
        day = paris_day(now + 3600)
        codes = []
        for k in range(200):
            codes.append(gate.check(p, person(10_000 + k), day, now + 3600 + 30 * k)[0])
        assert gate.suspensions == ["10001234567"]
        assert quota.read(p.slot).flags & FLAG_SUSPENDED
        assert base.read(p.slot).suspended_by == enforce
        first_denied = codes.index(rules.PERMISSION_DENIED)
        assert 20 <= first_denied < 60 and set(codes[first_denied:]) == {rules.PERMISSION_DENIED}
        counts = gate.anomaly_counts()
        pharmacist = tr.PROFESSIONS.index("pharmacist") * baselines.N_SIGNALS
        assert counts[pharmacist + 0] == counts[pharmacist + 1] == 1
        spans = gate.take_spans()
        assert spans.count(b"covergate.anomaly\x1a") == sum(counts)
        assert b"new_today" in spans and b"new_share" in spans
        assert UNKNOWN_IDENTITY.birth_date.encode() not in spans
    finally:
        gate.close()


def test_a_slow_walker_within_its_practice_s_noise_raises_new_excess(
    gate_module: ModuleType, rights_env: RightsStore, files: Any
) -> None:
    """A practice that sees 10 new people a day among 30: a walk of 12 more is within its noise
    for new_today (under 4 deviations) and new_share (under 4 binomial deviations), and raises
    new_excess (3 and 2), which suspends on its own when enforced."""
    quota, base = files
    gate = traced_gate(gate_module, rights_env, quota, base)
    p = practitioner(BaselineProfile(enforce=baselines.SIG_NEW_EXCESS))

    def day_of(d: int, walked: int = 0) -> list[int]:
        regulars = [(d * 20 + k) % 40 for k in range(20)]
        new = [1000 + 10 * d + k for k in range(10)] + [50_000 + k for k in range(walked)]
        # Interleaved: the new people spread over the day, as a walk among the practice's own.
        people = []
        for k in range(max(len(regulars), len(new))):
            people += regulars[k : k + 1] + new[k : k + 1]
        return people

    try:
        now = run_days(gate, p, [day_of(d) for d in range(30)])
        gate.take_spans()
        assert gate.suspensions == [] and not any(gate.anomaly_counts())
        state = base.read(p.slot)
        assert 33 <= state.mean_share // baselines.FIXED <= 36  # % new, usually
        assert 10 <= state.mean_new // baselines.FIXED <= 11
        run_days(gate, p, [day_of(30, walked=12)], start=now)
        state = base.read(p.slot)
        # Raised at the 41st lookup (11 walked): the 42nd is refused, the practitioner suspended.
        assert (state.lookups, state.new) == (41, 21)
        assert state.fired == baselines.SIG_NEW_EXCESS
        assert gate.suspensions == ["10001234567"]
        assert quota.read(p.slot).flags & FLAG_SUSPENDED
        assert state.suspended_by == baselines.SIG_NEW_EXCESS
        spans = gate.take_spans()
        assert b"new_excess" in spans and b"new_today" not in spans
    finally:
        gate.close()


def test_the_baseline_survives_reopening(
    gate_module: ModuleType, rights_env: RightsStore, tmp_path: Path
) -> None:
    def open_gate() -> tuple[Any, QuotaFile, BaselineFile]:
        quota = QuotaFile(tmp_path / "state", 4)
        base = BaselineFile(tmp_path / "baseline", 4)
        return (
            gate_module.Gate(
                rights_env.env, rights_env.db, rights_env.keys, quota=quota, baseline=base
            ),
            quota,
            base,
        )

    p = practitioner(BaselineProfile())
    gate, quota, base = open_gate()
    now = run_days(gate, p, [[1, 2, 3], [2, 3, 4]])
    before = bytes(base.map[:])
    gate.close()
    base.close()
    quota.close()
    gate, quota, base = open_gate()
    try:
        assert bytes(base.map[:]) == before
        gate.check(p, person(3), paris_day(now), now)
        assert base.read(p.slot).new == 0 and base.read(p.slot).days_active == 2
    finally:
        gate.close()
        base.close()
        quota.close()


base_profiles = st.builds(
    BaselineProfile,
    learn_days=st.integers(1, 3),
    min_lookups=st.integers(1, 4),
    new_share_percent=st.sampled_from([0, 50, 90]),
    share_margin=st.sampled_from([0, 10]),
    new_min=st.integers(1, 3),
    new_mult_percent=st.sampled_from([0, 100, 200]),
    sigma=st.integers(1, 3),
    volume_min=st.integers(1, 4),
    volume_mult_percent=st.sampled_from([0, 150]),
    off_permille=st.sampled_from([0, 100, 500]),
    off_min=st.integers(1, 3),
    share_sigma=st.integers(1, 3),
    excess_min=st.integers(1, 3),
    excess_sigma=st.integers(1, 3),
    excess_share_sigma=st.integers(1, 3),
    excess_margin=st.sampled_from([0, 10]),
    enforce=st.integers(0, 31),
)
base_steps = st.lists(
    st.tuples(
        st.sampled_from(["check", "check_item", "check_batch"]),
        st.lists(st.integers(0, 30), min_size=1, max_size=4),
        st.sampled_from([0.0, 60.0, 3600.0 * 5, 86400.0, 86400.0 * 3, 86400.0 * 31]),
    ),
    min_size=1,
    max_size=30,
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(profile=base_profiles, calls=base_steps, traced=st.booleans())
def test_baselines_identical_in_c_and_python(
    cython_gate_module: ModuleType,
    python_gate_module: ModuleType,
    rights_env: RightsStore,
    tmp_path_factory: pytest.TempPathFactory,
    profile: BaselineProfile,
    calls: list[tuple[str, list[int], float]],
    traced: bool,
) -> None:
    """Both gates observe alike: decisions, suspensions, signal counts, spans with their
    covergate.anomaly events, and every byte of the quota and baseline files."""
    tmp = tmp_path_factory.mktemp("b")
    quotas = [QuotaFile(tmp / f"q{i}", 4) for i in range(2)]
    bases = [BaselineFile(tmp / f"b{i}", 4) for i in range(2)]
    gates: list[Any] = []
    try:
        gates += [
            m.Gate(
                rights_env.env,
                rights_env.db,
                rights_env.keys,
                quota=q,
                baseline=b,
                trace=traced,
                trace_seed=7,
                max_batch_items=4,
            )
            for m, q, b in zip((cython_gate_module, python_gate_module), quotas, bases, strict=True)
        ]
        p = practitioner(profile, slot=2)
        now = float(NOW)
        for method, people, advance in calls:
            now += advance
            today = paris_day(now)
            if method == "check_batch":
                args = pb.CheckCoverageBatchRequest(
                    items=[pb.CheckCoverageRequest.FromString(person(i)) for i in people]
                ).SerializeToString()
            else:
                args = person(people[0])
            results = [getattr(g, method)(p, args, today, now) for g in gates]
            assert results[0] == results[1], method
            if traced:
                spans = [masked_spans(g.take_spans()) for g in gates]
                assert spans[0] == spans[1], method
            assert gates[0].anomaly_counts() == gates[1].anomaly_counts()
            assert gates[0].suspensions == gates[1].suspensions
        event("signals raised" if any(gates[0].anomaly_counts()) else "no signal")
        event("suspended" if gates[0].suspensions else "not suspended")
        assert bases[0].map[:] == bases[1].map[:]
        assert quotas[0].map[:] == quotas[1].map[:]
    finally:
        for g in gates:
            g.close()
        for f in (*bases, *quotas):
            f.close()


@settings(max_examples=80, deadline=None)
@given(
    profile=base_profiles,
    steps=st.lists(
        st.tuples(st.integers(0, 40), st.sampled_from([0, 60_000, 5 * 3_600_000, 86_400_000])),
        min_size=1,
        max_size=60,
    ),
)
def test_observe_baseline_identical_in_c_and_python(
    cython_gate_module: ModuleType,
    profile: BaselineProfile,
    steps: list[tuple[int, int]],
) -> None:
    """The simulation's entry point (fastpath.observe_baseline) is the gates' own code: C and
    Python agree on every return and every byte of the record."""
    import fastpath

    records = [bytearray(baselines.RECORD_SIZE) for _ in range(2)]
    now_ms = NOW * 1000
    for person_index, advance in steps:
        now_ms += advance
        today = paris_day(now_ms / 1000)
        key = person(person_index)[-16:].ljust(16, b"\0")
        results = [
            observe(r, 0, profile, today, now_ms, 1, key)
            for observe, r in zip(
                (cython_gate_module.observe_baseline, fastpath._observe_baseline),
                records,
                strict=True,
            )
        ]
        assert results[0] == results[1]
        assert records[0] == records[1]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[baselines]\nenforce = ['caps']\n", "enforce must list"),
        ("[baselines]\nsigma = 0\n", "sigma"),
        ("[baselines]\nexcess_share_sigma = 9\n", "excess_share_sigma must be 1..8"),
        ("[professions.transport.baselines]\nexcess_min = 0\n", "excess_min must be 1.."),
        ("[baselines]\nlearn = 3\n", "no setting 'learn'"),
        ("[professions.hospital.baselines]\nnew_min = 'x'\n", "new_min must be an integer"),
    ],
)
def test_baseline_settings_are_checked(tmp_path: Path, toml: str, message: str) -> None:
    from service.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_baseline_settings_reach_the_profile(tmp_path: Path) -> None:
    from service.config import load_config

    path = tmp_path / "c.toml"
    path.write_text(
        "[baselines]\nenforce = ['new_today', 'new_share']\nlearn_days = 7\n"
        "[professions.hospital.baselines]\nsigma = 6\nexcess_margin = 8\n"
    )
    config = load_config(path)
    hospital, pharmacist = (
        config.baseline_profile("hospital"),
        config.baseline_profile("pharmacist"),
    )
    assert hospital is not None and pharmacist is not None
    assert (hospital.sigma, pharmacist.sigma, pharmacist.learn_days) == (
        6,
        BaselineProfile.sigma,
        7,
    )
    assert (hospital.excess_margin, pharmacist.excess_margin) == (8, BaselineProfile.excess_margin)
    assert pharmacist.enforce == baselines.SIG_NEW_TODAY | baselines.SIG_NEW_SHARE
    path.write_text("[baselines]\nenforce = ['new_excess']\n")
    dentist = load_config(path).baseline_profile("dentist")
    assert dentist is not None and dentist.enforce == baselines.SIG_NEW_EXCESS
    path.write_text("[baselines]\nenabled = false\n")
    assert load_config(path).baseline_profile("pharmacist") is None

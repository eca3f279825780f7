"""Realistic workloads against the default quota profiles, in the fast path with a simulated clock:
legitimate practitioners of every profession never notice the limits; a guesser is suspended
within 50 lookups; a credential walking a list of real identities stops at its distinct cap, and
unary, batch and stream calls obey the same limits.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import random
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from harness import make_identity

from covergate.v1 import covergate_pb2 as pb
from fastpath import Keys, rules
from fastpath.quota import QuotaFile
from service import demo
from service.config import PROFESSIONS, load_config
from service.importer import import_rights
from service.quotas import PractitionerFactory
from service.store import PractitionerRecord, Store

pytestmark = pytest.mark.slow  # simulated days of lookups: `make test-fast` skips them

DAY = datetime.date(2026, 3, 10)
TODAY = int(DAY.strftime("%Y%m%d"))
OPENING = datetime.datetime(2026, 3, 10, 8, 0, tzinfo=datetime.UTC).timestamp()
CONFIG = load_config(None)

# Patients a practitioner of each profession sees in a busy day (repeat checks come on top).
PATIENTS_PER_DAY = {
    "pharmacist": 350, "physician": 45, "dentist": 25, "optician": 20, "audiologist": 10,
    "laboratory": 250, "radiology": 90, "paramedical": 30, "hospital": 500, "transport": 25,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Card:
    """What a tiers-payant card shows: identity, insurer, member number, and its rights' domains."""

    nir: str
    nir_key: str
    birth_date: str
    birth_rank: int
    amc_number: str
    member_number: str
    domains: frozenset[str]

    def request(self, domain: str, **overrides: Any) -> bytes:
        fields: dict[str, Any] = {
            "nir": self.nir, "nir_key": self.nir_key, "birth_date": self.birth_date,
            "birth_rank": self.birth_rank, "amc_number": self.amc_number,
            "member_number": self.member_number, "domain": rules.DOMAIN_CODES[domain],
        }  # fmt: skip
        fields.update(overrides)
        return pb.CheckCoverageRequest(**fields).SerializeToString()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("workloads")
    files = demo.generate(tmp / "csv", beneficiaries=4000, today=DAY)
    keys = Keys(b"workload-tests-pepper-not-real!!")
    store = Store(tmp / "data")
    import_rights(store, keys, files.rights_csv, progress=False)
    cards: dict[tuple[str, ...], set[str]] = {}
    with open(files.rights_csv, newline="") as f:
        for row in csv.DictReader(f):
            key = (row["nir"], row["nir_key"], row["birth_date"], row["birth_rank"],
                   row["amc_number"], row["member_number"])  # fmt: skip
            cards.setdefault(key, set()).add(row["domain"])
    deck = [Card(k[0], k[1], k[2], int(k[3]), k[4], k[5], frozenset(d)) for k, d in cards.items()]
    amcs = frozenset(c.amc_number for c in deck)
    yield store, keys, deck, amcs
    store.close()


@pytest.fixture
def quota_file(tmp_path: Path) -> Any:
    q = QuotaFile(tmp_path / "quota", 16)
    yield q
    q.close()


def practitioner_for(profession: str, amcs: frozenset[str], slot: int = 1) -> Any:
    record = PractitionerRecord("10000000001", profession, sorted(amcs), slot=slot)
    return PractitionerFactory(CONFIG)(record)


def make_gate(gate_module: ModuleType, world: Any, quota_file: QuotaFile) -> Any:
    store, keys, _, _ = world
    return gate_module.Gate(store.env, store.rights_db, keys, quota=quota_file)


def busy_day(profession: str, deck: list[Card], rng: random.Random) -> list[tuple[float, bytes]]:
    """(seconds after opening, request) for one practitioner's day: a queue at opening, repeat
    patients, twins, typos corrected on the spot, and cards of every kind."""
    domains = CONFIG.profession_domains[profession]
    n = PATIENTS_PER_DAY[profession]
    # Most patients hold coverage for the care they come for; some do not (NOT_COVERED).
    covered = [c for c in deck if c.domains & set(domains)]
    patients = rng.sample(covered, n - n // 10) + rng.sample(deck, n // 10)
    lookups: list[tuple[float, bytes]] = []
    burst = max(5, len(patients) // 12)  # the queue waiting at opening time
    for i, card in enumerate(patients):
        t = i * 1.5 if i < burst else rng.uniform(600, 10 * 3600)
        own = sorted(card.domains & set(domains)) or list(domains)
        domain = rng.choice(own)
        if rng.random() < 0.03:  # a typo in the key, noticed and corrected
            wrong = f"{(int(card.nir_key) + 1) % 100:02d}"
            lookups.append((t, card.request(domain, nir_key=wrong)))
            t += 20
        lookups.append((t, card.request(domain)))
        for _ in range(rng.choice((0, 0, 1, 2))):  # back for another prescription or act
            lookups.append((t + rng.uniform(300, 3 * 3600), card.request(domain)))
    lookups.sort(key=lambda x: x[0])
    return lookups


@pytest.mark.parametrize("profession", PROFESSIONS)
def test_a_busy_day_never_meets_a_limit(
    gate_module: ModuleType, world: Any, quota_file: QuotaFile, profession: str
) -> None:
    _, _, deck, amcs = world
    gate = make_gate(gate_module, world, quota_file)
    p = practitioner_for(profession, amcs)
    outcomes: Counter[int] = Counter()
    decisions: Counter[int] = Counter()
    for t, request in busy_day(profession, deck, random.Random(profession)):
        code, payload = gate.check(p, request, TODAY, OPENING + t)
        outcomes[code] += 1
        if code == rules.OK:
            decisions[pb.CheckCoverageResponse.FromString(payload).decision] += 1
    gate.close()
    refusals = {c: n for c, n in outcomes.items() if c not in (rules.OK, rules.INVALID_ARGUMENT)}
    assert refusals == {}, f"{profession}: refused {refusals}"
    assert gate.suspensions == []
    assert decisions[rules.DECISION_COVERED] > 0


def test_random_nir_guessing_is_suspended_within_50_lookups(
    gate_module: ModuleType, world: Any, quota_file: QuotaFile
) -> None:
    _, _, _, amcs = world
    gate = make_gate(gate_module, world, quota_file)
    p = practitioner_for("pharmacist", amcs)
    rng = random.Random(2024)
    amc = sorted(amcs)[0]
    for n in range(1, 51):
        guess = make_identity(rng)  # well-formed, correct key, nobody's
        request = pb.CheckCoverageRequest(
            **guess.fields(), amc_number=amc, domain=pb.CARE_DOMAIN_PHARMACY
        ).SerializeToString()
        code, _ = gate.check(p, request, TODAY, OPENING + n * 2.0)  # a patient bot
        if gate.suspensions:
            break
    assert gate.suspensions == [p.practitioner_id], "the guard never fired"
    assert n <= 50
    code, _ = gate.check(p, request, TODAY, OPENING + 200)
    assert code == rules.PERMISSION_DENIED
    gate.close()


@pytest.mark.parametrize("method", ["check", "check_batch", "check_item"])
def test_walking_a_list_of_real_identities_stops_at_the_distinct_cap(
    gate_module: ModuleType, world: Any, quota_file: QuotaFile, method: str
) -> None:
    _, _, deck, amcs = world
    gate = make_gate(gate_module, world, quota_file)
    p = practitioner_for("physician", amcs)
    cap = p.quota.distinct_limit
    people = {(c.nir, c.birth_date, c.birth_rank): c for c in deck if "MEDE" in c.domains}
    listed = list(people.values())[: cap + 40]  # one card per person: distinct people
    assert len(listed) == cap + 40
    admitted = refused = 0
    t = OPENING
    for start in range(0, len(listed), 10):
        chunk = [c.request("MEDE") for c in listed[start : start + 10]]
        t += 30.0  # at the sustained rate: the rate limit is not what stops it
        if method == "check_batch":
            batch = pb.CheckCoverageBatchRequest(
                items=[pb.CheckCoverageRequest.FromString(r) for r in chunk]
            ).SerializeToString()
            _, payload = gate.check_batch(p, batch, TODAY, t)
            items = pb.CheckCoverageBatchResponse.FromString(payload).items
            errors = [i.error for i in items if i.HasField("error")]
            admitted += len(items) - len(errors)
            refused += len(errors)
            assert all(e.code == rules.RESOURCE_EXHAUSTED for e in errors)
        else:
            for i, request in enumerate(chunk):
                if method == "check":
                    code, _ = gate.check(p, request, TODAY, t + i * 3)
                else:
                    item = pb.CheckCoverageResponse.FromString(
                        gate.check_item(p, request, TODAY, t + i * 3)
                    )
                    code = item.error.code if item.HasField("error") else rules.OK
                admitted += code == rules.OK
                refused += code == rules.RESOURCE_EXHAUSTED
        t += 30.0 * 10 / p.quota.rate_per_minute * 6
    assert (admitted, refused) == (cap, 40)
    assert gate.suspensions == []
    gate.close()

"""The demo data generator: valid, plausible, varied rows, and examples whose decisions hold.

Everything is checked by reading the written CSV files back, as the importer would.
"""

from __future__ import annotations

import csv
import datetime
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from fastpath import rules
from service import demo
from service.config import PROFESSIONS

TODAY = datetime.date(2024, 3, 15)
BENEFICIARIES = 3_000

RIGHTS_HEADER = [
    "nir",
    "nir_key",
    "birth_date",
    "birth_rank",
    "amc_number",
    "member_number",
    "domain",
    "rate_percent",
    "convention_type",
    "start_date",
    "end_date",
]
PRACTITIONERS_HEADER = ["practitioner_id", "profession", "amc_numbers", "status"]
REQUIRED_LABELS = {
    "covered pharmacy",
    "twin rank 2",
    "Corsican 2B",
    "lunar birth date",
    "expired rights",
    "future rights",
    "member number required",
}

Identity = tuple[str, str, int]


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def by_identity(rows: list[list[str]]) -> dict[Identity, list[list[str]]]:
    grouped: dict[Identity, list[list[str]]] = defaultdict(list)
    for row in rows:
        grouped[(row[0], row[2], int(row[3]))].append(row)
    return grouped


def decision(rows: list[list[str]], example: demo.ExampleIdentity, today: datetime.date) -> str:
    """Recomputed from the CSV rows, independently of the generator's own bookkeeping."""
    care_date = example.care_date or today.strftime("%Y%m%d")
    matched = [
        r
        for r in rows
        if r[4] == example.amc_number
        and (example.member_number == "" or r[5] == example.member_number)
    ]
    if not matched:
        return "NO_MATCH"
    for r in matched:
        if r[6] == example.domain and int(r[9]) <= int(care_date) <= int(r[10]):
            return "COVERED"
    return "NOT_COVERED"


def assert_valid_rights_row(row: list[str]) -> None:
    nir, key, birth, rank, amc, member, domain, rate, convention, start, end = row
    assert rules.valid_nir(nir) and rules.normalise_nir(nir) == nir
    assert rules.valid_nir_key_format(key) and int(key) == rules.nir_key_for(nir)
    assert rules.valid_birth_date(birth)
    assert len(rank) == 1 and 1 <= int(rank) <= 9
    assert rules.valid_amc_number(amc)
    assert rules.valid_member_number(member)
    assert domain in rules.DOMAIN_CODES
    assert rate.isdigit() and 0 <= int(rate) <= 100
    assert rules.valid_convention_type(convention)
    assert rules.valid_calendar_date(start) and rules.valid_calendar_date(end)
    assert start <= end


def assert_plausible_nir(nir: str, birth: str) -> None:
    assert nir[0] in "12"  # sex
    assert nir[1:3] == birth[2:4]  # year of birth
    assert nir[3:5] == (birth[4:6] if birth[4:6] != "00" else "99")  # month, 99 when unknown
    department = nir[5:7]
    assert department in ("2A", "2B", "97", "99") or 1 <= int(department) <= 95
    assert department != "20"  # Corsica is 2A / 2B
    assert nir[10:13] != "000"  # order number


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoFiles:
    return demo.generate(
        tmp_path_factory.mktemp("demo"), beneficiaries=BENEFICIARIES, seed=7, today=TODAY
    )


@pytest.fixture(scope="module")
def rights(generated: demo.DemoFiles) -> list[list[str]]:
    header, rows = read_csv(generated.rights_csv)
    assert header == RIGHTS_HEADER
    return rows


@pytest.fixture(scope="module")
def identities(rights: list[list[str]]) -> dict[Identity, list[list[str]]]:
    return by_identity(rights)


def test_every_rights_row_is_valid(rights: list[list[str]]) -> None:
    for row in rights:
        assert len(row) == len(RIGHTS_HEADER)
        assert_valid_rights_row(row)


def test_nirs_are_plausible(identities: dict[Identity, list[list[str]]]) -> None:
    for nir, birth, _ in identities:
        assert_plausible_nir(nir, birth)
        assert birth <= TODAY.strftime("%Y%m%d")


def test_counts_match_the_summary(
    generated: demo.DemoFiles,
    rights: list[list[str]],
    identities: dict[Identity, list[list[str]]],
) -> None:
    assert len(identities) >= BENEFICIARIES
    assert generated.beneficiaries == len(identities)
    assert generated.rights_rows == len(rights)
    assert generated.rights_csv.name == "rights.csv"
    assert generated.practitioners_csv.name == "practitioners.csv"


def test_one_row_per_beneficiary_insurer_and_domain(rights: list[list[str]]) -> None:
    keys = Counter((r[0], r[2], r[3], r[4], r[6]) for r in rights)
    assert max(keys.values()) == 1


def test_corsica_and_other_birthplaces(identities: dict[Identity, list[list[str]]]) -> None:
    departments = Counter(nir[5:7] for nir, _, _ in identities)
    corsican = departments["2A"] + departments["2B"]
    assert departments["2A"] and departments["2B"]
    assert 0.01 <= corsican / len(identities) <= 0.06
    assert departments["97"] and departments["99"]
    assert len(departments) > 50


def test_lunar_birth_dates(identities: dict[Identity, list[list[str]]]) -> None:
    births = [birth for _, birth, _ in identities]
    assert any(b[6:] == "00" and b[4:6] != "00" for b in births)  # day unknown
    assert any(b[4:8] == "0000" for b in births)  # day and month unknown
    lunar = sum(1 for b in births if b[4:6] == "00" or b[6:] == "00")
    assert 0.005 <= lunar / len(births) <= 0.05


def test_twins_and_triplets_have_their_own_rights(
    identities: dict[Identity, list[list[str]]],
) -> None:
    ranks: dict[tuple[str, str], set[int]] = defaultdict(set)
    for nir, birth, rank in identities:
        ranks[(nir, birth)].add(rank)
    twins = [person for person, r in ranks.items() if r == {1, 2}]
    triplets = [person for person, r in ranks.items() if r == {1, 2, 3}]
    assert twins and triplets
    assert all(r in ({1}, {1, 2}, {1, 2, 3}) for r in ranks.values())

    def terms(nir: str, birth: str, rank: int) -> set[tuple[str, ...]]:
        return {(r[4], r[6], r[9], r[10]) for r in identities[(nir, birth, rank)]}

    assert any(terms(n, b, 1) != terms(n, b, 2) for n, b in twins)


def test_insurers_domains_and_periods(
    rights: list[list[str]], identities: dict[Identity, list[list[str]]]
) -> None:
    amcs = Counter(r[4] for r in rights)
    assert 6 <= len(amcs) <= 8
    assert all(len(a) == 9 for a in amcs)
    assert {r[6] for r in rights} == set(rules.DOMAIN_CODES)
    two_insurers = sum(1 for rows in identities.values() if len({r[4] for r in rows}) == 2)
    assert two_insurers / len(identities) >= 0.03

    today = TODAY.strftime("%Y%m%d")
    expired = sum(1 for r in rights if r[10] < today)
    future = sum(1 for r in rights if r[9] > today)
    current = sum(1 for r in rights if r[9] <= today <= r[10])
    assert expired and future
    assert current / len(rights) >= 0.7


def test_member_numbers_present_and_absent(
    rights: list[list[str]], identities: dict[Identity, list[list[str]]]
) -> None:
    with_member = sum(1 for r in rights if r[5])
    assert 0.6 <= with_member / len(rights) < 1
    assert any(all(r[5] == "" for r in rows) for rows in identities.values())
    # Within one insurer a member number belongs to one contract (twins share their family's).
    holders: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rights:
        if r[5]:
            holders[(r[4], r[5])].add(r[0])
    assert all(len(nirs) == 1 for nirs in holders.values())


def test_practitioners(generated: demo.DemoFiles, rights: list[list[str]]) -> None:
    header, rows = read_csv(generated.practitioners_csv)
    assert header == PRACTITIONERS_HEADER
    amcs = {r[4] for r in rights}
    ids = [r[0] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 11 and i.isdigit() for i in ids)
    per_profession = Counter(r[1] for r in rows)
    assert set(per_profession) == set(PROFESSIONS)
    assert min(per_profession.values()) >= 3
    agreements = [r[2].split(";") for r in rows]
    assert all(a and set(a) <= amcs and len(set(a)) == len(a) for a in agreements)
    assert sum(1 for a in agreements if set(a) == amcs) / len(rows) >= 0.5
    assert any(set(a) != amcs for a in agreements)
    assert Counter(r[3] for r in rows) == {"active": len(rows) - 1, "suspended": 1}
    assert [
        (p.practitioner_id, p.profession, ";".join(p.amc_numbers), p.status)
        for p in generated.practitioners
    ] == [tuple(r) for r in rows]


def test_examples_yield_their_expected_decisions(
    generated: demo.DemoFiles, identities: dict[Identity, list[list[str]]]
) -> None:
    labels = {e.label for e in generated.examples}
    assert labels >= REQUIRED_LABELS
    assert {e.expected for e in generated.examples} == {"COVERED", "NOT_COVERED", "NO_MATCH"}
    for e in generated.examples:
        rows = identities.get((e.nir, e.birth_date, e.birth_rank), [])
        assert decision(rows, e, TODAY) == e.expected, e.label
        assert rules.valid_nir(e.nir) and int(e.nir_key) == rules.nir_key_for(e.nir)
        assert rules.valid_birth_date(e.birth_date) and 1 <= e.birth_rank <= 9
        assert rules.valid_amc_number(e.amc_number)
        assert rules.valid_member_number(e.member_number)
        assert e.domain in rules.DOMAIN_CODES
        assert e.care_date == "" or rules.valid_calendar_date(e.care_date)


def test_examples_show_what_their_labels_say(
    generated: demo.DemoFiles, identities: dict[Identity, list[list[str]]]
) -> None:
    examples = {e.label: e for e in generated.examples}
    today = TODAY.strftime("%Y%m%d")

    def rows_of(label: str) -> list[list[str]]:
        e = examples[label]
        return [r for r in identities[(e.nir, e.birth_date, e.birth_rank)] if r[4] == e.amc_number]

    assert examples["covered pharmacy"].domain == "PHAR"
    assert examples["covered pharmacy"].expected == "COVERED"
    twin = examples["twin rank 2"]
    assert twin.birth_rank == 2
    assert (twin.nir, twin.birth_date, 1) in identities
    assert examples["Corsican 2B"].nir[5:7] == "2B"
    lunar = examples["lunar birth date"].birth_date
    assert lunar[4:6] == "00" or lunar[6:] == "00"
    assert all(r[10] < today for r in rows_of("expired rights"))
    assert examples["expired rights"].expected == "NOT_COVERED"
    assert all(r[9] > today for r in rows_of("future rights"))
    assert examples["future rights"].expected == "NOT_COVERED"
    member = examples["member number required"]
    assert member.member_number and member.expected == "COVERED"
    assert all(r[5] == member.member_number for r in rows_of("member number required"))
    unknown = [e for e in generated.examples if e.expected == "NO_MATCH"]
    assert any((e.nir, e.birth_date, e.birth_rank) not in identities for e in unknown)


def test_same_seed_same_files(tmp_path: Path) -> None:
    first = demo.generate(tmp_path / "a", beneficiaries=500, seed=11, today=TODAY)
    second = demo.generate(tmp_path / "b", beneficiaries=500, seed=11, today=TODAY)
    other = demo.generate(tmp_path / "c", beneficiaries=500, seed=12, today=TODAY)
    for name in ("rights.csv", "practitioners.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert first.examples == second.examples != other.examples
    assert first.practitioners == second.practitioners


@pytest.mark.parametrize(
    "today",
    [
        datetime.date(2024, 1, 1),
        datetime.date(2024, 2, 29),
        datetime.date(2023, 12, 31),
        datetime.date(2031, 7, 31),
    ],
)
def test_valid_on_any_day(tmp_path: Path, today: datetime.date) -> None:
    generated = demo.generate(tmp_path, beneficiaries=300, seed=3, today=today)
    _, rows = read_csv(generated.rights_csv)
    for row in rows:
        assert_valid_rights_row(row)
        assert_plausible_nir(row[0], row[2])
    identities = by_identity(rows)
    for e in generated.examples:
        rows_of = identities.get((e.nir, e.birth_date, e.birth_rank), [])
        assert decision(rows_of, e, today) == e.expected, e.label


def test_default_today(tmp_path: Path) -> None:
    generated = demo.generate(tmp_path, beneficiaries=50)
    assert generated.beneficiaries >= 50
    identities = by_identity(read_csv(generated.rights_csv)[1])
    today = datetime.date.today()
    for e in generated.examples:
        rows = identities.get((e.nir, e.birth_date, e.birth_rank), [])
        assert decision(rows, e, today) == e.expected, e.label

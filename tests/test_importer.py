"""Importer: every row is validated before anything is written; reports name line and field but
never a NIR, birth date or member number; a rejected file leaves the served data byte-identical;
replace and merge imports change exactly what they should.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HOSPITAL_ID,
    OTHER_AMC,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Identity,
    PractitionerRow,
    Right,
    build_dataset,
    cli,
    make_identity,
    write_practitioners_csv,
    write_rights_csv,
)

from fastpath import rules
from fastpath.rules import Keys
from service import importer
from service.config import load_pepper
from service.importer import PRACTITIONER_COLUMNS, RIGHTS_COLUMNS, ImportRejected
from service.store import META_DATASET, Store

KEYS = Keys(bytes(range(100, 132)))
HEADER = ",".join(RIGHTS_COLUMNS)


@pytest.fixture(autouse=True)
def _no_outside_covergate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COVERGATE_PEPPER_FILE", raising=False)
    monkeypatch.delenv("COVERGATE_DATA", raising=False)


# -- helpers ---------------------------------------------------------------------------------------


def good_rights(n: int, seed: int = 1) -> list[Right]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ident = make_identity(rng, corsica="2B" if i % 5 == 4 else "", lunar=i % 7 == 6)
        out.append(Right(ident, PHARMACY_AMC, "PHAR", member_number=f"M{rng.randrange(10**8):08d}"))
    return out


def csv_line(values: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def write_lines(path: Path, lines: list[str], header: str = HEADER) -> Path:
    """`lines` are already CSV text (each ending in a newline); the header is line 1."""
    path.write_text(header + "\n" + "".join(lines), encoding="utf-8", newline="")
    return path


def with_field(right: Right, name: str, value: str) -> list[str]:
    row = right.row()
    row[RIGHTS_COLUMNS.index(name)] = value
    return row


def rejection(path: Path, keys: Keys = KEYS) -> tuple[ImportRejected, str]:
    """The rejection and the report text an operator would read."""
    with pytest.raises(ImportRejected) as info:
        importer.read_rights(path, keys, progress=False)
    lines: list[str] = []
    importer.print_rejection(info.value, lines.append)
    return info.value, "\n".join(lines) + "\n" + str(info.value)


def personal_values(rights: list[Right]) -> set[str]:
    values = set()
    for r in rights:
        values |= {r.identity.nir, r.identity.nir.lower(), r.identity.birth_date}
        if r.member_number:
            values.add(r.member_number)
    return values


def assert_no_personal_data(text: str, rights: list[Right], *extra: str) -> None:
    for value in personal_values(rights) | {e for e in extra if len(e) >= 4}:
        assert value not in text, "the report quotes a personal value"


def errors_by_line(exc: ImportRejected) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for err in exc.errors:
        out.setdefault(err.line, set()).add(err.field)
    return out


def wrong_key(ident: Identity) -> str:
    return f"{rules.nir_key_for(ident.nir) % 97 + 1:02d}"


BadValue = str | Callable[[Identity], str]

# (field, bad value or a function of the identity, fields the report may name for that line)
BAD_FIELDS = [
    ("nir", "0850775123456", {"nir"}),  # first digit 0
    ("nir", "9850775123456", {"nir"}),
    ("nir", "18507751234A6", {"nir"}),  # letter outside the Corsican department
    ("nir", "185072C123456", {"nir"}),
    ("nir", "185077512345", {"nir"}),
    ("nir", "", {"nir"}),
    ("nir_key", "8", {"nir_key"}),
    ("nir_key", "4a", {"nir_key"}),
    ("nir_key", "008", {"nir_key"}),
    ("nir_key", wrong_key, {"nir_key"}),
    ("birth_date", "19850230", {"birth_date"}),
    ("birth_date", "19850431", {"birth_date"}),
    ("birth_date", "18000101", {"birth_date"}),
    ("birth_date", "19851301", {"birth_date"}),
    ("birth_date", "1985070", {"birth_date"}),
    ("birth_date", "", {"birth_date"}),
    ("birth_rank", "0", {"birth_rank"}),
    ("birth_rank", "10", {"birth_rank"}),
    ("birth_rank", "x", {"birth_rank"}),
    ("birth_rank", "", {"birth_rank"}),
    ("amc_number", "", {"amc_number"}),
    ("amc_number", "12345678901", {"amc_number"}),
    ("amc_number", "12345678a", {"amc_number"}),
    ("member_number", "M-0001", {"member_number"}),
    ("member_number", "M" * 21, {"member_number"}),
    ("domain", "PHARM", {"domain"}),
    ("domain", "phar", {"domain"}),
    ("domain", "", {"domain"}),
    ("rate_percent", "-1", {"rate_percent"}),
    ("rate_percent", "101", {"rate_percent"}),
    ("rate_percent", "x", {"rate_percent"}),
    ("rate_percent", "", {"rate_percent"}),
    ("rate_percent", "1000", {"rate_percent"}),
    ("convention_type", "", {"convention_type"}),
    ("convention_type", "TP-1", {"convention_type"}),
    ("convention_type", "X" * 17, {"convention_type"}),
    ("start_date", "20240230", {"start_date"}),
    ("start_date", "20240000", {"start_date"}),
    ("start_date", "x", {"start_date"}),
    ("end_date", "20241301", {"end_date"}),
    ("end_date", "", {"end_date"}),
]
CASE_IDS = [f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_FIELDS)]


def bad_row(right: Right, field: str, value: BadValue) -> list[str]:
    return with_field(right, field, value(right.identity) if callable(value) else value)


# -- one bad row -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "fields"), BAD_FIELDS, ids=CASE_IDS)
def test_one_bad_row_rejects_the_file(
    tmp_path: Path, field: str, value: BadValue, fields: set[str]
) -> None:
    rights = good_rights(6)
    lines = [csv_line(r.row()) for r in rights]
    lines[3] = csv_line(bad_row(rights[3], field, value))  # header is line 1: this is line 5
    path = write_lines(tmp_path / "rights.csv", lines)
    exc, report = rejection(path)
    assert errors_by_line(exc) == {5: fields}
    assert exc.bad_lines == 1
    assert f"line 5: {field}:" in report
    assert "1 invalid line(s)" in report
    assert_no_personal_data(report, rights, *bad_row(rights[3], field, value)[:3])


@pytest.mark.parametrize(("field", "value", "fields"), BAD_FIELDS, ids=CASE_IDS)
def test_line_numbers_stay_right_after_a_multiline_field(
    tmp_path: Path, field: str, value: BadValue, fields: set[str]
) -> None:
    """A quoted field spanning lines moves later rows down: the report counts physical lines."""
    rights = good_rights(6)
    multiline = with_field(rights[1], "member_number", "M00\n12345")
    lines = [
        csv_line(rights[0].row()),  # line 2
        csv_line(multiline),  # lines 3-4
        csv_line(rights[2].row()),  # line 5
        csv_line(rights[3].row()),  # line 6
        csv_line(bad_row(rights[4], field, value)),  # line 7
        csv_line(rights[5].row()),  # line 8
    ]
    assert lines[1].count("\n") == 2
    path = write_lines(tmp_path / "rights.csv", lines)
    exc, report = rejection(path)
    found = errors_by_line(exc)
    assert found.pop(7) == fields
    # The multi-line row itself is reported once, at its first or its last physical line.
    assert len(found) == 1
    ((line, multiline_fields),) = found.items()
    assert line in (3, 4) and multiline_fields == {"member_number"}
    assert exc.bad_lines == 2
    assert_no_personal_data(report, rights, "M00\n12345", "12345")


def test_start_after_end_is_rejected(tmp_path: Path) -> None:
    rights = good_rights(3)
    lines = [csv_line(r.row()) for r in rights]
    lines[1] = csv_line(with_field(with_field_right(rights[1], "20250101"), "end_date", "20241231"))
    path = write_lines(tmp_path / "rights.csv", lines)
    exc, report = rejection(path)
    assert set(errors_by_line(exc)) == {3}
    assert errors_by_line(exc)[3] <= {"start_date", "end_date"}
    assert "start_date" in report
    assert_no_personal_data(report, rights)


def with_field_right(right: Right, start: str) -> Right:
    return Right(
        right.identity,
        right.amc_number,
        right.domain,
        right.member_number,
        right.rate_percent,
        right.convention_type,
        start,
        right.end_date,
    )


def test_start_equal_to_end_is_fine(tmp_path: Path) -> None:
    rights = [
        Right(
            r.identity, r.amc_number, r.domain, r.member_number, 100, "TP01", "20240301", "20240301"
        )
        for r in good_rights(2)
    ]
    by_key, rows = importer.read_rights(write_rights_csv(tmp_path / "r.csv", rights), KEYS)
    assert rows == 2 and len(by_key) == 2


def test_a_right_seen_before_still_has_its_identity_and_member_checked(tmp_path: Path) -> None:
    """Rows repeating a sound right (insurer, domain, rate, convention, dates) skip its checks,
    never the identity's or the member number's."""
    rights = good_rights(6)  # all the same right, members and identities apart
    lines = [csv_line(r.row()) for r in rights]
    lines[2] = csv_line(with_field(rights[2], "member_number", "M-1"))  # line 4
    lines[3] = csv_line(with_field(rights[3], "nir_key", wrong_key(rights[3].identity)))  # line 5
    lines[5] = csv_line(with_field(rights[5], "member_number", "é"))  # line 7
    exc, _ = rejection(write_lines(tmp_path / "rights.csv", lines))
    assert errors_by_line(exc) == {4: {"member_number"}, 5: {"nir_key"}, 7: {"member_number"}}


def test_several_bad_lines_are_all_reported(tmp_path: Path) -> None:
    rights = good_rights(10)
    lines = [csv_line(r.row()) for r in rights]
    lines[1] = csv_line(with_field(rights[1], "nir_key", wrong_key(rights[1].identity)))  # line 3
    lines[3] = csv_line(with_field(rights[3], "birth_rank", "0"))  # line 5
    two = with_field(rights[4], "rate_percent", "101")
    two[RIGHTS_COLUMNS.index("domain")] = "XXXX"
    lines[4] = csv_line(two)  # line 6, two fields
    lines[7] = csv_line(with_field(rights[7], "amc_number", ""))  # line 9
    lines[9] = csv_line(rights[9].row()[:-1])  # line 11, a field short
    path = write_lines(tmp_path / "rights.csv", lines)
    exc, report = rejection(path)
    assert errors_by_line(exc) == {
        3: {"nir_key"},
        5: {"birth_rank"},
        6: {"rate_percent", "domain"},
        9: {"amc_number"},
        11: {""},
    }
    assert exc.bad_lines == 5
    assert "5 invalid line(s)" in report
    for needle in (
        "line 3: nir_key",
        "line 5: birth_rank",
        "line 6: domain",
        "line 6: rate_percent",
        "line 9: amc_number",
        "line 11:",
    ):
        assert needle in report
    assert_no_personal_data(report, rights)


def test_corsican_and_lunar_rows_are_accepted(tmp_path: Path) -> None:
    rng = random.Random(3)
    idents = [
        make_identity(rng, corsica="2A"),
        make_identity(rng, corsica="2B"),
        make_identity(rng, lunar=True),
    ]
    lower = Identity(idents[0].nir.lower(), idents[0].nir_key, idents[0].birth_date, 1)
    rights = [Right(i, PHARMACY_AMC, "PHAR") for i in idents] + [Right(lower, OTHER_AMC, "PHAR")]
    by_key, rows = importer.read_rights(write_rights_csv(tmp_path / "r.csv", rights), KEYS)
    assert rows == 4
    # 2a and 2A are the same beneficiary.
    assert len(by_key) == 3
    upper_key = KEYS.storage_key(rules.identity_bytes(idents[0].nir, idents[0].birth_date, 1))
    assert {r.amc_number for r in by_key[upper_key]} == {PHARMACY_AMC, OTHER_AMC}


# -- malformed files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        ",".join(RIGHTS_COLUMNS[1:]),  # a column missing
        HEADER + ",extra",
        ",".join((RIGHTS_COLUMNS[1], RIGHTS_COLUMNS[0], *RIGHTS_COLUMNS[2:])),  # swapped
        HEADER.upper(),
        "",
    ],
    ids=["missing", "extra", "swapped", "upper", "blank"],
)
def test_wrong_header_is_rejected(tmp_path: Path, header: str) -> None:
    rights = good_rights(2)
    path = write_lines(tmp_path / "rights.csv", [csv_line(r.row()) for r in rights], header=header)
    exc, report = rejection(path)
    assert [(e.line, e.field) for e in exc.errors] == [(1, "")]
    assert "header" in report
    assert_no_personal_data(report, rights)


def test_header_with_bom_is_accepted(tmp_path: Path) -> None:
    rights = good_rights(2)
    path = write_lines(
        tmp_path / "rights.csv", [csv_line(r.row()) for r in rights], header="\ufeff" + HEADER
    )
    assert importer.read_rights(path, KEYS)[1] == 2


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rights.csv"
    path.write_bytes(b"")
    exc, report = rejection(path)
    assert exc.errors and "empty" in report


def test_header_only_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "rights.csv", [])
    _, report = rejection(path)
    assert "no data rows" in report


@pytest.mark.parametrize("delta", [-1, 1], ids=["short", "long"])
def test_wrong_column_count_is_rejected(tmp_path: Path, delta: int) -> None:
    rights = good_rights(5)
    lines = [csv_line(r.row()) for r in rights]
    row = rights[2].row()
    lines[2] = csv_line(row[:-1] if delta < 0 else [*row, "x"])  # line 4
    path = write_lines(tmp_path / "rights.csv", lines)
    exc, report = rejection(path)
    assert errors_by_line(exc) == {4: {""}}
    assert f"found {len(row) + delta}" in report
    assert_no_personal_data(report, rights)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    rights = good_rights(3)
    lines = [
        csv_line(rights[0].row()),
        "\n",
        csv_line(with_field(rights[1], "birth_rank", "0")),
        csv_line(rights[2].row()),
    ]
    exc, _ = rejection(write_lines(tmp_path / "rights.csv", lines))
    assert errors_by_line(exc) == {4: {"birth_rank"}}


def non_utf8_file(tmp_path: Path, rights: list[Right], bad_index: int) -> Path:
    lines = [csv_line(r.row()).encode() for r in rights]
    lines[bad_index] = lines[bad_index].replace(b"TP01", b"TP\xff1")
    path = tmp_path / "rights.csv"
    path.write_bytes(HEADER.encode() + b"\n" + b"".join(lines))
    return path


def test_non_utf8_bytes_are_rejected_cleanly(tmp_path: Path) -> None:
    rights = good_rights(6)
    path = non_utf8_file(tmp_path, rights, 3)
    exc, report = rejection(path)
    assert exc.errors
    assert "UTF-8" in report
    assert_no_personal_data(report, rights)
    proc = cli("import", "rights", str(path), "--data", str(tmp_path / "data"), check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "UTF-8" in proc.stderr
    assert_no_personal_data(proc.stdout + proc.stderr, rights)


@pytest.mark.parametrize("size", [6, 400], ids=["small-file", "beyond-first-read-chunk"])
def test_non_utf8_bytes_are_reported_at_their_line(tmp_path: Path, size: int) -> None:
    """The header is fine; the undecodable byte is on one data line, which the report must name."""
    rights = good_rights(size)
    bad_index = size - 3
    path = non_utf8_file(tmp_path, rights, bad_index)
    exc, _ = rejection(path)
    lines = errors_by_line(exc)
    assert 1 not in lines, f"the valid header is blamed: {[str(e) for e in exc.errors]}"
    assert bad_index + 2 in lines, [str(e) for e in exc.errors]


def test_rows_before_an_undecodable_line_are_still_validated(tmp_path: Path) -> None:
    rights = good_rights(6)
    lines = [csv_line(r.row()).encode() for r in rights]
    lines[0] = csv_line(with_field(rights[0], "birth_rank", "0")).encode()  # line 2
    lines[4] = lines[4].replace(b"TP01", b"TP\xff1")  # line 6
    path = tmp_path / "rights.csv"
    path.write_bytes(HEADER.encode() + b"\n" + b"".join(lines))
    exc, _ = rejection(path)
    assert errors_by_line(exc).get(2) == {"birth_rank"}


# -- the CLI on rejected files ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("nir_key", wrong_key), ("birth_date", "19850230"), ("rate_percent", "101")],
)
def test_cli_exits_2_and_reports_line_and_field(tmp_path: Path, field: str, value) -> None:
    rights = good_rights(4)
    lines = [csv_line(r.row()) for r in rights]
    lines[2] = csv_line(bad_row(rights[2], field, value))  # line 4
    path = write_lines(tmp_path / "rights.csv", lines)
    proc = cli("import", "rights", str(path), "--data", str(tmp_path / "data"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"rights.csv: line 4: {field}:" in proc.stderr
    assert "nothing imported" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_no_personal_data(proc.stdout + proc.stderr, rights)


# -- practitioners ---------------------------------------------------------------------------------

GOOD_PRACTITIONERS = [
    PractitionerRow("10001234567", "pharmacist", (PHARMACY_AMC, OTHER_AMC)),
    PractitionerRow("123456789", "hospital", (PHARMACY_AMC,)),
    PractitionerRow("10009999999", "optician", (OTHER_AMC,), "suspended"),
    PractitionerRow("10008888888", "transport", (OTHER_AMC,), "revoked"),
]


def practitioner_rows(bad_line_values: list[str], at: int = 2) -> str:
    rows = [
        csv_line([p.practitioner_id, p.profession, ";".join(p.amc_numbers), p.status])
        for p in GOOD_PRACTITIONERS
    ]
    rows.insert(at, csv_line(bad_line_values))
    return ",".join(PRACTITIONER_COLUMNS) + "\n" + "".join(rows)


def test_good_practitioners_file(tmp_path: Path) -> None:
    path = write_practitioners_csv(tmp_path / "p.csv", GOOD_PRACTITIONERS)
    records = {r.practitioner_id: r for r in importer.read_practitioners(path)}
    assert set(records) == {p.practitioner_id for p in GOOD_PRACTITIONERS}
    assert records["10001234567"].amc_numbers == sorted((PHARMACY_AMC, OTHER_AMC))
    assert records["10009999999"].status == "suspended"
    assert records["10008888888"].status == "revoked"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        (["12345678", "pharmacist", PHARMACY_AMC, "active"], "practitioner_id"),
        (["1000123456A", "pharmacist", PHARMACY_AMC, "active"], "practitioner_id"),
        (["1" * 15, "pharmacist", PHARMACY_AMC, "active"], "practitioner_id"),
        (["10005555555", "nurse", PHARMACY_AMC, "active"], "profession"),
        (["10005555555", "Pharmacist", PHARMACY_AMC, "active"], "profession"),
        (["10005555555", "pharmacist", "", "active"], "amc_numbers"),
        (["10005555555", "pharmacist", "12a", "active"], "amc_numbers"),
        (["10005555555", "pharmacist", f"{PHARMACY_AMC};12345678901", "active"], "amc_numbers"),
        (["10005555555", "pharmacist", f"{PHARMACY_AMC},{OTHER_AMC}", "active"], "amc_numbers"),
        (["10005555555", "pharmacist", PHARMACY_AMC], ""),  # 3 columns
        (["10005555555", "pharmacist", PHARMACY_AMC, "Active"], "status"),
        (["10005555555", "pharmacist", PHARMACY_AMC, "deleted"], "status"),
        (["10005555555", "pharmacist", PHARMACY_AMC, ""], "status"),
        (["10001234567", "physician", PHARMACY_AMC, "active"], "practitioner_id"),  # duplicate
    ],
)
def test_bad_practitioner_row(tmp_path: Path, values: list[str], field: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(practitioner_rows(values, at=2), encoding="utf-8")  # the bad row is line 4
    with pytest.raises(ImportRejected) as info:
        importer.read_practitioners(path)
    assert [(e.line, e.field) for e in info.value.errors] == [(4, field)]


def test_duplicate_practitioner_reported_on_second_listing(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        practitioner_rows(["10009999999", "optician", OTHER_AMC, "active"], at=4), encoding="utf-8"
    )
    with pytest.raises(ImportRejected) as info:
        importer.read_practitioners(path)
    assert [(e.line, e.field, e.problem) for e in info.value.errors] == [
        (6, "practitioner_id", "listed twice")
    ]


def test_cli_rejects_bad_practitioners_file(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        practitioner_rows(["10005555555", "nurse", PHARMACY_AMC, "active"]), encoding="utf-8"
    )
    proc = cli("import", "practitioners", str(path), "--data", str(tmp_path / "data"), check=False)
    assert proc.returncode == 2
    assert "p.csv: line 4: profession:" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- atomicity -------------------------------------------------------------------------------------


def snapshot(data_dir: Path) -> dict[str, Any]:
    """Every key and value of the served data, plus the dataset metadata."""
    with Store(data_dir) as store, store.env.begin() as txn:
        return {
            "rights": dict(txn.cursor(store.rights_db)),
            "practitioners": dict(txn.cursor(store.practitioners_db)),
            "credentials": dict(txn.cursor(store.credentials_db)),
            "meta": dict(txn.cursor(store.meta_db)),
            "dataset": txn.get(META_DATASET, db=store.meta_db),
        }


@pytest.mark.slow
def test_rejected_imports_leave_the_served_data_byte_identical(tmp_path: Path) -> None:
    ds = build_dataset(tmp_path, extra_beneficiaries=20)
    data = ds.data_dir
    before = snapshot(data)
    assert before["rights"] and before["dataset"]
    pepper_before = (data / "pepper").read_bytes()

    # A file listing only new beneficiaries, with one bad row at the very end.
    fresh = good_rights(30, seed=99)
    lines = [csv_line(r.row()) for r in fresh]
    lines[-1] = csv_line(with_field(fresh[-1], "end_date", "20241301"))
    bad = write_lines(tmp_path / "bad.csv", lines)
    for extra in ((), ("--merge",)):
        proc = cli("import", "rights", str(bad), *extra, data_dir=data, check=False)
        assert proc.returncode == 2, proc.stderr
        assert f"line {len(lines) + 1}: end_date" in proc.stderr
        assert snapshot(data) == before

    undecodable = non_utf8_file(tmp_path, fresh, 25)
    proc = cli("import", "rights", str(undecodable), data_dir=data, check=False)
    assert proc.returncode == 2
    assert snapshot(data) == before

    header_only = write_lines(tmp_path / "empty.csv", [])
    assert cli("import", "rights", str(header_only), data_dir=data, check=False).returncode == 2
    assert snapshot(data) == before

    bad_practitioners = tmp_path / "bad-p.csv"
    bad_practitioners.write_text(practitioner_rows(["1", "pharmacist", PHARMACY_AMC, "active"]))
    assert (
        cli(
            "import", "practitioners", str(bad_practitioners), data_dir=data, check=False
        ).returncode
        == 2
    )
    assert snapshot(data) == before

    # The same through the API.
    keys = Keys(load_pepper(data, None))
    with Store(data) as store:
        for merge in (False, True):
            with pytest.raises(ImportRejected):
                importer.import_rights(store, keys, bad, merge=merge, progress=False)
        with pytest.raises(ImportRejected):
            importer.import_practitioners(store, bad_practitioners)
    assert snapshot(data) == before
    assert (data / "pepper").read_bytes() == pepper_before


def rights_of(data_dir: Path, ident: Identity) -> list[rules.RightRow] | None:
    keys = Keys(load_pepper(data_dir, None))
    skey = keys.storage_key(
        rules.identity_bytes(rules.normalise_nir(ident.nir), ident.birth_date, ident.birth_rank)
    )
    with Store(data_dir) as store:
        raw = store.get_rights([skey]).get(skey)
    return rules.decode_record(raw) if raw is not None else None


def summary(rows: list[rules.RightRow] | None) -> set[tuple[str, str, int]]:
    assert rows is not None
    return {(r.amc_number, rules.DOMAIN_NAMES[r.domain], r.rate_percent) for r in rows}


def test_replace_drops_beneficiaries_absent_from_the_new_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    people = good_rights(6, seed=11)
    write_rights_csv(tmp_path / "a.csv", people[:4])
    write_rights_csv(
        tmp_path / "b.csv",
        [
            Right(people[2].identity, OTHER_AMC, "MEDE", rate_percent=55),
            *people[3:],
        ],
    )
    cli("import", "rights", str(tmp_path / "a.csv"), data_dir=data)
    first = snapshot(data)
    cli("import", "rights", str(tmp_path / "b.csv"), data_dir=data)
    assert rights_of(data, people[0].identity) is None
    assert rights_of(data, people[1].identity) is None
    assert summary(rights_of(data, people[2].identity)) == {(OTHER_AMC, "MEDE", 55)}
    for p in people[3:]:
        assert summary(rights_of(data, p.identity)) == {(PHARMACY_AMC, "PHAR", 100)}
    after = snapshot(data)
    assert len(after["rights"]) == 4
    assert after["dataset"] != first["dataset"]


def test_merge_replaces_only_the_files_beneficiaries_at_the_files_insurers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = random.Random(12)
    x, y, z = (make_identity(rng) for _ in range(3))
    base = [
        Right(x, PHARMACY_AMC, "PHAR", member_number="MX1"),
        Right(x, PHARMACY_AMC, "MEDE", member_number="MX1", rate_percent=70),
        Right(x, OTHER_AMC, "PHAR", member_number="MX2", rate_percent=60),
        Right(y, PHARMACY_AMC, "PHAR", member_number="MY1"),
        Right(y, OTHER_AMC, "DENT", rate_percent=40),
    ]
    update = [
        Right(x, PHARMACY_AMC, "DENT", member_number="MX1", rate_percent=50),
        Right(z, OTHER_AMC, "OPTI", rate_percent=30),
    ]
    write_rights_csv(tmp_path / "base.csv", base)
    write_rights_csv(tmp_path / "update.csv", update)
    cli("import", "rights", str(tmp_path / "base.csv"), data_dir=data)
    before = snapshot(data)
    y_raw_before = dict(before["rights"])

    out = cli("import", "rights", str(tmp_path / "update.csv"), "--merge", data_dir=data).stdout
    assert "imported 2 rights rows for 2 beneficiaries" in out

    # x: the AMC in the file is replaced, the other AMC's right is kept.
    assert summary(rights_of(data, x)) == {(PHARMACY_AMC, "DENT", 50), (OTHER_AMC, "PHAR", 60)}
    # y: untouched, byte for byte; z: added.
    assert summary(rights_of(data, y)) == {(PHARMACY_AMC, "PHAR", 100), (OTHER_AMC, "DENT", 40)}
    assert summary(rights_of(data, z)) == {(OTHER_AMC, "OPTI", 30)}
    after = snapshot(data)
    keys = Keys(load_pepper(data, None))
    y_key = keys.storage_key(rules.identity_bytes(y.nir, y.birth_date, y.birth_rank))
    assert after["rights"][y_key] == y_raw_before[y_key]
    assert len(after["rights"]) == 3
    with Store(data) as store:
        dataset = store.dataset()
    assert dataset is not None
    assert (
        dataset["mode"] == "merge" and dataset["beneficiaries"] == 3 and dataset["rights_rows"] == 2
    )

    # The kept member-number hash still belongs to x's other insurer row.
    rows = {r.amc_number: r for r in rights_of(data, x) or []}
    x_key = keys.storage_key(rules.identity_bytes(x.nir, x.birth_date, x.birth_rank))
    assert rows[OTHER_AMC].member_hash == keys.member_hash(x_key, "MX2")
    assert rows[PHARMACY_AMC].member_hash == keys.member_hash(x_key, "MX1")


def test_api_import_report(tmp_path: Path) -> None:
    rights = good_rights(8)
    rights.append(Right(rights[0].identity, OTHER_AMC, "MEDE"))
    path = write_rights_csv(tmp_path / "r.csv", rights)
    with Store(tmp_path / "data") as store:
        report = importer.import_rights(store, KEYS, path, progress=False)
        assert (report.kind, report.rows, report.beneficiaries) == ("rights", 9, 8)
        assert len(report.dataset_id) == 32
        dataset = store.dataset()
        assert dataset is not None and dataset["dataset_id"] == report.dataset_id
        p = importer.import_practitioners(
            store,
            write_practitioners_csv(
                tmp_path / "p.csv",
                [
                    PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,)),
                    PractitionerRow(HOSPITAL_ID, "hospital", (PHARMACY_AMC,)),
                ],
            ),
        )
        assert (p.kind, p.rows) == ("practitioners", 2)
        assert store.counts() == {"beneficiaries": 8, "practitioners": 2, "credentials": 0}

"""The compiled rights reader (fastpath.rights_records, C) against the reference
(service.importer.read_rights, then rules.encode_record): the same records byte for byte for every
file it takes, None for every file the reference refuses (whose report stays the reference's), and
the same LMDB contents after an import either way.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzz import importer as fuzz_importer
from fuzz.wire import HypothesisChoices
from harness import OTHER_AMC, PHARMACY_AMC, Right, cli, make_identity, write_rights_csv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_importer import BAD_FIELDS, CASE_IDS, HEADER, bad_row, csv_line, good_rights

import fastpath
from fastpath import rules
from fastpath.rules import Keys
from service import importer
from service.importer import MAX_RIGHTS_PER_BENEFICIARY, RIGHTS_COLUMNS, ImportRejected
from service.store import META_DATASET, Store

KEYS = Keys(bytes(range(100, 132)))


def compiled(data: bytes) -> tuple[list[tuple[bytes, bytes]], int] | None:
    assert fastpath.rights_records is not None, "the Cython extension is not built"
    return fastpath.rights_records(data, KEYS, RIGHTS_COLUMNS, MAX_RIGHTS_PER_BENEFICIARY)


def reference(path: Path) -> tuple[Any, ...]:
    """The reference's outcome: its records and row count, or its whole rejection."""
    try:
        return ("accepted", *importer.read_rights_records(path, KEYS, compiled=False))
    except ImportRejected as exc:
        return ("rejected", exc.errors, exc.bad_lines, str(exc))


def through_importer(path: Path) -> tuple[Any, ...]:
    """read_rights_records as the CLI calls it: compiled, the reference when that declines."""
    try:
        return ("accepted", *importer.read_rights_records(path, KEYS, compiled=True))
    except ImportRejected as exc:
        return ("rejected", exc.errors, exc.bad_lines, str(exc))


def assert_alike(path: Path, *, taken: bool | None) -> tuple[Any, ...]:
    """Both readings agree; `taken`: whether the C reader must take the file itself (None:
    either way)."""
    expected = reference(path)
    direct = compiled(path.read_bytes())
    assert through_importer(path) == expected
    if expected[0] == "rejected":
        assert direct is None
    elif direct is not None:
        assert ("accepted", *direct) == expected
    if taken is not None:
        assert (direct is not None) == taken
    return expected


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def lines_of(rights: list[Right]) -> list[str]:
    return [csv_line(r.row()) for r in rights]


def varied_rights(seed: int = 5) -> list[Right]:
    """Corsican (either case) and lunar identities, several insurers and domains, empty and
    repeated member numbers, a right starting and ending the same day, beneficiaries whose rows
    are apart in the file."""
    rng = random.Random(seed)
    people = [
        make_identity(rng),
        make_identity(rng, corsica="2A"),
        make_identity(rng, corsica="2B", lunar=True),
        make_identity(rng, rank=9),
    ]
    corsican = people[1]
    lower = type(corsican)(
        corsican.nir.lower(), corsican.nir_key, corsican.birth_date, corsican.birth_rank
    )
    return [
        Right(people[0], PHARMACY_AMC, "PHAR", member_number="A0001234"),
        Right(people[0], PHARMACY_AMC, "MEDE", member_number="A0001234", rate_percent=70),
        Right(people[1], OTHER_AMC, "DENT", rate_percent=0, convention_type="X"),
        Right(people[0], OTHER_AMC, "OPTI", member_number="b2", start_date="20240301",
              end_date="20240301"),
        Right(people[2], PHARMACY_AMC, "TRAN", member_number="Z" * 20,
              convention_type="A" * 16, start_date="19000101", end_date="21991231"),
        Right(lower, PHARMACY_AMC, "LABO", member_number="M1"),
        Right(people[3], "1", "RADI", rate_percent=7),
        Right(people[1], OTHER_AMC, "AUXM", member_number="M1"),
        Right(people[3], "0123456789", "HOSP", member_number="A0001234"),
    ]  # fmt: skip


# -- files the C reader takes ----------------------------------------------------------------------

VALID_FILES: dict[str, Callable[[list[str]], str | bytes]] = {
    "plain": lambda lines: HEADER + "\n" + "".join(lines),
    "crlf": lambda lines: (HEADER + "\n" + "".join(lines)).replace("\n", "\r\n"),
    "cr": lambda lines: (HEADER + "\n" + "".join(lines)).replace("\n", "\r"),
    "mixed line breaks": lambda lines: HEADER + "\r\n" + "\r".join(x[:-1] for x in lines) + "\n",
    "no final line break": lambda lines: HEADER + "\n" + "".join(lines)[:-1],
    "blank lines": lambda lines: HEADER + "\n\n" + "\r\n\n".join(lines) + "\n\r\n",
    "byte order mark": lambda lines: "\ufeff" + HEADER + "\n" + "".join(lines),
    "quoted fields": lambda lines: (
        HEADER
        + "\n"
        + "".join(
            csv_line(next(csv.reader([x]))) if i % 2 else _quote_all(x) for i, x in enumerate(lines)
        )
    ),
    "text after a closing quote": lambda lines: (
        HEADER
        + "\n"
        + "".join(
            ",".join(f'"{v[:-1]}"{v[-1]}' if len(v) > 1 else v for v in x[:-1].split(",")) + "\n"
            for x in lines
        )
    ),
}


def _quote_all(line: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(next(csv.reader([line])))
    return buf.getvalue()


@pytest.mark.parametrize("shape", list(VALID_FILES))
def test_valid_files_give_the_reference_records(tmp_path: Path, shape: str) -> None:
    lines = lines_of(varied_rights() + good_rights(40))
    path = write(tmp_path / "rights.csv", VALID_FILES[shape](lines))
    outcome = assert_alike(path, taken=True)
    assert outcome[0] == "accepted" and outcome[2] == len(lines)


def test_the_records_decode_to_the_files_rights(tmp_path: Path) -> None:
    """Beyond agreeing with the reference: the Corsican beneficiary in either case is one record,
    rows keep the file's order, member hashes are the keyed ones."""
    rights = varied_rights()
    path = write_rights_csv(tmp_path / "rights.csv", rights)
    found = compiled(path.read_bytes())
    assert found is not None
    records, rows = found
    assert rows == len(rights) and len(records) == 4
    assert [k for k, _ in records] == sorted(k for k, _ in records)
    by_key = dict(records)
    corsican = rights[2].identity
    skey = KEYS.storage_key(rules.identity_bytes(corsican.nir, corsican.birth_date, 1))
    decoded = rules.decode_record(by_key[skey])
    assert [(r.amc_number, rules.DOMAIN_NAMES[r.domain]) for r in decoded] == [
        (OTHER_AMC, "DENT"), (PHARMACY_AMC, "LABO"), (OTHER_AMC, "AUXM"),
    ]  # fmt: skip
    assert decoded[0].member_hash is None
    assert decoded[1].member_hash == decoded[2].member_hash == KEYS.member_hash(skey, "M1")


def test_a_beneficiary_may_hold_the_most_rights_and_no_more(tmp_path: Path) -> None:
    ident = make_identity(random.Random(8))
    most = [
        Right(ident, f"{i:09d}", "PHAR", member_number=f"M{i}")
        for i in range(MAX_RIGHTS_PER_BENEFICIARY)
    ]
    other = good_rights(3)
    assert_alike(write_rights_csv(tmp_path / "most.csv", [*other, *most]), taken=True)
    # Apart in the file, the rows still count for the same beneficiary.
    too_many = [*most[:10], *other, *most[10:], Right(ident, "1", "MEDE")]
    outcome = assert_alike(write_rights_csv(tmp_path / "more.csv", too_many), taken=False)
    assert outcome[0] == "rejected"
    assert [e.problem for e in outcome[1]] == ["more than 1000 rights for one beneficiary"]


# -- files it leaves to the reference --------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "fields"), BAD_FIELDS, ids=CASE_IDS)
def test_every_invalid_field_is_left_to_the_reference(
    tmp_path: Path, field: str, value: Any, fields: set[str]
) -> None:
    rights = good_rights(6)
    lines = lines_of(rights)
    lines[3] = csv_line(bad_row(rights[3], field, value))
    outcome = assert_alike(write(tmp_path / "r.csv", HEADER + "\n" + "".join(lines)), taken=False)
    assert outcome[0] == "rejected" and {e.field for e in outcome[1]} == fields


def _rows_file(rows: list[str], header: str = HEADER) -> str:
    return header + "\n" + "".join(rows)


GOOD = lines_of(good_rights(4))
ROW = GOOD[1][:-1]


def _with(old: str, new: str, *after: str) -> str:
    """A file of one good row, then ROW with `old` replaced by `new`, then `after`."""
    return _rows_file([GOOD[0], ROW.replace(old, new) + "\n", *after])


# (file, whether the reference accepts it): files the C reader never takes.
DECLINED: dict[str, tuple[str | bytes, bool]] = {
    "a field short": (_rows_file([GOOD[0], ROW.rsplit(",", 1)[0] + "\n"]), False),
    "a field more": (_with(",TP01,", ",TP01,PHAR,"), False),
    "a field more, empty": (_rows_file([GOOD[0], ROW + ",\n"]), False),
    "a lone space": (_rows_file([GOOD[0], " \n"]), False),
    "a quote left open at the end": (_rows_file([GOOD[0], ROW[:-8] + '"' + ROW[-8:]]), True),
    "a quote left open mid-file": (_with(",TP01,", ',TP01,"', GOOD[2]), False),
    "a doubled quote": (_with(",PHAR,", ',"PH""AR",'), False),
    "a quote inside": (_with(",PHAR,", ',PH"AR,'), False),
    "a line break inside quotes": (_with(",TP01,", ',"TP\n01",'), False),
    "a space after a closing quote": (_with(",TP01,", ',"TP01" ,'), False),
    "a NUL": (_with(",TP01,", ",TP\x0001,"), False),
    "not UTF-8": (_with(",TP01,", ",TP01,").encode().replace(b"TP01", b"TP\xff1", 2), False),
    "accented": (_with(",TP01,", ",TPé1,"), False),
    "a field too long": (_with(",TP01,", "," + "T" * 300 + ","), False),
    "a field beyond the csv limit": (_with(",TP01,", "," + "T" * 140_000 + ",", GOOD[2]), False),
    "header with spaces": (_rows_file(GOOD, " " + HEADER.replace(",", " , ") + "\t"), True),
    "header quoted": (_rows_file(GOOD, '"' + HEADER.replace(",", '","') + '"'), True),
    "header after a no-break space": (_rows_file(GOOD, "\u00a0" + HEADER), True),
    "header, two byte order marks": (_rows_file(GOOD, "\ufeff\ufeff" + HEADER), True),
    "header in capitals": (_rows_file(GOOD, HEADER.upper()), False),
    "header, a column missing": (_rows_file(GOOD, HEADER.rsplit(",", 1)[0]), False),
    "header with text after it": (_rows_file(GOOD, HEADER + "x"), False),
    "header only": (HEADER + "\n", False),
    "header and blank lines only": (HEADER + "\n\n\r\n", False),
    "header without a line break": (HEADER, False),
    "empty": (b"", False),
    "blank": ("\n", False),
}


@pytest.mark.parametrize("case", list(DECLINED))
def test_files_the_c_reader_declines_are_the_references(tmp_path: Path, case: str) -> None:
    text, accepted = DECLINED[case]
    outcome = assert_alike(write(tmp_path / "r.csv", text), taken=False)
    assert (outcome[0] == "accepted") == accepted, outcome


def test_an_invalid_row_among_many_is_reported_as_the_reference_does(tmp_path: Path) -> None:
    rights = good_rights(300)
    lines = lines_of(rights)
    for i, (field, value, _) in enumerate(BAD_FIELDS):
        lines[i * 7] = csv_line(bad_row(rights[i * 7], field, value))
    outcome = assert_alike(write(tmp_path / "r.csv", HEADER + "\n" + "".join(lines)), taken=False)
    assert outcome[0] == "rejected" and outcome[2] == len(BAD_FIELDS)


# -- random files ----------------------------------------------------------------------------------


@pytest.fixture
def fuzz_checker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[fuzz_importer.Checker]:
    monkeypatch.setattr(importer, "MAX_RIGHTS_PER_BENEFICIARY", fuzz_importer.MAX_RIGHTS)
    yield fuzz_importer.Checker(tmp_path)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_files_read_alike(fuzz_checker: fuzz_importer.Checker, data: Any) -> None:
    fuzz_checker.check(fuzz_importer.random_file(HypothesisChoices(data)))


def test_random_files_exercise_each_outcome(fuzz_checker: fuzz_importer.Checker) -> None:
    """The generator makes files the C reader takes, files it declines and files the reference
    refuses, each in numbers (so the property above tests something)."""
    rng = random.Random(11)
    for _ in range(2000):
        fuzz_checker.check(fuzz_importer.random_file(fuzz_importer.RandomChoices(rng)))
    assert min(fuzz_checker.outcomes[k] for k in ("compiled", "declined", "rejected")) >= 10


def test_the_checker_catches_a_diverging_reader(
    fuzz_checker: fuzz_importer.Checker, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_rights_csv(fuzz_checker.path.with_suffix(".x"), good_rights(3)).read_bytes()
    assert fuzz_checker.check(data) == "compiled"
    real = fastpath.rights_records
    assert real is not None

    def off_by_one(*args: Any) -> Any:
        records, rows = real(*args)
        return records, rows + 1

    monkeypatch.setattr(fastpath, "rights_records", off_by_one)
    with pytest.raises(fuzz_importer.Divergence):
        fuzz_checker.check(data)


SEEDS = sorted(fuzz_importer.SEED_CORPUS.iterdir())


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_fuzz_seed_corpus(fuzz_checker: fuzz_importer.Checker, seed: Path) -> None:
    fuzz_checker.check(fuzz_importer.file_of_case(seed.read_bytes()))


# -- what the store holds --------------------------------------------------------------------------


def stored(data_dir: Path) -> tuple[dict[bytes, bytes], dict[str, Any]]:
    """The rights database, and the dataset record less its id and time."""
    with Store(data_dir) as store, store.env.begin() as txn:
        rights = {bytes(k): bytes(v) for k, v in txn.cursor(store.rights_db)}
        dataset = store.dataset() or {}
        assert txn.get(META_DATASET, db=store.meta_db) is not None
    return rights, {k: v for k, v in dataset.items() if k not in ("dataset_id", "imported_at")}


def test_imports_store_the_same_bytes(tmp_path: Path) -> None:
    """Replace, then merge over it, each through both readers: the same database."""
    base = varied_rights() + good_rights(30)
    update = [Right(r.identity, OTHER_AMC, "HOSP", member_number="U1") for r in base[:12]]
    update += good_rights(5, seed=77)
    base_path = write_rights_csv(tmp_path / "base.csv", base)
    update_path = write_rights_csv(tmp_path / "update.csv", update)
    assert compiled(base_path.read_bytes()) and compiled(update_path.read_bytes())
    results = []
    for use_compiled in (True, False):
        data = tmp_path / f"data-{use_compiled}"
        with Store(data) as store:
            first = importer.import_rights(store, KEYS, base_path, compiled=use_compiled)
        after_replace = stored(data)
        with Store(data) as store:
            second = importer.import_rights(
                store, KEYS, update_path, merge=True, compiled=use_compiled
            )
        results.append((after_replace, stored(data), first.extra, second.extra))
    assert results[0] == results[1]
    people = {(r.identity.nir.upper(), r.identity.birth_date) for r in base[:12]}
    assert results[0][3] == {"added": 5, "removed": 0, "changed": len(people), "unchanged": 0}


def test_the_cli_stores_what_the_reference_stores(tmp_path: Path) -> None:
    path = write_rights_csv(tmp_path / "r.csv", varied_rights() + good_rights(20))
    pepper = tmp_path / "pepper"
    pepper.write_text(bytes(range(32)).hex() + "\n")
    pepper.chmod(0o600)
    reference_env = {"COVERGATE_NO_EXTENSIONS": "1", "COVERGATE_REQUIRE_EXTENSIONS": ""}
    for name, env in (("compiled", {}), ("reference", reference_env)):
        cli("import", "rights", str(path), "--pepper-file", str(pepper),
            data_dir=tmp_path / name, env=env)  # fmt: skip
    assert stored(tmp_path / "compiled") == stored(tmp_path / "reference")


def test_progress_is_reported_as_the_file_is_read(tmp_path: Path) -> None:
    """The callback gets every byte of the file, in steps, and changes nothing read."""
    rights = good_rights(60_000, seed=3)
    path = write_rights_csv(tmp_path / "big.csv", rights)
    data = path.read_bytes()
    assert len(data) > 4 << 20
    steps: list[int] = []
    assert fastpath.rights_records is not None
    found = fastpath.rights_records(
        data, KEYS, RIGHTS_COLUMNS, MAX_RIGHTS_PER_BENEFICIARY, steps.append
    )
    assert found is not None and found == compiled(data)
    assert sum(steps) == len(data) and len(steps) >= 2
    assert importer.read_rights_records(path, KEYS, progress=True, compiled=True) == found

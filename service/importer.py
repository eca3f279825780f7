"""Validated imports of rights and practitioner files into the store.

Every row is checked before anything is written; one bad row rejects the whole file and the data
being served stays as it was. Reports name the line and the field, never the value.
"""

from __future__ import annotations

import csv
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

import fastpath
from fastpath import rules
from fastpath.rules import Keys, RightRow
from service.config import PROFESSIONS
from service.store import PractitionerRecord, Store

RIGHTS_COLUMNS = (
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
)
PRACTITIONER_COLUMNS = ("practitioner_id", "profession", "amc_numbers", "status")
PRACTITIONER_STATUSES = ("active", "suspended", "revoked")
MAX_RIGHTS_PER_BENEFICIARY = 1000
PROGRESS_MIN_BYTES = 4 << 20  # smaller files import before a bar would be worth drawing


@dataclass(frozen=True)
class RowError:
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return (
            f"{where}: {self.field}: {self.problem}" if self.field else f"{where}: {self.problem}"
        )


class ImportRejected(Exception):
    """The file has invalid rows; nothing was written."""

    def __init__(self, path: Path, errors: list[RowError], bad_lines: int) -> None:
        self.path = path
        self.errors = errors
        self.bad_lines = bad_lines
        super().__init__(f"{path.name}: {bad_lines} invalid line(s), nothing imported")


@dataclass
class ImportReport:
    kind: str
    rows: int
    beneficiaries: int = 0
    seconds: float = 0.0
    dataset_id: str = ""
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


# -- reading ---------------------------------------------------------------------------------------


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


@contextmanager
def _open_csv(path: Path, progress: bool | None) -> Iterator[IO[str]]:
    """Open a UTF-8 CSV, with a progress bar on stderr for large files."""
    size = path.stat().st_size
    show = progress if progress is not None else (size >= PROGRESS_MIN_BYTES)
    if not show:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            yield f
        return
    bar = _progress_bar()
    with (
        bar,
        bar.open(
            path,
            "r",
            encoding="utf-8",
            errors="surrogateescape",
            newline="",
            description=f"validating {path.name}",
        ) as f,
    ):
        yield f


def _undecodable(row: list[str]) -> bool:
    """Bytes that are not UTF-8 arrive as lone surrogates (surrogateescape), on their own line."""
    text = "".join(row)
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _ascii_file(path: Path) -> bool:
    """Whether every byte of the file is ASCII (then no row can hold undecodable bytes): one
    pass over the raw bytes is much cheaper than a test per row."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if not chunk.isascii():
                return False
    return True


def _rows(
    f: IO[str], columns: tuple[str, ...], errors: list[RowError], ascii_file: bool = False
) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(f)
    try:
        header = next(reader)
    except StopIteration:
        errors.append(RowError(1, "", "the file is empty; a header line is required"))
        return
    except csv.Error:
        errors.append(RowError(1, "", "the header is not valid CSV"))
        return
    if _undecodable(header):
        errors.append(RowError(1, "", "the header is not valid UTF-8"))
        return
    header = [h.strip().lstrip("\ufeff") for h in header]
    if tuple(header) != columns:
        errors.append(RowError(1, "", "the header must be: " + ",".join(columns)))
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            errors.append(RowError(reader.line_num, "", "not valid CSV"))
            return
        if not row:
            continue
        if not ascii_file and _undecodable(row):
            errors.append(RowError(reader.line_num, "", "not valid UTF-8"))
            continue
        if len(row) != len(columns):
            errors.append(
                RowError(reader.line_num, "", f"expected {len(columns)} fields, found {len(row)}")
            )
            continue
        yield reader.line_num, row


# -- rights ----------------------------------------------------------------------------------------


def _check_identity(nir_s: str, key_s: str, birth: str, rank_s: str) -> list[tuple[str, str]]:
    bad = []
    nir = rules.normalise_nir(nir_s)
    nir_ok = rules.valid_nir(nir)
    if not nir_ok:
        bad.append(("nir", rules.FIELD_RULES[rules.F_NIR]))
    if not rules.valid_nir_key_format(key_s):
        bad.append(("nir_key", "must be 2 digits"))
    elif nir_ok and int(key_s) != rules.nir_key_for(nir):
        bad.append(("nir_key", "does not match the NIR"))
    if not rules.valid_birth_date(birth):
        bad.append(("birth_date", rules.FIELD_RULES[rules.F_BIRTH_DATE]))
    if not (len(rank_s) == 1 and "1" <= rank_s <= "9"):
        bad.append(("birth_rank", rules.FIELD_RULES[rules.F_BIRTH_RANK]))
    return bad


def _check_right(
    amc: str, member: str, domain: str, rate_s: str, conv: str, start: str, end: str,
    valid_date: Callable[[str], bool],
) -> list[tuple[str, str]]:  # fmt: skip
    bad = []
    if not rules.valid_amc_number(amc):
        bad.append(("amc_number", rules.FIELD_RULES[rules.F_AMC_NUMBER]))
    if not rules.valid_member_number(member):
        bad.append(("member_number", rules.FIELD_RULES[rules.F_MEMBER_NUMBER]))
    if domain not in rules.DOMAIN_CODES:
        bad.append(("domain", "one of " + ", ".join(rules.DOMAIN_CODES)))
    if not (rate_s.isascii() and rate_s.isdigit() and len(rate_s) <= 3 and int(rate_s) <= 100):
        bad.append(("rate_percent", "an integer from 0 to 100"))
    if not rules.valid_convention_type(conv):
        bad.append(("convention_type", "1 to 16 letters and digits"))
    start_ok = valid_date(start)
    end_ok = valid_date(end)
    if not start_ok:
        bad.append(("start_date", "a calendar date YYYYMMDD"))
    if not end_ok:
        bad.append(("end_date", "a calendar date YYYYMMDD"))
    if start_ok and end_ok and start > end:
        bad.append(("end_date", "must not be before start_date"))
    return bad


def read_rights(
    path: Path,
    keys: Keys,
    *,
    progress: bool | None = None,
) -> tuple[dict[bytes, list[RightRow]], int]:
    """Validate a whole rights file; (rows by storage key, row count) or ImportRejected. The
    reference reading: read_rights_records gives the same records, encoded, from compiled code
    where it can."""
    errors: list[RowError] = []
    by_key: dict[bytes, list[RightRow]] = {}
    rows = 0
    storage_key = keys.storage_key
    member_hash = keys.member_hash
    # A beneficiary's rows usually follow each other and files hold few distinct dates: checking
    # and hashing each identity once per run of rows more than doubles the import rate.
    last_identity: tuple[str, ...] = ()
    identity_problems: list[tuple[str, str]] = []
    skey = b""
    member_hashes: dict[str, bytes] = {}
    date_ok: dict[str, bool] = {}
    # Files hold few distinct rights (insurer, domain, rate, convention, dates: 4,616 in the
    # bench's 400,000 rows): each is checked and parsed once, then a row that repeats one, for a
    # sound identity and a member number already hashed or valid, is one dict lookup. Any other
    # row takes the full check below, which reports its problems in order.
    sound_rights: dict[tuple[str, ...], tuple[int, int, int, int]] = {}
    valid_member = rules.valid_member_number

    def valid_date(s: str) -> bool:
        ok = date_ok.get(s)
        if ok is None:
            ok = date_ok[s] = rules.valid_calendar_date(s)
        return ok

    ascii_file = _ascii_file(path)
    with _open_csv(path, progress) as f:
        for line, row in _rows(f, RIGHTS_COLUMNS, errors, ascii_file):
            rows += 1
            nir, key, birth, rank, amc, member, domain, rate, conv, start, end = row
            identity = (nir, key, birth, rank)
            if identity != last_identity:
                last_identity = identity
                identity_problems = _check_identity(nir, key, birth, rank)
                member_hashes = {}
                if not identity_problems:
                    skey = storage_key(
                        rules.identity_bytes(rules.normalise_nir(nir), birth, int(rank))
                    )
            parts = (amc, domain, rate, conv, start, end)
            parsed = sound_rights.get(parts)
            if (
                parsed is None
                or identity_problems
                or (member and member not in member_hashes and not valid_member(member))
            ):
                problems = identity_problems + _check_right(
                    amc, member, domain, rate, conv, start, end, valid_date
                )
                if problems:
                    errors.extend(RowError(line, fld, msg) for fld, msg in problems)
                    continue
                parsed = sound_rights[parts] = (
                    rules.DOMAIN_CODES[domain],
                    int(rate),
                    int(start),
                    int(end),
                )
            if errors:
                continue  # the file is rejected; keep validating, stop building
            mhash = None
            if member:
                mhash = member_hashes.get(member)
                if mhash is None:
                    mhash = member_hashes[member] = member_hash(skey, member)
            bucket = by_key.setdefault(skey, [])
            if len(bucket) >= MAX_RIGHTS_PER_BENEFICIARY:
                errors.append(
                    RowError(
                        line,
                        "",
                        f"more than {MAX_RIGHTS_PER_BENEFICIARY} rights for one beneficiary",
                    )
                )
                continue
            bucket.append(RightRow(*parsed, amc, conv, mhash))
    if errors:
        raise ImportRejected(path, errors, len({e.line for e in errors}))
    if rows == 0:
        raise ImportRejected(path, [RowError(0, "", "no data rows")], 1)
    return by_key, rows


def read_rights_records(
    path: Path,
    keys: Keys,
    *,
    progress: bool | None = None,
    compiled: bool | None = None,
) -> tuple[list[tuple[bytes, bytes]], int]:
    """Validate a whole rights file: its records (storage key, rules.encode_record of that
    beneficiary's rows), sorted by key, and its row count; or ImportRejected.

    `compiled` (by default: when the Cython extension is built) reads the file in C
    (fastpath.rights_records), which gives the reference's records byte for byte. It takes only
    files the reference accepts: any other file, and the few valid ones it declines, are read by
    `read_rights`, the reference, which reports the invalid rows. False: the reference only.
    """
    path = Path(path)
    if compiled is None:
        compiled = fastpath.IMPLEMENTATION == "cython"
    if compiled:
        found = _read_compiled(path, keys, progress)
        if found is not None:
            return found
    by_key, rows = read_rights(path, keys, progress=progress)
    return [(k, rules.encode_record(by_key[k])) for k in sorted(by_key)], rows


def _read_compiled(
    path: Path, keys: Keys, progress: bool | None
) -> tuple[list[tuple[bytes, bytes]], int] | None:
    """fastpath.rights_records over the file's bytes, with a progress bar on stderr for large
    files; None when the reference must read it. The file is read into memory, not mapped: a
    file truncated meanwhile must not end the process with SIGBUS."""
    if fastpath.rights_records is None:
        raise RuntimeError("the compiled importer needs the Cython extension (make install)")
    data = path.read_bytes()
    show = progress if progress is not None else (len(data) >= PROGRESS_MIN_BYTES)
    if not show:
        return fastpath.rights_records(data, keys, RIGHTS_COLUMNS, MAX_RIGHTS_PER_BENEFICIARY)
    bar = _progress_bar()
    with bar:
        task = bar.add_task(f"importing {path.name}", total=len(data))
        return fastpath.rights_records(
            data,
            keys,
            RIGHTS_COLUMNS,
            MAX_RIGHTS_PER_BENEFICIARY,
            lambda n: bar.advance(task, n),
        )


def import_rights(
    store: Store,
    keys: Keys,
    path: Path,
    *,
    merge: bool = False,
    progress: bool | None = None,
    compiled: bool | None = None,
) -> ImportReport:
    """Validate then load a rights file in one transaction.

    By default the file is the full dataset and replaces every right. With `merge`, only the
    beneficiaries in the file change: their rights at the insurers (AMCs) present in the file are
    replaced, their rights at other insurers are kept. `compiled` as in read_rights_records.
    """
    started = time.perf_counter()
    records, rows = read_rights_records(Path(path), keys, progress=progress, compiled=compiled)
    return load_rights(store, keys, records, rows, Path(path).name, merge=merge, started=started)


def load_rights(
    store: Store,
    keys: Keys,
    records: list[tuple[bytes, bytes]],
    rows: int,
    source: str,
    *,
    merge: bool = False,
    started: float | None = None,
) -> ImportReport:
    """Write the records of `read_rights_records` (the second half of `import_rights`). The
    report's `extra` counts beneficiaries added, removed and changed against the data served
    before."""
    started = time.perf_counter() if started is None else started
    if merge:
        existing = store.get_rights(k for k, _ in records)
        if existing:
            records = [(k, _merged(existing[k], v) if k in existing else v) for k, v in records]
    dataset_id = uuid.uuid4().hex
    changes = _rights_changes(store, records, replace=not merge)
    store.write_rights(
        iter(records),
        replace=not merge,
        pepper_fingerprint=keys.fingerprint,
        dataset={
            "dataset_id": dataset_id,
            "imported_at": time.time(),
            "source": source,
            "mode": "merge" if merge else "replace",
            "rights_rows": rows,
        },
    )
    return ImportReport(
        "rights", rows, len(records), time.perf_counter() - started, dataset_id, changes
    )


def _merged(old: bytes, new: bytes) -> bytes:
    """A merge's record: the beneficiary's stored rows at insurers the file does not list, then
    the file's rows."""
    new_rows = rules.decode_record(new)
    amcs = {r.amc_number for r in new_rows}
    kept = [r for r in rules.decode_record(old) if r.amc_number not in amcs]
    return rules.encode_record(kept + new_rows)


def _rights_changes(
    store: Store, records: list[tuple[bytes, bytes]], *, replace: bool
) -> dict[str, int]:
    """Beneficiaries the import adds, removes (replace only) and changes, against the store."""
    added = changed = 0
    with store.env.begin(db=store.rights_db) as txn:
        before = txn.stat(store.rights_db)["entries"]
        if before:
            for key, value in records:
                old = txn.get(key)
                if old is None:
                    added += 1
                elif bytes(old) != value:
                    changed += 1
        else:
            added = len(records)
    kept = len(records) - added
    return {
        "added": added,
        "removed": before - kept if replace else 0,
        "changed": changed,
        "unchanged": kept - changed,
    }


# -- practitioners ---------------------------------------------------------------------------------


def read_practitioners(path: Path) -> list[PractitionerRecord]:
    errors: list[RowError] = []
    records: dict[str, PractitionerRecord] = {}
    with _open_csv(Path(path), False) as f:
        for line, (pid, profession, amcs_s, status) in _rows(f, PRACTITIONER_COLUMNS, errors):
            problems = []
            if not rules.valid_practitioner_id(pid):
                problems.append(("practitioner_id", "9 to 14 digits"))
            elif pid in records:
                problems.append(("practitioner_id", "listed twice"))
            if profession not in PROFESSIONS:
                problems.append(("profession", "one of " + ", ".join(PROFESSIONS)))
            amcs = [a for a in amcs_s.split(";") if a] if amcs_s else []
            if not amcs or not all(rules.valid_amc_number(a) for a in amcs):
                problems.append(("amc_numbers", "1 to 10 digits each, separated by ';'"))
            if status not in PRACTITIONER_STATUSES:
                problems.append(("status", "one of " + ", ".join(PRACTITIONER_STATUSES)))
            if problems:
                errors.extend(RowError(line, fld, msg) for fld, msg in problems)
                continue
            records[pid] = PractitionerRecord(
                practitioner_id=pid,
                profession=profession,
                amc_numbers=sorted(set(amcs)),
                status=status,
                suspension_reason="listed as suspended in the import"
                if status == "suspended"
                else "",
            )
    if errors:
        raise ImportRejected(Path(path), errors, len({e.line for e in errors}))
    if not records:
        raise ImportRejected(Path(path), [RowError(0, "", "no data rows")], 1)
    return list(records.values())


def import_practitioners(
    store: Store, path: Path, *, merge: bool = False, by: str = ""
) -> ImportReport:
    started = time.perf_counter()
    records = read_practitioners(Path(path))
    return load_practitioners(store, records, Path(path).name, merge=merge, by=by, started=started)


def load_practitioners(
    store: Store,
    records: list[PractitionerRecord],
    source: str,
    *,
    merge: bool = False,
    by: str = "",
    started: float | None = None,
) -> ImportReport:
    """Write practitioners validated by `read_practitioners`. The report's `extra` counts those
    added, removed (replace only) and changed (profession, insurers or status); each of those
    changes goes to the practitioner's history, as made by `by` through this import."""
    started = time.perf_counter() if started is None else started
    before = {r.practitioner_id: r for r in store.practitioners()}
    store.write_practitioners(records, replace=not merge)
    after = {r.practitioner_id: r for r in store.practitioners()}
    reason = f"practitioners import {source}"
    events: list[tuple[str, dict[str, str]]] = []
    for pid in sorted(after.keys() - before.keys()):
        events.append((pid, {"action": "added", "detail": after[pid].status}))
    for pid in sorted(before.keys() - after.keys()):
        events.append((pid, {"action": "removed"}))
    changed = 0
    for pid in sorted(after.keys() & before.keys()):
        old, new = before[pid], after[pid]
        what = [
            f"{name} {getattr(old, name)} -> {getattr(new, name)}"
            for name in ("profession", "amc_numbers", "status")
            if getattr(old, name) != getattr(new, name)
        ]
        if what:
            changed += 1
            events.append((pid, {"action": "changed", "detail": "; ".join(what)}))
    with store.env.begin(write=True) as txn:
        for pid, event in events:
            store.add_history(pid, {"by": by or "import", **event, "reason": reason}, txn)
    extra = {
        "added": len(after.keys() - before.keys()),
        "removed": len(before.keys() - after.keys()),
        "changed": changed,
        "unchanged": len(records) - changed - len(after.keys() - before.keys()),
    }
    return ImportReport(
        "practitioners", len(records), seconds=time.perf_counter() - started, extra=extra
    )


def print_rejection(exc: ImportRejected, out: Callable[[str], None] | None = None) -> None:
    """Every bad line by number and field, then the total."""
    write = out or (lambda s: print(s, file=sys.stderr))
    for err in exc.errors:
        write(f"{exc.path.name}: {err}")
    write(f"covergate: {exc}")

"""The data dir on disk: no NIR, birth date or member number in any raw file, rights keyed by
16-byte keyed hashes, the pepper private and bound to the data by its fingerprint, schema and
dataset metadata.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import (
    OTHER_AMC,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Identity,
    PractitionerRow,
    Right,
    cli,
    create_token,
    make_identity,
    write_practitioners_csv,
    write_rights_csv,
)

from fastpath import rules
from fastpath.rules import Keys
from service import importer
from service.config import load_pepper
from service.store import (
    META_DATASET,
    META_PEPPER,
    META_SCHEMA,
    SCHEMA_VERSION,
    Store,
    StoreError,
    data_files,
    prefault,
)

BENEFICIARIES = 300


@pytest.fixture(autouse=True)
def _no_outside_covergate_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COVERGATE_PEPPER_FILE", raising=False)
    monkeypatch.delenv("COVERGATE_DATA", raising=False)


class Built:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.rights: list[Right] = []
        self.import_output = ""
        self.started = 0.0
        self.finished = 0.0


def synthetic_rights(seed: int) -> list[Right]:
    rng = random.Random(seed)
    rights: list[Right] = []
    for i in range(BENEFICIARIES):
        ident = make_identity(
            rng, corsica=("2A", "2B")[i % 2] if i % 10 == 0 else "", lunar=i % 13 == 0
        )
        member = f"{'AB'[i % 2]}{rng.randrange(10**9):09d}"
        rights.append(Right(ident, PHARMACY_AMC, "PHAR", member_number=member))
        if i % 3 == 0:
            rights.append(
                Right(ident, OTHER_AMC, "MEDE", member_number=f"Z{i:07d}", rate_percent=70)
            )
        if i % 50 == 0:  # a twin: same NIR and birth date, rank 2
            twin = Identity(ident.nir, ident.nir_key, ident.birth_date, 2)
            rights.append(Right(twin, OTHER_AMC, "PHAR", member_number=f"T{i:07d}"))
    return rights


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """A data dir made the way an operator would: practitioners, rights, tokens, a suspension."""
    b = Built(tmp_path_factory.mktemp("store"))
    b.rights = synthetic_rights(seed=21)
    write_practitioners_csv(
        b.root / "p.csv",
        [
            PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC, OTHER_AMC)),
            PractitionerRow("10002222222", "physician", (OTHER_AMC,)),
        ],
    )
    write_rights_csv(b.root / "rights.csv", b.rights)
    cli("import", "practitioners", str(b.root / "p.csv"), data_dir=b.data)
    b.started = time.time()
    b.import_output = cli("import", "rights", str(b.root / "rights.csv"), data_dir=b.data).stdout
    b.finished = time.time()
    create_token(b.data, PHARMACIST_ID)
    create_token(b.data, "900000001", "claims")
    cli("practitioner", "suspend", "10002222222", "--reason", "test", data_dir=b.data)
    return b


def personal_strings(rights: list[Right]) -> set[str]:
    out: set[str] = set()
    for r in rights:
        out |= {r.identity.nir, r.identity.nir.lower(), r.identity.birth_date}
        if r.member_number:
            out.add(r.member_number)
    return out


def encodings(value: str) -> list[bytes]:
    return [value.encode("ascii"), value.encode("utf-16-le"), value.encode("utf-16-be")]


def all_files(data_dir: Path) -> dict[Path, bytes]:
    files = {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}
    assert set(files) == set(data_files(data_dir))
    return files


# -- privacy of the data dir -----------------------------------------------------------------------


def test_no_personal_data_in_any_raw_file(built: Built) -> None:
    files = all_files(built.data)
    names = {p.relative_to(built.data).as_posix() for p in files}
    assert {"pepper", "store/data.mdb", "store/lock.mdb"} <= names
    assert sum(len(b) for b in files.values()) > 0
    values = personal_strings(built.rights)
    assert len(values) > 3 * BENEFICIARIES  # NIRs, birth dates, member numbers
    needles = [n for v in values for n in encodings(v)]
    leaks = {
        path.relative_to(built.data).as_posix(): hits
        for path, raw in files.items()
        if (hits := sum(needle in raw for needle in needles))
    }
    assert not leaks, f"NIRs, birth dates or member numbers found in raw files: {leaks}"


IMPORT_IN_A_FRESH_PROCESS = """
import sys
from pathlib import Path
from fastpath.rules import Keys
from service import importer
from service.store import Store
with Store(Path(sys.argv[1])) as store:
    importer.import_rights(store, Keys(b"\\x07" * 32), Path(sys.argv[2]), progress=False)
"""


def test_no_personal_data_after_an_api_import(tmp_path: Path) -> None:
    """The importer's heap holds the CSV text: none of it may reach the store's pages. (A fresh
    process, so what is on the heap does not depend on which tests ran before.)"""
    rights = synthetic_rights(seed=22)
    path = write_rights_csv(tmp_path / "r.csv", rights)
    subprocess.run(
        [sys.executable, "-c", IMPORT_IN_A_FRESH_PROCESS, str(tmp_path / "data"), str(path)],
        check=True,
        timeout=120,
    )
    files = all_files(tmp_path / "data")
    values = personal_strings(rights)
    leaks = {
        p.name: hits for p, raw in files.items() if (hits := sum(v.encode() in raw for v in values))
    }
    assert not leaks, f"NIRs, birth dates or member numbers found in raw files: {leaks}"


def test_store_zeroes_buffers_before_writing(tmp_path: Path) -> None:
    """LMDB's meminit=False writes leftover heap bytes (CSV text, tokens) into unused page space."""
    with Store(tmp_path / "data") as store:
        assert store.env.flags()["meminit"] is True


def test_rights_are_keyed_by_16_byte_keyed_hashes(built: Built) -> None:
    keys = Keys(load_pepper(built.data, None))
    expected = {
        keys.storage_key(
            rules.identity_bytes(
                rules.normalise_nir(r.identity.nir), r.identity.birth_date, r.identity.birth_rank
            )
        )
        for r in built.rights
    }
    with Store(built.data) as store, store.env.begin(db=store.rights_db) as txn:
        stored = dict(txn.cursor())
    assert all(len(k) == rules.STORAGE_KEY_SIZE == 16 for k in stored)
    assert set(stored) == expected
    # Each value decodes to that beneficiary's rows; member numbers only as 16-byte hashes.
    rows = [row for v in stored.values() for row in rules.decode_record(v)]
    assert len(rows) == len(built.rights)
    assert all(row.member_hash is not None and len(row.member_hash) == 16 for row in rows)


def test_pepper_file_is_private(built: Built) -> None:
    pepper = built.data / "pepper"
    assert stat.S_IMODE(pepper.stat().st_mode) == 0o600
    assert 16 <= len(bytes.fromhex(pepper.read_text().strip())) <= 64


def test_store_records_the_pepper_fingerprint_not_the_pepper(built: Built) -> None:
    pepper = load_pepper(built.data, None)
    with Store(built.data) as store:
        assert store.pepper_fingerprint() == Keys(pepper).fingerprint
    raw = (built.data / "store" / "data.mdb").read_bytes()
    assert pepper not in raw
    assert pepper.hex().encode() not in raw


# -- metadata --------------------------------------------------------------------------------------


def test_schema_version_recorded(built: Built) -> None:
    with Store(built.data) as store, store.env.begin(db=store.meta_db) as txn:
        assert txn.get(META_SCHEMA) == str(SCHEMA_VERSION).encode()


def test_dataset_metadata(built: Built) -> None:
    match = re.search(r"dataset ([0-9a-f]{32})", built.import_output)
    assert match, built.import_output
    identities = {
        (r.identity.nir, r.identity.birth_date, r.identity.birth_rank) for r in built.rights
    }
    assert (
        f"imported {len(built.rights):,} rights rows for {len(identities):,} beneficiaries"
        in built.import_output
    )
    with Store(built.data) as store:
        dataset = store.dataset()
        counts = store.counts()
        with store.env.begin(db=store.meta_db) as txn:
            raw = txn.get(META_DATASET)
    assert dataset is not None and raw is not None
    assert json.loads(raw) == dataset
    assert dataset["dataset_id"] == match.group(1)
    assert built.started <= dataset["imported_at"] <= built.finished
    assert dataset["rights_rows"] == len(built.rights)
    assert dataset["beneficiaries"] == len(identities) == counts["beneficiaries"]
    assert dataset["mode"] == "replace"
    assert counts["practitioners"] == 2
    assert counts["credentials"] == 2


def test_fresh_store_has_no_dataset(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store:
        assert store.dataset() is None
        assert store.pepper_fingerprint() is None
        assert store.counts() == {"beneficiaries": 0, "practitioners": 0, "credentials": 0}


def test_unsupported_schema_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store, store.env.begin(write=True, db=store.meta_db) as txn:
        txn.put(META_SCHEMA, b"99")
    with pytest.raises(StoreError, match="schema 99"):
        Store(tmp_path / "d")


def test_cli_on_unsupported_schema_fails_cleanly(tmp_path: Path) -> None:
    with Store(tmp_path / "d") as store, store.env.begin(write=True, db=store.meta_db) as txn:
        txn.put(META_SCHEMA, b"99")
    proc = cli("practitioner", "show", PHARMACIST_ID, "--data", str(tmp_path / "d"), check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


# -- the pepper binds the data ---------------------------------------------------------------------


def snapshot(data_dir: Path) -> dict[str, dict[bytes, bytes]]:
    with Store(data_dir) as store, store.env.begin() as txn:
        return {
            name: dict(txn.cursor(db))
            for name, db in (
                ("rights", store.rights_db),
                ("practitioners", store.practitioners_db),
                ("credentials", store.credentials_db),
                ("meta", store.meta_db),
            )
        }


@pytest.fixture
def small_store(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    rights = synthetic_rights(seed=5)[:20]
    path = write_rights_csv(tmp_path / "r.csv", rights)
    cli("import", "rights", str(path), data_dir=data)
    return data, path


@pytest.mark.parametrize("merge", [False, True], ids=["replace", "merge"])
def test_other_pepper_refused_at_import_api(small_store: tuple[Path, Path], merge: bool) -> None:
    data, path = small_store
    before = snapshot(data)
    with Store(data) as store, pytest.raises(StoreError, match="fingerprint"):
        importer.import_rights(store, Keys(b"\x42" * 32), path, merge=merge, progress=False)
    assert snapshot(data) == before
    assert before["meta"][META_PEPPER] == Keys(load_pepper(data, None)).fingerprint.encode()


def test_other_pepper_refused_at_import_cli(small_store: tuple[Path, Path], tmp_path: Path) -> None:
    data, path = small_store
    before = snapshot(data)
    other = tmp_path / "other-pepper"
    fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, (b"\x42" * 32).hex().encode())
    os.close(fd)
    proc = cli(
        "import", "rights", str(path), "--pepper-file", str(other), data_dir=data, check=False
    )
    assert snapshot(data) == before
    assert proc.returncode != 0
    assert "pepper" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_same_pepper_reimport_is_accepted(small_store: tuple[Path, Path]) -> None:
    data, path = small_store
    before = snapshot(data)
    cli("import", "rights", str(path), data_dir=data)
    after = snapshot(data)
    assert after["rights"] == before["rights"]
    assert after["meta"][META_DATASET] != before["meta"][META_DATASET]  # a new dataset id


def test_practitioners_without_a_quota_slot_get_one_on_open(tmp_path: Path) -> None:
    """A store written before quota slots existed must not serve anyone unmetered."""
    from service.store import DB_PRACTITIONERS, PractitionerRecord, Store

    with Store(tmp_path / "data") as store, store.env.begin(write=True) as txn:
        db = store.env.open_db(DB_PRACTITIONERS, txn=txn)
        for pid in ("10000000001", "10000000002"):
            old = PractitionerRecord(pid, "pharmacist", ["123456789"])  # slot -1, as before
            txn.put(pid.encode(), old.to_bytes(), db=db)
    with Store(tmp_path / "data") as store:
        slots = sorted(p.slot for p in store.practitioners())
        assert slots == [0, 1]
        assert store.quota_slots_used() == 2


def test_a_dropped_practitioner_loses_its_credentials_for_good(tmp_path: Path) -> None:
    """A replace import that drops a practitioner deletes its tokens and pins: imported again
    later, it does not get its old credentials back."""
    from service.auth import INVALID, Authenticator

    data = tmp_path / "data"
    listed = write_practitioners_csv(
        tmp_path / "both.csv",
        [
            PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,)),
            PractitionerRow("10007654321", "hospital", (PHARMACY_AMC,)),
        ],
    )
    alone = write_practitioners_csv(
        tmp_path / "alone.csv", [PractitionerRow("10007654321", "hospital", (PHARMACY_AMC,))]
    )
    cli("import", "practitioners", str(listed), data_dir=data)
    token = create_token(data, PHARMACIST_ID)
    kept = create_token(data, "10007654321")
    claims = create_token(data, PHARMACIST_ID, "claims")  # a claims system of the same id stays
    with Store(data) as store:
        store.update_practitioner(PHARMACIST_ID, cert_fingerprints=["ab" * 32])
    cli("import", "practitioners", str(alone), data_dir=data)
    cli("import", "practitioners", str(listed), data_dir=data)
    with Store(data) as store:
        auth = Authenticator(store)
        assert auth.authenticate([("authorization", f"Bearer {token}")], "practitioner") is INVALID
        assert auth.authenticate([("authorization", f"Bearer {kept}")], "practitioner") is not (
            INVALID
        )
        assert auth.authenticate([("authorization", f"Bearer {claims}")], "claims") is not INVALID
        record = store.practitioner(PHARMACIST_ID)
        assert record is not None and record.cert_fingerprints == []


def _resident_bytes(data_file: Path) -> int:
    """Bytes of this process's map of `data_file` backed by pages now (Rss in /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.split(maxsplit=5)[5:] == [str(data_file)]
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc only")
def test_prefault_maps_every_page_of_the_rights_file(tmp_path: Path) -> None:
    rng = random.Random(7)
    records = sorted((rng.randbytes(16), rng.randbytes(400)) for _ in range(3000))
    with Store(tmp_path) as store:
        store.write_rights(iter(records), replace=True, pepper_fingerprint="f",
                           dataset={"dataset_id": "synthetic"})  # fmt: skip
    with Store(tmp_path) as store:  # a fresh map: only the pages opening it read
        data_file = (tmp_path / "store" / "data.mdb").resolve()
        size = data_file.stat().st_size
        assert size > 1 << 20
        assert _resident_bytes(data_file) < size // 4
        assert prefault(store.env) == size
        assert _resident_bytes(data_file) == size
        with store.env.begin(db=store.rights_db) as txn:  # and it still reads the same
            assert [(bytes(k), bytes(v)) for k, v in txn.cursor()] == records

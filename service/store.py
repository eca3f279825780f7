"""The covergate store: one LMDB environment holding rights (keyed by pseudonym), practitioners,
credentials (token hashes only) and metadata.

Every change is one LMDB write transaction, so readers see the old data or the new, never a mix.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from service.config import StoreSettings

SCHEMA_VERSION = 1
STORE_SUBDIR = "store"

DB_RIGHTS = b"rights"
DB_PRACTITIONERS = b"practitioners"
DB_CREDENTIALS = b"credentials"
DB_META = b"meta"
# Who changed a practitioner, when and why (suspensions, reinstatements, pins, quota overrides),
# keyed by practitioner id and time; kept when the practitioner leaves, as an audit trail.
DB_HISTORY = b"history"

# meta keys
META_SCHEMA = b"schema_version"
META_DATASET = b"dataset"  # JSON: dataset id, import time, counts
META_PEPPER = b"pepper_fingerprint"
META_GENERATION = b"generation"  # bumped by every change to practitioners or credentials
META_NEXT_SLOT = b"next_quota_slot"


# madvise(2) advice values (Linux): fault pages in now (5.14+), or only read them ahead.
MADV_POPULATE_READ = 22
MADV_WILLNEED = 3


def _bytes(value: bytes | memoryview | None) -> bytes | None:
    """A py-lmdb value as bytes. The store's transactions return bytes (buffers=False); py-lmdb's
    stubs type them as either."""
    return value if value is None or isinstance(value, bytes) else bytes(value)


@dataclass
class PractitionerRecord:
    practitioner_id: str
    profession: str
    amc_numbers: list[str]
    status: str = "active"  # active | suspended | revoked
    suspension_reason: str = ""
    updated_at: float = 0.0
    quota: dict[str, Any] = field(default_factory=dict)  # per-practitioner overrides
    cert_fingerprints: list[str] = field(default_factory=list)  # SHA-256 hex, when pinned
    slot: int = -1  # index of the practitioner's quota slot; stable once given

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> PractitionerRecord:
        return cls(**json.loads(raw))


@dataclass
class CredentialRecord:
    """A bearer token, stored as the SHA-256 of its secret part; the token itself is never kept."""

    token_id: str
    practitioner_id: str
    role: str
    secret_sha256: str
    created_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CredentialRecord:
        return cls(**json.loads(raw))


def _data_mapping(data_file: Path) -> tuple[int, int] | None:
    """(address, length) of this process's mapping of `data_file`, from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == str(data_file):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    return start, end - start
    except OSError:
        pass
    return None


def read_through(data_file: Path) -> None:
    """Read the file in large sequential chunks, which fills the page cache at the disk's
    bandwidth (the map itself is advised MADV_RANDOM, readahead off: faulting it in from a cold
    cache would read one page at a time). Safe in any thread: it never touches LMDB."""
    chunk = bytearray(4 << 20)
    with open(data_file, "rb", buffering=0) as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while f.readinto(chunk):
            pass


def prefault(env: lmdb.Environment, *, read: bool = True) -> int:
    """Fault every page of `env`'s data file into this process's map now, so that the first
    lookups after start (or a switch to a new generation) take no page fault, nor wait for the
    disk when the file is not in the page cache yet: the file read through once, then madvise
    MADV_POPULATE_READ (Linux 5.14+), else MADV_WILLNEED. `read` false skips the read (done
    already, off the event loop). Returns the bytes advised; 0 where there is no such map (no
    /proc, another OS) or madvise refuses."""
    path = Path(env.path())
    data_file = (path / "data.mdb" if path.is_dir() else path).resolve()
    mapping = _data_mapping(data_file)
    if mapping is None:
        return 0
    address, mapped = mapping
    page = os.sysconf("SC_PAGE_SIZE")
    # The map is as large as map_size; only the file's own pages may be touched (SIGBUS beyond).
    length = min(mapped, (data_file.stat().st_size + page - 1) // page * page)
    if read:
        read_through(data_file)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for advice in (MADV_POPULATE_READ, MADV_WILLNEED):
        if libc.madvise(address, length, advice) == 0:
            return length
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: a kernel without this advice
            return 0
    return 0


class StoreError(Exception):
    """The data dir cannot be opened or is not a covergate store of a supported version."""


class Store:
    """One open LMDB environment. Open it after fork: LMDB handles do not survive fork."""

    def __init__(self, data_dir: Path, settings: StoreSettings | None = None) -> None:
        settings = settings or StoreSettings()
        self.data_dir = Path(data_dir)
        path = self.data_dir / STORE_SUBDIR
        path.mkdir(parents=True, exist_ok=True)
        try:
            self.env = lmdb.open(
                str(path),
                map_size=settings.map_size,
                max_dbs=8,
                max_readers=settings.max_readers,
                readahead=False,  # random point reads: readahead only pollutes the page cache
                # meminit stays on: without it LMDB writes leftover heap bytes (the CSV being
                # imported, identities included) into the unused part of pages.
                mode=0o600,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store in {path}: {exc}") from exc
        with self.env.begin(write=True) as txn:
            self.rights_db = self.env.open_db(DB_RIGHTS, txn=txn)
            self.practitioners_db = self.env.open_db(DB_PRACTITIONERS, txn=txn)
            self.credentials_db = self.env.open_db(DB_CREDENTIALS, txn=txn)
            self.meta_db = self.env.open_db(DB_META, txn=txn)
            self.history_db = self.env.open_db(DB_HISTORY, txn=txn)
            # Practitioners written before quota slots existed would be served without quotas:
            # give each one a slot now, so no practitioner ever goes unmetered.
            unslotted = [
                PractitionerRecord.from_bytes(v)
                for _, v in txn.cursor(self.practitioners_db)
                if PractitionerRecord.from_bytes(v).slot < 0
            ]
            for rec in unslotted:
                rec.slot = self._next_slot(txn)
                txn.put(rec.practitioner_id.encode(), rec.to_bytes(), db=self.practitioners_db)
            if unslotted:
                self._bump_generation(txn)
            schema = txn.get(META_SCHEMA, db=self.meta_db)
            if schema is None:
                txn.put(META_SCHEMA, str(SCHEMA_VERSION).encode(), db=self.meta_db)
            elif int(schema) != SCHEMA_VERSION:
                raise StoreError(
                    f"the store in {path} has schema {int(schema)}, this covergate reads "
                    f"{SCHEMA_VERSION}"
                )

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------------

    def dataset(self) -> dict[str, Any] | None:
        """What the last rights import recorded, or None when no rights are loaded yet."""
        with self.env.begin(db=self.meta_db) as txn:
            raw = _bytes(txn.get(META_DATASET))
        return json.loads(raw) if raw else None

    def pepper_fingerprint(self) -> str | None:
        with self.env.begin(db=self.meta_db) as txn:
            raw = _bytes(txn.get(META_PEPPER))
        return raw.decode() if raw else None

    def check_pepper(self, txn: lmdb.Transaction, fingerprint: str) -> None:
        """Refuse to mix hashes made with two peppers: they would silently never match."""
        stored = _bytes(txn.get(META_PEPPER, db=self.meta_db))
        if stored is None:
            txn.put(META_PEPPER, fingerprint.encode(), db=self.meta_db)
        elif stored.decode() != fingerprint:
            raise StoreError(
                "this pepper is not the one the store was built with (fingerprints differ)"
            )

    def generation(self, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.env.begin(db=self.meta_db) as own:
                raw = _bytes(own.get(META_GENERATION))
        else:
            raw = _bytes(txn.get(META_GENERATION, db=self.meta_db))
        return int(raw) if raw else 0

    def _bump_generation(self, txn: lmdb.Transaction) -> None:
        txn.put(META_GENERATION, str(self.generation(txn) + 1).encode(), db=self.meta_db)

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {
                "beneficiaries": txn.stat(self.rights_db)["entries"],
                "practitioners": txn.stat(self.practitioners_db)["entries"],
                "credentials": txn.stat(self.credentials_db)["entries"],
            }

    # -- rights ------------------------------------------------------------------------------------

    def write_rights(
        self,
        records: Iterable[tuple[bytes, bytes]],
        *,
        replace: bool,
        pepper_fingerprint: str,
        dataset: dict[str, Any],
    ) -> None:
        """Write (storage key, record) pairs in one transaction: all visible at once, or none.

        With `replace`, every previous right goes; records must then come sorted by key.
        """
        with self.env.begin(write=True) as txn:
            self.check_pepper(txn, pepper_fingerprint)
            if replace:
                txn.drop(self.rights_db, delete=False)
                with txn.cursor(self.rights_db) as cursor:
                    for key, value in records:
                        cursor.put(key, value, append=True)
            else:
                for key, value in records:
                    txn.put(key, value, db=self.rights_db)
            dataset = dict(dataset, beneficiaries=txn.stat(self.rights_db)["entries"])
            txn.put(META_DATASET, json.dumps(dataset).encode(), db=self.meta_db)

    def get_rights(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        with self.env.begin(db=self.rights_db) as txn:
            return {k: v for k in keys if (v := txn.get(k)) is not None}

    # -- practitioners -----------------------------------------------------------------------------

    def practitioner(
        self, practitioner_id: str, txn: lmdb.Transaction | None = None
    ) -> PractitionerRecord | None:
        if txn is None:
            with self.env.begin(db=self.practitioners_db) as own:
                raw = _bytes(own.get(practitioner_id.encode()))
        else:
            raw = _bytes(txn.get(practitioner_id.encode(), db=self.practitioners_db))
        return PractitionerRecord.from_bytes(raw) if raw else None

    def practitioners(self) -> Iterator[PractitionerRecord]:
        with self.env.begin(db=self.practitioners_db) as txn:
            for _, raw in txn.cursor():
                yield PractitionerRecord.from_bytes(raw)

    def write_practitioners(self, records: Iterable[PractitionerRecord], *, replace: bool) -> None:
        """Replace or upsert practitioners. A replace keeps the suspension of one still listed:
        an automatic suspension must be lifted by a human, not by the next nightly import."""
        now = time.time()
        with self.env.begin(write=True) as txn:
            previous = {}
            if replace:
                previous = {
                    k.decode(): PractitionerRecord.from_bytes(v)
                    for k, v in txn.cursor(self.practitioners_db)
                }
                txn.drop(self.practitioners_db, delete=False)
            kept: set[str] = set()
            for rec in records:
                old = previous.get(rec.practitioner_id) or self.practitioner(
                    rec.practitioner_id, txn
                )
                if old is not None:
                    if old.status == "suspended" and rec.status == "active":
                        rec.status, rec.suspension_reason = old.status, old.suspension_reason
                    # Overrides and pins are set by administrators, not by the practitioners file.
                    rec.quota = rec.quota or old.quota
                    rec.cert_fingerprints = rec.cert_fingerprints or old.cert_fingerprints
                    rec.slot = old.slot
                if rec.slot < 0:
                    rec.slot = self._next_slot(txn)
                rec.updated_at = now
                txn.put(rec.practitioner_id.encode(), rec.to_bytes(), db=self.practitioners_db)
                kept.add(rec.practitioner_id)
            if replace:
                # A practitioner dropped from the file loses its credentials (its pins went with
                # its record): imported again later, it starts with none, not with old tokens.
                dropped = set(previous) - kept
                for key, raw in list(txn.cursor(self.credentials_db)):
                    credential = CredentialRecord.from_bytes(raw)
                    if credential.role == "practitioner" and credential.practitioner_id in dropped:
                        txn.delete(key, db=self.credentials_db)
            self._bump_generation(txn)

    def quota_slots_used(self) -> int:
        """How many quota slots have been handed out (the shared state file must hold them)."""
        with self.env.begin(db=self.meta_db) as txn:
            raw = _bytes(txn.get(META_NEXT_SLOT))
        return int(raw) if raw else 0

    def _next_slot(self, txn: lmdb.Transaction) -> int:
        """Quota slots are never reused: a new practitioner never inherits someone's counters."""
        raw = _bytes(txn.get(META_NEXT_SLOT, db=self.meta_db))
        slot = int(raw) if raw else 0
        txn.put(META_NEXT_SLOT, str(slot + 1).encode(), db=self.meta_db)
        return slot

    def update_practitioner(
        self, practitioner_id: str, *, event: dict[str, Any] | None = None, **changes: Any
    ) -> PractitionerRecord:
        """Change a practitioner. `event` (who, action, reason, ...) goes to its history in the
        same transaction; a change of status without one is recorded as made by "system"."""
        with self.env.begin(write=True) as txn:
            rec = self.practitioner(practitioner_id, txn)
            if rec is None:
                raise KeyError(practitioner_id)
            old_status = rec.status
            for name, value in changes.items():
                setattr(rec, name, value)
            rec.updated_at = time.time()
            txn.put(practitioner_id.encode(), rec.to_bytes(), db=self.practitioners_db)
            if event is None and rec.status != old_status:
                event = {"by": "system", "action": rec.status, "reason": rec.suspension_reason}
            if event is not None:
                self.add_history(practitioner_id, event, txn)
            self._bump_generation(txn)
        return rec

    def add_history(
        self, practitioner_id: str, event: dict[str, Any], txn: lmdb.Transaction | None = None
    ) -> None:
        """Append one event (a JSON object; `at` is set to now unless given)."""
        if txn is None:
            with self.env.begin(write=True) as own:
                self.add_history(practitioner_id, event, own)
            return
        event = {"at": time.time(), **event}
        prefix = practitioner_id.encode() + b"\x00"
        stamp = time.time_ns()
        while not txn.put(
            prefix + b"%020d" % stamp,
            json.dumps(event, separators=(",", ":")).encode(),
            db=self.history_db,
            overwrite=False,
        ):
            stamp += 1  # two events in the same nanosecond keep their order

    def history(self, practitioner_id: str) -> list[dict[str, Any]]:
        """A practitioner's events, oldest first (also after it left the store)."""
        prefix = practitioner_id.encode() + b"\x00"
        events = []
        with self.env.begin(db=self.history_db) as txn, txn.cursor() as cursor:
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    events.append(json.loads(bytes(value)))
        return events

    # -- credentials -------------------------------------------------------------------------------

    def credential(
        self, token_id: str, txn: lmdb.Transaction | None = None
    ) -> CredentialRecord | None:
        if txn is None:
            with self.env.begin(db=self.credentials_db) as own:
                raw = _bytes(own.get(token_id.encode()))
        else:
            raw = _bytes(txn.get(token_id.encode(), db=self.credentials_db))
        return CredentialRecord.from_bytes(raw) if raw else None

    def add_credential(self, record: CredentialRecord) -> None:
        with self.env.begin(write=True) as txn:
            if not txn.put(
                record.token_id.encode(), record.to_bytes(), db=self.credentials_db, overwrite=False
            ):
                raise StoreError("token id collision; create the token again")
            self._bump_generation(txn)

    def revoke_credentials(self, practitioner_id: str) -> int:
        """Delete every token of a practitioner; returns how many there were."""
        with self.env.begin(write=True) as txn:
            doomed = [
                k
                for k, v in txn.cursor(self.credentials_db)
                if CredentialRecord.from_bytes(v).practitioner_id == practitioner_id
            ]
            for k in doomed:
                txn.delete(k, db=self.credentials_db)
            self._bump_generation(txn)
        return len(doomed)


def data_files(data_dir: Path) -> list[Path]:
    """Every file under the data dir (for audits and the no-personal-data test)."""
    return [Path(root) / name for root, _, names in os.walk(data_dir) for name in names]

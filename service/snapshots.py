"""Rights snapshots: one import, built once into a compact, signed generation, fetched and checked
by every host, activated on all of them together, rolled back in one command.

    import (one host) -> snapshot create OUT -> snapshot fetch SOURCE (every host: verify,
    install, report ready) -> snapshot activate N (once every live host is ready: all switch)

A generation is a directory `<N>/` holding `data.mdb` (an LMDB environment with the rights and the
dataset's metadata only: no practitioner, credential or history) and `manifest.json`: generation,
sha256 and size of `data.mdb`, beneficiaries and rights rows, dataset id, schema version, the
pepper's fingerprint (never the pepper), and an Ed25519 signature over all of that made with a key
kept outside the data dir. A host installs a generation only after checking every one of them, into
`DIR/snapshots/<N>/`, renamed into place after an fsync, and opens it read-only with no lock file
(so a read-only mount serves, and killed workers leave no stale reader slots).
`DIR/snapshots/active` names the generation the workers serve; they switch between calls when it
changes. With [cluster],
readiness and the active generation live in Redis (service.cluster), and each host's sync process
mirrors the active one into that file, fetching it from `[snapshots] source` when it lacks it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb

SNAPSHOTS_SUBDIR = "snapshots"
DATA_FILE = "data.mdb"
MANIFEST_FILE = "manifest.json"
ACTIVE_FILE = "active"
SNAPSHOT_SCHEMA = 1
KEEP_OLD = 2  # generations kept besides the active one, for rollback
SAMPLE_READS = 64


class SnapshotError(Exception):
    """A snapshot that cannot be made, fetched, checked or activated: one line, no personal data.
    `check` names the fetch check that refused a copy (CHECKS), "" for other failures."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


# The checks a fetched copy must pass: the value of `covergate.snapshot.check` on the metric
# covergate.snapshot.refused, and the key of DIR/snapshots/refused.json's counts.
CHECKS = ("download", "manifest", "signature", "schema", "pepper", "size", "hash", "sample")


@dataclass(frozen=True)
class Manifest:
    generation: int
    sha256: str
    size: int
    beneficiaries: int
    rights_rows: int
    dataset_id: str
    schema_version: int
    pepper_fingerprint: str
    created_at: float
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the signature covers: every field but the signature, canonical JSON."""
        fields = asdict(self)
        fields.pop("signature")
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            raw = json.loads(text)
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(
                "the manifest is not a covergate snapshot manifest", "manifest"
            ) from exc


# -- keys ------------------------------------------------------------------------------------------


def generate_key(path: Path) -> str:
    """A new Ed25519 signing key (PEM, mode 0600) at `path`; returns its public key (base64)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return public_key_of(key)


def public_key_of(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_signing_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SnapshotError(f"{path} is not an Ed25519 private key")
    return key


def verify_signature(manifest: Manifest, public_key: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(manifest.signature, validate=True), manifest.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


# -- create ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generations(root: Path) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(int(e.name) for e in os.scandir(root) if e.is_dir() and e.name.isdigit())
    return []


def create(store: Any, out: Path, signing_key: Any, generation: int | None = None) -> Manifest:
    """Generation N of `store`'s rights in `out/<N>/` (N: one past the highest in `out`)."""
    from service.store import DB_META, DB_RIGHTS, META_DATASET, META_PEPPER, SCHEMA_VERSION

    dataset = store.dataset()
    pepper = store.pepper_fingerprint()
    if dataset is None or pepper is None:
        raise SnapshotError("no rights are loaded in this data dir: import rights first")
    out.mkdir(parents=True, exist_ok=True)
    n = generation if generation is not None else max(generations(out), default=0) + 1
    final = out / str(n)
    if final.exists():
        raise SnapshotError(f"generation {n} already exists in {out}")
    building = Path(tempfile.mkdtemp(prefix=f".{n}.", dir=out))
    try:
        target = lmdb.open(str(building), map_size=store.env.info()["map_size"], max_dbs=2,
                           subdir=True, meminit=True, mode=0o600)  # fmt: skip
        rows = 0
        try:
            with target.begin(write=True) as w, store.env.begin(buffers=True) as r:
                rights = target.open_db(DB_RIGHTS, txn=w)
                meta = target.open_db(DB_META, txn=w)
                source = store.rights_db
                with w.cursor(rights) as put:
                    for key, value in r.cursor(source):
                        put.put(bytes(key), bytes(value), append=True)
                        rows += value[1] | (value[2] << 8) if len(value) >= 3 else 0
                w.put(META_DATASET, json.dumps(dataset).encode(), db=meta)
                w.put(META_PEPPER, pepper.encode(), db=meta)
                w.put(b"schema_version", str(SCHEMA_VERSION).encode(), db=meta)
                beneficiaries = w.stat(rights)["entries"]
            (building / "compact").mkdir()
            target.copy(str(building / "compact"), compact=True)
        finally:
            target.close()
        data = building / DATA_FILE
        os.replace(building / "compact" / DATA_FILE, data)
        shutil.rmtree(building / "compact")
        (building / "lock.mdb").unlink(missing_ok=True)
        manifest = Manifest(
            generation=n, sha256=_sha256(data), size=data.stat().st_size,
            beneficiaries=beneficiaries, rights_rows=rows,
            dataset_id=str(dataset.get("dataset_id", "")), schema_version=SNAPSHOT_SCHEMA,
            pepper_fingerprint=pepper, created_at=time.time(),
        )  # fmt: skip
        signature = base64.b64encode(signing_key.sign(manifest.signed_bytes())).decode()
        manifest = Manifest(**{**asdict(manifest), "signature": signature})
        (building / MANIFEST_FILE).write_text(manifest.to_json())
        os.chmod(building, 0o755)
        os.replace(building, final)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest


# -- fetch and check -------------------------------------------------------------------------------


def _open_source(source: str, name: str) -> Iterator[bytes]:
    """The bytes of `name` under `source` (a directory or an http(s) URL), in blocks."""
    if source.startswith(("http://", "https://")):
        url = source.rstrip("/") + "/" + name
        try:
            response = urllib.request.urlopen(url, timeout=30)
        except OSError as exc:
            raise SnapshotError(
                f"cannot download {name} from the snapshot source: {exc}", "download"
            ) from None
        with response:
            yield from iter(lambda: response.read1(1 << 20), b"")
        return
    path = Path(source) / name
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror}", "download") from None
    with f:
        yield from iter(lambda: f.read(1 << 20), b"")


def latest_at(source: str) -> int:
    """The highest generation a source offers: `latest` (a file naming it), or its directories."""
    with contextlib.suppress(SnapshotError, ValueError):
        return int(b"".join(_open_source(source, "latest")).decode().strip())
    if not source.startswith(("http://", "https://")):
        found = generations(Path(source))
        if found:
            return found[-1]
    raise SnapshotError(f"no generation found at the snapshot source {source}")


def root_of(data_dir: Path) -> Path:
    return Path(data_dir) / SNAPSHOTS_SUBDIR


def fetch(
    source: str, data_dir: Path, public_key: str, pepper_fingerprint: str,
    generation: int | None = None,
) -> Manifest:  # fmt: skip
    """Download generation N (default: the source's latest) into DIR/snapshots/N after checking
    size, hash, signature, schema and pepper; test-open it read-only. A generation already
    installed is checked again and kept. A copy refused by a check is counted in
    DIR/snapshots/refused.json (the host's metric and `snapshot status` read it)."""
    try:
        return _fetch(source, data_dir, public_key, pepper_fingerprint, generation)
    except SnapshotError as exc:
        if exc.check:
            record_refusal(data_dir, generation, exc)
        raise


def _fetch(
    source: str, data_dir: Path, public_key: str, pepper_fingerprint: str, generation: int | None
) -> Manifest:
    n = generation if generation is not None else latest_at(source)
    root = root_of(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = root / str(n)
    if final.exists():
        manifest = check_installed(final, public_key, pepper_fingerprint)
        return manifest
    for stale in root.glob(f".{n}.*"):
        # A fetch killed mid-way left its download here: started again from scratch.
        shutil.rmtree(stale, ignore_errors=True)
    manifest = Manifest.from_json(b"".join(_open_source(source, f"{n}/{MANIFEST_FILE}")))
    if manifest.generation != n:
        raise SnapshotError(f"the manifest of generation {n} says generation {manifest.generation}",
                            "manifest")  # fmt: skip
    _check_manifest(manifest, public_key, pepper_fingerprint)
    incoming = Path(tempfile.mkdtemp(prefix=f".{n}.", dir=root))
    try:
        digest = hashlib.sha256()
        size = 0
        with open(incoming / DATA_FILE, "wb") as out:
            for block in _open_source(source, f"{n}/{DATA_FILE}"):
                size += len(block)
                if size > manifest.size:
                    raise SnapshotError(
                        f"generation {n}: more bytes than its manifest says", "size"
                    )
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if size != manifest.size:
            raise SnapshotError(
                f"generation {n}: {size} bytes downloaded, the manifest says {manifest.size} "
                "(truncated)",
                "size",
            )
        if digest.hexdigest() != manifest.sha256:
            raise SnapshotError(
                f"generation {n}: its hash is not the manifest's (corrupted)", "hash"
            )
        (incoming / MANIFEST_FILE).write_text(manifest.to_json())
        _sample(incoming, manifest)
        _fsync_dir(incoming)
        os.chmod(incoming, 0o755)
        os.replace(incoming, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return manifest


def _check_manifest(manifest: Manifest, public_key: str, pepper_fingerprint: str) -> None:
    n = manifest.generation
    if not verify_signature(manifest, public_key):
        raise SnapshotError(f"generation {n}: its signature does not verify with the public key",
                            "signature")  # fmt: skip
    if manifest.schema_version != SNAPSHOT_SCHEMA:
        raise SnapshotError(f"generation {n}: snapshot schema {manifest.schema_version}, this "
                            f"covergate reads {SNAPSHOT_SCHEMA}", "schema")  # fmt: skip
    if manifest.pepper_fingerprint != pepper_fingerprint:
        raise SnapshotError(f"generation {n}: made with another pepper than this host's", "pepper")


def check_installed(directory: Path, public_key: str, pepper_fingerprint: str) -> Manifest:
    """An installed generation, checked again (manifest, signature, size, hash)."""
    try:
        manifest = Manifest.from_json((directory / MANIFEST_FILE).read_text())
    except OSError as exc:
        raise SnapshotError(f"{directory}: no manifest ({exc.strerror})") from None
    _check_manifest(manifest, public_key, pepper_fingerprint)
    data = directory / DATA_FILE
    if (not data.exists() or data.stat().st_size != manifest.size
            or _sha256(data) != manifest.sha256):  # fmt: skip
        raise SnapshotError(f"generation {manifest.generation}: its data is not its manifest's",
                            "hash")  # fmt: skip
    return manifest


def _sample(directory: Path, manifest: Manifest) -> None:
    """Open read-only with no lock file, and read a sample: the copy serves."""
    from service.store import DB_RIGHTS

    env = open_readonly(directory)
    try:
        db = env.open_db(DB_RIGHTS, create=False)
        with env.begin() as txn:
            entries = txn.stat(db)["entries"]
            if entries != manifest.beneficiaries:
                raise SnapshotError(
                    f"generation {manifest.generation}: {entries} beneficiaries, the manifest "
                    f"says {manifest.beneficiaries}",
                    "sample",
                )
            with txn.cursor(db) as cursor:
                for i, (_key, value) in enumerate(cursor):
                    if i >= SAMPLE_READS:
                        break
                    if not value or value[0] != 1:
                        raise SnapshotError(f"generation {manifest.generation}: unreadable rights",
                                            "sample")  # fmt: skip
    except lmdb.Error as exc:
        raise SnapshotError(
            f"generation {manifest.generation}: not an LMDB store ({exc})", "sample"
        ) from None
    finally:
        env.close()


def open_readonly(directory: Path, map_size: int = 0) -> lmdb.Environment:
    """A generation's environment: read-only, no lock file (immutable, so no reader table: no
    reader-slot exhaustion, no stale slots from killed workers, and a read-only mount works)."""
    return lmdb.open(str(directory), readonly=True, lock=False, max_dbs=2, subdir=True,
                     readahead=False, map_size=map_size or 0)  # fmt: skip


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- activation (one host; with [cluster], service.cluster mirrors Redis into this file) -----------


def active(data_dir: Path) -> int:
    """The generation this host serves (0: its own store, no snapshot)."""
    try:
        return int((root_of(data_dir) / ACTIVE_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def installed(data_dir: Path) -> list[int]:
    root = root_of(data_dir)
    return [n for n in generations(root) if (root / str(n) / MANIFEST_FILE).exists()]


def set_active(data_dir: Path, generation: int) -> None:
    """Switch this host to `generation` (its workers follow between calls); keep the active one
    and KEEP_OLD older ones, delete the rest."""
    root = root_of(data_dir)
    if generation and generation not in installed(data_dir):
        raise SnapshotError(f"generation {generation} is not installed on this host: fetch it")
    tmp = root / f"{ACTIVE_FILE}.tmp"
    tmp.write_text(f"{generation}\n")
    os.replace(tmp, root / ACTIVE_FILE)
    _fsync_dir(root)
    keep = sorted(n for n in installed(data_dir) if n <= generation)[-(KEEP_OLD + 1) :]
    for n in installed(data_dir):
        if n < generation and n not in keep:
            shutil.rmtree(root / str(n), ignore_errors=True)


def previous(data_dir: Path, current: int) -> int:
    older = [n for n in installed(data_dir) if n < current]
    if not older:
        raise SnapshotError(f"no generation older than {current} is kept on this host")
    return older[-1]


# -- several hosts: readiness and the active generation in Redis ----------------------------------
#
# Each host's cluster sync process heartbeats what it has installed and what it serves (HOSTS), and
# mirrors the cluster's active generation (ACTIVE) into DIR/snapshots/active, fetching it from
# `[snapshots] source` first when it lacks it. Until it has it, DIR/snapshots/wanted names it and
# the workers serve nothing older: they answer UNAVAILABLE.

HOSTS_KEY = "cg:snapshots:hosts"
ACTIVE_KEY = "cg:snapshots:active"
HISTORY_KEY = "cg:snapshots:history"
WANTED_FILE = "wanted"
LIVE_SECONDS = 5.0


CHECKED_FILE = "checked"
STARTUP_WAIT_SECONDS = 5.0


def mark_checked(data_dir: Path) -> None:
    """The sync process has read the cluster's active generation (its time: the file's)."""
    root = root_of(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    (root / CHECKED_FILE).touch()


def checked_since(data_dir: Path, since: float) -> bool:
    try:
        return (root_of(data_dir) / CHECKED_FILE).stat().st_mtime >= since
    except OSError:
        return False


def wanted(data_dir: Path) -> int:
    """The generation the cluster activated and this host does not have yet (0: none)."""
    try:
        return int((root_of(data_dir) / WANTED_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def set_wanted(data_dir: Path, generation: int) -> None:
    root = root_of(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if generation:
        tmp = root / f"{WANTED_FILE}.tmp"
        tmp.write_text(f"{generation}\n")
        os.replace(tmp, root / WANTED_FILE)
    else:
        (root / WANTED_FILE).unlink(missing_ok=True)


def host_status(data_dir: Path) -> dict[str, Any]:
    return {"ready": installed(data_dir), "active": active(data_dir),
            "wanted": wanted(data_dir), "seen": time.time(),
            "refused": refusals(data_dir).get("last")}  # fmt: skip


# -- refused copies: counted per check, the last one's reason kept ---------------------------------

REFUSED_FILE = "refused.json"


def refusals(data_dir: Path) -> dict[str, Any]:
    """{"counts": {check: n}, "last": {"generation", "check", "reason", "at"}} ({} if none)."""
    try:
        raw = json.loads((root_of(data_dir) / REFUSED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def record_refusal(data_dir: Path, generation: int | None, exc: SnapshotError) -> None:
    """Count a copy refused by a check (the CLI's fetch and the sync process's both come here,
    under a lock on the file's directory). The reason is the one line the error says: no
    personal data is ever in it."""
    import fcntl

    root = root_of(data_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        counts = dict(refusals(data_dir).get("counts") or {})
        counts[exc.check] = int(counts.get(exc.check, 0)) + 1
        record = {"counts": counts, "last": {"generation": generation, "check": exc.check,
                                             "reason": str(exc), "at": time.time()}}  # fmt: skip
        tmp = root / f"{REFUSED_FILE}.tmp"
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, root / REFUSED_FILE)
    finally:
        os.close(fd)  # releases the lock


def hosts(client: Any) -> dict[str, dict[str, Any]]:
    """Every host's last heartbeat (sync client)."""
    raw = client.hgetall(HOSTS_KEY)
    return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}


def live(statuses: dict[str, dict[str, Any]], now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    return {h: s for h, s in statuses.items() if now - s.get("seen", 0) <= LIVE_SECONDS}


def cluster_active(client: Any) -> int:
    raw = client.get(ACTIVE_KEY)
    return int(raw) if raw else 0


def activate_everywhere(client: Any, generation: int, wait_seconds: float) -> list[str]:
    """Two-phase: wait until every live host reports `generation` ready, then make it the
    active one (every host's sync process switches within a second). Returns the hosts."""
    deadline = time.monotonic() + wait_seconds
    while True:
        statuses = live(hosts(client))
        missing = sorted(h for h, s in statuses.items() if generation not in s.get("ready", ()))
        if statuses and not missing:
            break
        if time.monotonic() >= deadline:
            if not statuses:
                raise SnapshotError("no live host reports to the cluster: is `covergate serve` "
                                    "running with [cluster]?")  # fmt: skip
            raise SnapshotError(f"generation {generation} is not ready on {', '.join(missing)} "
                                f"after {wait_seconds:.0f} s: fetch it there first")  # fmt: skip
        time.sleep(0.2)
    pipe = client.pipeline(transaction=False)
    pipe.set(ACTIVE_KEY, generation)
    pipe.lpush(HISTORY_KEY, generation)
    pipe.ltrim(HISTORY_KEY, 0, 99)
    pipe.execute()
    return sorted(statuses)


def cluster_previous(client: Any, current: int) -> int:
    for raw in client.lrange(HISTORY_KEY, 0, -1):
        n = int(raw)
        if n != current:
            return n
    raise SnapshotError("the cluster has no earlier active generation to go back to")


async def follow_active(
    backend: Any, data_dir: Path, public_key: str, pepper_fingerprint: str, source: str,
    stop: Any,
) -> None:  # fmt: skip
    """The sync process's loop: heartbeat this host's generations, and serve the cluster's."""
    import asyncio
    import logging

    log = logging.getLogger("covergate.snapshots")
    client = backend.client
    failed_at = 0.0
    while not stop.is_set():
        try:
            await backend._call(lambda: client.hset(HOSTS_KEY, backend.host,
                                                    json.dumps(host_status(data_dir))))  # fmt: skip
            raw = await backend._call(lambda: client.get(ACTIVE_KEY))
            target = int(raw) if raw else 0
        except Exception:  # Redis away: keep serving what this host serves
            await asyncio.sleep(0.5)
            continue
        if target and target not in installed(data_dir):
            set_wanted(data_dir, target)
        mark_checked(data_dir)
        if target and target != active(data_dir):
            if target not in installed(data_dir):
                set_wanted(data_dir, target)
                if source and time.monotonic() - failed_at > 5:
                    try:
                        await asyncio.get_running_loop().run_in_executor(
                            None, fetch, source, data_dir, public_key, pepper_fingerprint, target
                        )
                    except SnapshotError as exc:
                        failed_at = time.monotonic()
                        log.error("cannot fetch the active generation %d: %s", target, exc)
            if target in installed(data_dir):
                set_active(data_dir, target)
                set_wanted(data_dir, 0)
                log.info("serving generation %d (activated for the cluster)", target)
        elif target and source and time.monotonic() - failed_at > 5:
            # Ready for a rollback too: the generation the cluster served before this one.
            try:
                history = await backend._call(lambda: client.lrange(HISTORY_KEY, 0, 9))
                before = next((int(n) for n in history if int(n) != target), 0)
                if before and before not in installed(data_dir):
                    await asyncio.get_running_loop().run_in_executor(
                        None, fetch, source, data_dir, public_key, pepper_fingerprint, before
                    )
            except SnapshotError as exc:
                failed_at = time.monotonic()
                log.error("cannot fetch the previous generation for a rollback: %s", exc)
            except Exception:  # Redis away: later
                failed_at = time.monotonic()
        await asyncio.sleep(0.5)

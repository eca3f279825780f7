"""The benchmark dataset: synthetic demo data of a given size imported through the real CLI into a
covergate data dir, cached under bench/.cache/ keyed by size and data-format versions.

The identities the load uses are sampled from the generated rights CSV before it is imported and
kept beside the data dir in the cache, never in it: the data dir holds only what covergate writes.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bench.frames import COVERED, INVALID, KINDS, NO_MATCH, NOT_COVERED, CheckSpec
from fastpath import rules

if TYPE_CHECKING:
    from service.demo import DemoFiles

# Bump when what the cache holds changes shape (sampling, pools, files); the store's own schema
# and record versions are part of the key too, so a format change upstream rebuilds the cache.
CACHE_FORMAT = 2  # 2: eight bench practitioners, each with a token
SAMPLE_IDENTITIES = 20_000
POOL_SIZE = 5_000
IMPORT_SAMPLE_ROWS = 400_000
SEED = 20_240_229
DOMAIN = "PHAR"  # every load request is a pharmacy check by a pharmacist with every agreement
# Pharmacists with every agreement and a token each: the `-p8` scenarios spread their load over
# them (a quota slot each), the others use the first. The demo has fewer such pharmacists, so the
# build adds its own.
PRACTITIONERS = 8

T = TypeVar("T")
_Row = tuple[str, str, str, str, str]  # amc, member, domain, start, end (service.demo.decide)


@dataclass
class Dataset:
    root: Path
    data_dir: Path
    beneficiaries: int
    rights_rows: int
    practitioner_id: str
    practitioner_amcs: tuple[str, ...]
    token: str
    care_date: str
    pools: dict[str, list[CheckSpec]]
    import_sample_csv: Path
    build: dict[str, object] = field(default_factory=dict)
    # Every bench practitioner's token, `token` first: same profession, agreements and quotas.
    tokens: tuple[str, ...] = ()

    def describe(self) -> dict[str, object]:
        """For the results JSON: sizes and provenance, never an identity or a token."""
        return {
            "cache_dir": str(self.root),
            "beneficiaries": self.beneficiaries,
            "rights_rows": self.rights_rows,
            "care_date": self.care_date,
            "domain": DOMAIN,
            "pool_sizes": {k: len(v) for k, v in self.pools.items()},
            "build": self.build,
        }


def working_copy(dataset: Dataset, target: Path) -> Path:
    """A copy of the cached data dir for one run: servers may write to their data dir (quota
    state, suspensions, tokens), and the cache must stay as it was built."""
    shutil.rmtree(target, ignore_errors=True)
    # LMDB's lock file belongs to the processes of the source; each copy gets its own.
    shutil.copytree(dataset.data_dir, target, ignore=shutil.ignore_patterns("lock.mdb"))
    return target


def cache_key(beneficiaries: int) -> str:
    """Size, store schema and rights record versions, and a fingerprint of the stored record
    shapes: a field added to practitioners (say a quota slot) rebuilds the cache even when the
    schema version was not bumped."""
    import dataclasses
    import hashlib

    from service import store

    shapes = [
        f"{cls.__name__}:" + ",".join(f.name for f in dataclasses.fields(cls))
        for cls in (store.PractitionerRecord, store.CredentialRecord)
    ]
    fingerprint = hashlib.blake2b("|".join(shapes).encode(), digest_size=4).hexdigest()
    return (
        f"b{beneficiaries}-store{store.SCHEMA_VERSION}-record{rules.RECORD_VERSION}-"
        f"{fingerprint}-fmt{CACHE_FORMAT}"
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load(root: Path) -> Dataset | None:
    ready = root / "ready.json"
    if not ready.is_file() or not (root / "data" / "store").is_dir():
        return None
    meta = json.loads(ready.read_text())
    pools_raw = json.loads((root / "identities.json").read_text())
    pools = {k: [CheckSpec.from_json(s) for s in v] for k, v in pools_raw.items()}
    return Dataset(
        root=root,
        data_dir=root / "data",
        beneficiaries=meta["beneficiaries"],
        rights_rows=meta["rights_rows"],
        practitioner_id=meta["practitioner_id"],
        practitioner_amcs=tuple(meta["practitioner_amcs"]),
        token=meta["token"],
        care_date=meta["care_date"],
        pools=pools,
        import_sample_csv=root / "import-sample.csv",
        build=meta.get("build", {}),
        tokens=tuple(meta["tokens"]),
    )


def prepare(
    cache_root: Path,
    beneficiaries: int,
    *,
    covergate: str,
    say: Callable[[str], None] = print,
) -> Dataset:
    """The cached dataset of this size, building it first when missing."""
    root = cache_root / cache_key(beneficiaries)
    dataset = load(root)
    if dataset is not None:
        say(f"bench: dataset {root.name} from the cache")
        return dataset
    say(f"bench: building dataset {root.name} (once; cached in {cache_root})")
    building = root.with_name(root.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    _build(building, beneficiaries, covergate, say)
    shutil.rmtree(root, ignore_errors=True)
    building.rename(root)
    dataset = load(root)
    assert dataset is not None
    return dataset


def _cli(covergate: str, data_dir: Path, *args: str) -> str:
    done = subprocess.run(
        [covergate, *args, "--data", str(data_dir)],
        capture_output=True,
        text=True,
        env=dict(os.environ, COVERGATE_LOG_LEVEL="WARNING"),
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"covergate {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _build(root: Path, beneficiaries: int, covergate: str, say: Callable[[str], None]) -> None:
    from service import demo

    today = datetime.date.today()
    care_date = today.strftime("%Y%m%d")
    csv_dir = root / "csv"
    started = time.perf_counter()
    files = demo.generate(csv_dir, beneficiaries=beneficiaries, seed=SEED, today=today)
    generated = time.perf_counter() - started
    say(
        f"bench: generated {files.beneficiaries:,} beneficiaries, "
        f"{files.rights_rows:,} rights rows in {generated:.0f}s"
    )

    started = time.perf_counter()
    pools = sample_pools(files.rights_csv, care_date, random.Random(SEED))
    sampled = time.perf_counter() - started
    _write_private(
        root / "identities.json",
        json.dumps({k: [s.to_json() for s in v] for k, v in pools.items()}),
    )
    _copy_head(files.rights_csv, root / "import-sample.csv", IMPORT_SAMPLE_ROWS)

    data_dir = root / "data"
    bench_ids = _add_bench_pharmacists(files, PRACTITIONERS)
    _cli(covergate, data_dir, "import", "practitioners", str(files.practitioners_csv))
    started = time.perf_counter()
    out = _cli(covergate, data_dir, "import", "rights", str(files.rights_csv), "--no-progress")
    imported = time.perf_counter() - started
    say(f"bench: {out.strip()}")
    rate = re.search(r"\(([\d,]+) rows/s\)", out)

    tokens = [
        _cli(covergate, data_dir, "token", "create", pid).strip().splitlines()[-1]
        for pid in bench_ids
    ]
    practitioner_id, token = bench_ids[0], tokens[0]
    shutil.rmtree(csv_dir)  # identities in clear: only the sample above is kept
    meta = {
        "beneficiaries": files.beneficiaries,
        "rights_rows": files.rights_rows,
        "practitioner_id": practitioner_id,
        "practitioner_amcs": list(demo.AMC_NUMBERS),
        "token": token,
        "tokens": tokens,
        "care_date": care_date,
        "build": {
            "generated_s": round(generated, 1),
            "sampled_s": round(sampled, 1),
            "import_s": round(imported, 1),
            "import_rows_per_s": float(rate.group(1).replace(",", "")) if rate else None,
            "built_at": datetime.datetime.now().isoformat(timespec="seconds"),
        },
    }
    _write_private(root / "ready.json", json.dumps(meta, indent=1))


def _add_bench_pharmacists(files: DemoFiles, count: int) -> list[str]:
    """The ids of `count` active pharmacists with every agreement: the demo's first, then new ones
    appended to its practitioners file (ids that cannot collide with the demo's 10xxxxxxxxx)."""
    from service import demo

    ids = [
        p.practitioner_id
        for p in files.practitioners
        if p.profession == "pharmacist"
        and p.status == "active"
        and set(p.amc_numbers) == set(demo.AMC_NUMBERS)
    ][:count]
    extra = [f"199{i:08d}" for i in range(count - len(ids))]
    with open(files.practitioners_csv, "a", encoding="utf-8", newline="") as f:
        for pid in extra:
            f.write(f"{pid},pharmacist,{';'.join(demo.AMC_NUMBERS)},active\n")
    return ids + extra


def _copy_head(src: Path, dst: Path, rows: int) -> None:
    """The header and the first `rows` rows: a smaller valid rights file for the import rate."""
    with open(src, encoding="utf-8") as fin:
        lines = [next(fin)]
        for i, line in enumerate(fin):
            if i >= rows:
                break
            lines.append(line)
    _write_private(dst, "".join(lines))


# -- sampling --------------------------------------------------------------------------------------


def beneficiaries(path: Path) -> Iterable[tuple[tuple[str, str, str, int], list[_Row]]]:
    """(nir, nir_key, birth_date, rank) and that beneficiary's rows, from a rights CSV whose rows
    come grouped by beneficiary (as `covergate demo` writes them)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        current: tuple[str, str, str, int] | None = None
        rows: list[_Row] = []
        for nir, key, birth, rank, amc, member, domain, _rate, _conv, start, end in reader:
            ident = (nir, key, birth, int(rank))
            if ident != current:
                if current is not None:
                    yield current, rows
                current, rows = ident, []
            rows.append((amc, member, domain, start, end))
        if current is not None:
            yield current, rows


def reservoir(items: Iterable[T], k: int, rng: random.Random) -> list[T]:
    """A uniform sample of k items from a stream of unknown length (Algorithm R)."""
    sample: list[T] = []
    for i, item in enumerate(items):
        if i < k:
            sample.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = item
    return sample


def classify(
    ident: tuple[str, str, str, int], rows: list[_Row], care_date: str
) -> tuple[str, CheckSpec] | None:
    """A pharmacy check for this beneficiary at one of its insurers, and its kind: COVERED when a
    contract covers PHAR on the care date, else NOT_COVERED when one matches without it."""
    from service import demo

    nir, key, birth, rank = ident
    found: dict[str, CheckSpec] = {}
    for amc, member in dict.fromkeys((r[0], r[1]) for r in rows):
        decision = demo.decide(rows, amc, member, DOMAIN, care_date)
        kind = COVERED if decision == demo.COVERED else NOT_COVERED
        if kind not in found and decision != demo.NO_MATCH:
            found[kind] = CheckSpec(
                kind, nir, key, birth, rank, amc, member, rules.DOMAIN_CODES[DOMAIN], care_date
            )
    for kind in (COVERED, NOT_COVERED):
        if kind in found:
            return kind, found[kind]
    return None


def no_match(spec: CheckSpec) -> CheckSpec:
    """The same card with a birth rank nobody in the data has: matches no beneficiary."""
    return CheckSpec(
        NO_MATCH,
        spec.nir,
        spec.nir_key,
        spec.birth_date,
        9,
        spec.amc_number,
        spec.member_number,
        spec.domain,
        spec.care_date,
    )


def invalid(spec: CheckSpec) -> CheckSpec:
    """The same card with a mistyped NIR key: well-formed, refused as INVALID_ARGUMENT."""
    wrong = int(spec.nir_key) % 97 + 1
    return CheckSpec(
        INVALID,
        spec.nir,
        f"{wrong:02d}",
        spec.birth_date,
        spec.birth_rank,
        spec.amc_number,
        spec.member_number,
        spec.domain,
        spec.care_date,
    )


def sample_pools(
    rights_csv: Path, care_date: str, rng: random.Random, size: int = SAMPLE_IDENTITIES
) -> dict[str, list[CheckSpec]]:
    sample = reservoir(beneficiaries(rights_csv), size, rng)
    pools: dict[str, list[CheckSpec]] = {k: [] for k in KINDS}
    for ident, rows in sample:
        classified = classify(ident, rows, care_date)
        if classified is None:
            continue
        kind, spec = classified
        if len(pools[kind]) < POOL_SIZE:
            pools[kind].append(spec)
    pools[NO_MATCH] = [no_match(s) for s in pools[COVERED][:POOL_SIZE]]
    pools[INVALID] = [invalid(s) for s in pools[COVERED][:POOL_SIZE]]
    rng.shuffle(pools[NO_MATCH])
    rng.shuffle(pools[INVALID])
    return pools

"""Shared fixtures: both fast-path gate implementations, and a small real LMDB rights store
filled with synthetic beneficiaries (no real person's data anywhere in the test suite).

`gate_module` runs a test once per implementation (the multidict/propcache pattern);
`rights_env` / `known_identities` / `unknown_identity` describe the store those gates read.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import lmdb
import pytest

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.rules import Keys, Practitioner, RightRow

# One clock for every fast-path test: 15 June 2025, Europe/Paris.
TODAY = 20250615
NOW = 1_749_974_400

# Test-only pepper: 32 bytes, obviously not a production secret.
TEST_PEPPER = b"covergate-tests-pepper-not-real!"

RIGHTS_DB = b"rights"

PHAR, MEDE, HOSP, DENT, OPTI = 1, 2, 3, 4, 5


# -- implementations -------------------------------------------------------------------------------

GATE_IMPLEMENTATIONS = ("cython", "python")


def _import_gate(implementation: str) -> ModuleType:
    name = "fastpath._gate_c" if implementation == "cython" else "fastpath._gate_py"
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # extension not built: tests of the reference still run
        pytest.skip(f"{name} is not available ({exc})")


@pytest.fixture(scope="session", params=GATE_IMPLEMENTATIONS)
def gate_module(request: pytest.FixtureRequest) -> ModuleType:
    """fastpath._gate_c or fastpath._gate_py: every test using it runs on both."""
    return _import_gate(request.param)


@pytest.fixture(scope="session")
def cython_gate_module() -> ModuleType:
    return _import_gate("cython")


@pytest.fixture(scope="session")
def python_gate_module() -> ModuleType:
    return _import_gate("python")


# -- synthetic beneficiaries -----------------------------------------------------------------------


@dataclass(frozen=True)
class Right:
    """One right row of a synthetic beneficiary (rules.RightRow before keying)."""

    amc_number: str
    domain: int
    rate_percent: int
    start: int
    end: int
    convention_type: str
    with_member_number: bool = False


@dataclass(frozen=True)
class KnownIdentity:
    """A synthetic beneficiary stored in `rights_env`, as its tiers-payant card shows it.

    `request()` builds the request a practitioner would send for it; `expected` is the decision
    for that default request (domain `domain`, AMC `amc_number`, care date today).
    """

    label: str
    nir: str
    birth_date: str
    birth_rank: int
    amc_number: str
    domain: int
    expected: int
    member_number: str = ""
    rights: tuple[Right, ...] = field(default=(), repr=False)

    @property
    def nir_key(self) -> str:
        return f"{rules.nir_key_for(rules.normalise_nir(self.nir)):02d}"

    @property
    def identity(self) -> bytes:
        return rules.identity_bytes(rules.normalise_nir(self.nir), self.birth_date, self.birth_rank)

    def request(self, **overrides: Any) -> pb.CheckCoverageRequest:
        fields: dict[str, Any] = {
            "request_id": f"req-{self.label}",
            "nir": self.nir,
            "nir_key": self.nir_key,
            "birth_date": self.birth_date,
            "birth_rank": self.birth_rank,
            "amc_number": self.amc_number,
            "member_number": self.member_number,
            "domain": self.domain,
        }
        fields.update(overrides)
        return pb.CheckCoverageRequest(**fields)


COVERED = rules.DECISION_COVERED
NOT_COVERED = rules.DECISION_NOT_COVERED
NO_MATCH = rules.DECISION_NO_MATCH

_AMC_A, _AMC_B, _AMC_C = "123456789", "987654321", "1122"

KNOWN_IDENTITIES: tuple[KnownIdentity, ...] = (
    # Several AMCs and domains; one right expired, one not yet open.
    KnownIdentity(
        "several-amcs",
        "2850775123456",
        "19850701",
        1,
        _AMC_A,
        PHAR,
        COVERED,
        rights=(
            Right(_AMC_A, PHAR, 100, 20240101, 20261231, "TP01"),
            Right(_AMC_A, MEDE, 70, 20240101, 20241231, "TP02"),
            Right(_AMC_A, OPTI, 60, 20260101, 20271231, "OPT1"),
            Right(_AMC_B, DENT, 60, 20250101, 20251231, "DN9"),
        ),
    ),
    # Twins on one parent's NIR and birth date, told apart by birth rank only.
    KnownIdentity(
        "twin-1",
        "1900131055012",
        "20200312",
        1,
        _AMC_C,
        PHAR,
        COVERED,
        rights=(Right(_AMC_C, PHAR, 100, 20200312, 20301231, "TW1"),),
    ),
    KnownIdentity(
        "twin-2",
        "1900131055012",
        "20200312",
        2,
        _AMC_C,
        PHAR,
        NOT_COVERED,
        rights=(Right(_AMC_C, MEDE, 100, 20200312, 20301231, "TW2"),),
    ),
    # Corsica: department 2A / 2B, key computed on 19 / 18; the 2a request is lower case.
    KnownIdentity(
        "corsica-2a",
        "178022a004017",
        "19780215",
        1,
        _AMC_B,
        HOSP,
        COVERED,
        rights=(Right(_AMC_B, HOSP, 80, 20250101, 20250630, "HSP2"),),
    ),
    KnownIdentity(
        "corsica-2b",
        "266092B123045",
        "19660930",
        1,
        _AMC_A,
        MEDE,
        COVERED,
        rights=(Right(_AMC_A, MEDE, 100, 20230101, 20291231, "MD2B"),),
    ),
    # Lunar birth dates: unknown month and day, unknown month only.
    KnownIdentity(
        "lunar-0000",
        "1850099350123",
        "19850000",
        1,
        _AMC_A,
        PHAR,
        COVERED,
        rights=(Right(_AMC_A, PHAR, 65, 20250615, 20250615, "LUN"),),
    ),
    KnownIdentity(
        "lunar-0015",
        "2850099350124",
        "19850015",
        3,
        _AMC_A,
        DENT,
        COVERED,
        rights=(Right(_AMC_A, DENT, 100, 20240101, 20291231, "LUN2"),),
    ),
    # Rights bound to a member number (its keyed hash is in the record), beside one that is not.
    KnownIdentity(
        "member",
        "1720869001002",
        "19720814",
        1,
        _AMC_B,
        OPTI,
        COVERED,
        member_number="A0001234",
        rights=(
            Right(_AMC_B, OPTI, 100, 20250101, 20251231, "OP1", with_member_number=True),
            Right(_AMC_A, PHAR, 100, 20250101, 20251231, "PH1"),
        ),
    ),
    # Only expired rights / only future rights.
    KnownIdentity(
        "expired",
        "1450375001001",
        "19450312",
        1,
        _AMC_A,
        PHAR,
        NOT_COVERED,
        rights=(Right(_AMC_A, PHAR, 100, 20200101, 20250614, "OLD"),),
    ),
    KnownIdentity(
        "future",
        "2990675002002",
        "19990601",
        1,
        _AMC_A,
        PHAR,
        NOT_COVERED,
        rights=(Right(_AMC_A, PHAR, 100, 20250616, 20260101, "NEW"),),
    ),
    # Several open rights for one domain: the longest running wins, the first one on a tie;
    # a rate of 0 and a long convention still travel as the reference encodes them.
    KnownIdentity(
        "longest-wins",
        "1600113005001",
        "19600115",
        1,
        _AMC_A,
        PHAR,
        COVERED,
        rights=(
            Right(_AMC_A, PHAR, 60, 20250101, 20251231, "TPA"),
            Right(_AMC_A, PHAR, 100, 20240101, 20271231, "TPB"),
            Right(_AMC_A, PHAR, 80, 20240101, 20271231, "TPC"),
            Right(_AMC_A, HOSP, 0, 20240101, 20271231, "CONVENTION000016"),
        ),
    ),
)

# Valid, correctly keyed, and in no record.
UNKNOWN_IDENTITY = KnownIdentity("unknown", "1770599123777", "19770523", 1, _AMC_A, PHAR, NO_MATCH)

# The caller of decision-only tests: no agreement list (no scope check) and no quota.
TEST_PRACTITIONER = Practitioner(practitioner_id="10001234567", profession="pharmacist")


def rights_records(keys: Keys, identities: tuple[KnownIdentity, ...]) -> dict[bytes, bytes]:
    """LMDB key -> value for `identities`, as the importer writes them."""
    records: dict[bytes, bytes] = {}
    for who in identities:
        storage_key = keys.storage_key(who.identity)
        rows = [
            RightRow(
                domain=r.domain,
                rate_percent=r.rate_percent,
                start=r.start,
                end=r.end,
                amc_number=r.amc_number,
                convention_type=r.convention_type,
                member_hash=(
                    keys.member_hash(storage_key, who.member_number)
                    if r.with_member_number
                    else None
                ),
            )
            for r in who.rights
        ]
        records[storage_key] = rules.encode_record(rows)
    return records


@dataclass
class RightsStore:
    """A real LMDB environment with a named "rights" database."""

    path: Path
    env: Any
    db: Any
    keys: Keys

    def put(self, key: bytes, value: bytes) -> None:
        with self.env.begin(db=self.db, write=True) as txn:
            txn.put(key, value)

    def delete(self, key: bytes) -> None:
        with self.env.begin(db=self.db, write=True) as txn:
            txn.delete(key)


def open_rights_store(path: Path, keys: Keys, records: dict[bytes, bytes]) -> RightsStore:
    env = lmdb.open(str(path), map_size=16 << 20, max_dbs=4, subdir=True)
    db = env.open_db(RIGHTS_DB)
    store = RightsStore(path, env, db, keys)
    with env.begin(db=db, write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)
    return store


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_keys() -> Keys:
    return Keys(TEST_PEPPER)


@pytest.fixture(scope="session")
def known_identities() -> dict[str, KnownIdentity]:
    """The synthetic beneficiaries stored in `rights_env`, by label."""
    return {who.label: who for who in KNOWN_IDENTITIES}


@pytest.fixture(scope="session")
def unknown_identity() -> KnownIdentity:
    """A valid, correctly keyed identity that is in no record (its requests are NO_MATCH)."""
    return UNKNOWN_IDENTITY


@pytest.fixture(scope="session")
def practitioner() -> Practitioner:
    return TEST_PRACTITIONER


@pytest.fixture(scope="session")
def today() -> int:
    return TODAY


@pytest.fixture(scope="session")
def now() -> int:
    return NOW


@pytest.fixture(scope="session")
def rights_env(tmp_path_factory: pytest.TempPathFactory, test_keys: Keys) -> Iterator[RightsStore]:
    """A read-only LMDB store holding `known_identities` (shared by the whole session)."""
    store = open_rights_store(
        tmp_path_factory.mktemp("rights"), test_keys, rights_records(test_keys, KNOWN_IDENTITIES)
    )
    yield store
    store.env.close()


@pytest.fixture(scope="session")
def scratch_rights_env(
    tmp_path_factory: pytest.TempPathFactory, test_keys: Keys
) -> Iterator[RightsStore]:
    """A writable store, same content as `rights_env`, for tests that plant their own records.
    Session-scoped so property tests can use it: restore what you change."""
    store = open_rights_store(
        tmp_path_factory.mktemp("scratch-rights"),
        test_keys,
        rights_records(test_keys, KNOWN_IDENTITIES),
    )
    yield store
    store.env.close()


@pytest.fixture
def gate(gate_module: ModuleType, rights_env: RightsStore) -> Any:
    """A fresh gate (store_reads == 0) of each implementation over `rights_env`."""
    return gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys)

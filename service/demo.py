"""Synthetic demo data for `covergate demo`: a rights file, a practitioners file, example checks.

Every person, insurer and practitioner is invented, and the output is deterministic for a seed.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fastpath import rules
from service.config import PROFESSIONS

RIGHTS_HEADER = (
    "nir,nir_key,birth_date,birth_rank,amc_number,member_number,domain,rate_percent,"
    "convention_type,start_date,end_date"
)
PRACTITIONERS_HEADER = "practitioner_id,profession,amc_numbers,status"

COVERED = "COVERED"
NOT_COVERED = "NOT_COVERED"
NO_MATCH = "NO_MATCH"

# Invented insurers (AMC numbers) with their market share in percent and the shape of the member
# numbers they print on cards (prefix, digits). Member numbers are unique within an insurer.
AMC_NUMBERS: tuple[str, ...] = (
    "310457218",
    "440198362",
    "690712054",
    "750863491",
    "130526987",
    "330941275",
    "590274836",
)
_AMC_SHARES = (24, 19, 16, 14, 11, 9, 7)

# The person of the README's examples (`covergate check`, the Python client): in every demo, with
# rights open at the first insurer until 2099, so those examples work on any day.
README_IDENTITY = ("1850775123456", "08", "19850701")
README_MEMBER = "R0001234"
_MEMBER_FORMATS = (("A", 7), ("M", 8), ("", 10), ("AD", 6), ("X", 9), ("", 8), ("CF", 7))

# What a contract opens: care domain -> rate the insurer pays, and the profile's share in percent.
# Most contracts cover few domains, which keeps a million beneficiaries at about four rows each.
_ALL_DOMAINS = tuple(rules.DOMAIN_CODES)
_PROFILES: tuple[tuple[dict[str, int], int], ...] = (
    ({d: 100 for d in _ALL_DOMAINS}, 8),  # comprehensive
    (
        {
            "PHAR": 100,
            "MEDE": 100,
            "HOSP": 100,
            "DENT": 80,
            "OPTI": 60,
            "LABO": 100,
            "AUXM": 100,
            "RADI": 100,
        },
        12,
    ),  # standard
    ({"PHAR": 100, "MEDE": 70, "HOSP": 100}, 25),  # essential
    ({"PHAR": 100, "MEDE": 30}, 45),  # pharmacy and consultations
    ({"HOSP": 100, "TRAN": 65}, 10),  # hospital supplement
)
_COMPREHENSIVE, _STANDARD, _ESSENTIAL, _PHARMACY, _HOSPITAL = range(len(_PROFILES))

# Rights periods relative to `today`.
_OPEN, _EXPIRED, _FUTURE = 0, 1, 2

# Where people were born, as the NIR's department + commune (5 characters), in percent.
_SHARE_CORSICA = 2.5
_SHARE_OVERSEAS = 3.0
_SHARE_ABROAD = 4.0
# INSEE codes of countries of birth (department 99), for people born abroad.
_COUNTRIES = ("350", "352", "351", "139", "134", "127", "208", "341", "335", "326", "243", "397")
_OVERSEAS = ("1", "2", "3", "4", "6")  # 971 Guadeloupe ... 976 Mayotte: 97 + third digit

_SHARE_LUNAR = 0.015
_SHARE_TWINS = 0.004
_SHARE_TWO_AMCS = 0.10
_SHARE_NO_MEMBER = 0.12
_SHARE_LAPSED_DOMAIN = 0.05
_PRACTITIONERS_PER_PROFESSION = {"pharmacist": 8, "physician": 8}
_DEFAULT_PRACTITIONERS = 4

_FLUSH_LINES = 65_536


@dataclass(frozen=True)
class ExampleIdentity:
    """A check to try against the demo data, with the decision it yields."""

    label: str
    nir: str
    nir_key: str
    birth_date: str
    birth_rank: int
    amc_number: str
    member_number: str
    domain: str  # CSV code, e.g. PHAR
    care_date: str  # YYYYMMDD, or "" for today
    expected: str  # COVERED, NOT_COVERED or NO_MATCH


@dataclass(frozen=True)
class DemoPractitioner:
    practitioner_id: str
    profession: str
    amc_numbers: tuple[str, ...]
    status: str


@dataclass(frozen=True)
class DemoFiles:
    rights_csv: Path
    practitioners_csv: Path
    beneficiaries: int
    rights_rows: int
    practitioners: tuple[DemoPractitioner, ...]
    examples: tuple[ExampleIdentity, ...]


def generate(
    out_dir: Path,
    *,
    beneficiaries: int = 100_000,
    seed: int = 2024,
    today: datetime.date | None = None,
) -> DemoFiles:
    """Write `out_dir/rights.csv` and `out_dir/practitioners.csv`; return what they hold.

    The examples are planted first and every other beneficiary is drawn at random, so each example
    exists whatever the size; their expected decisions are computed from the rows written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = _Generator(seed, today or datetime.date.today())
    rights_csv = out_dir / "rights.csv"
    with open(rights_csv, "w", encoding="utf-8", newline="") as f:
        examples = generator.write_rights(f, beneficiaries)
    practitioners = generator.practitioners()
    practitioners_csv = out_dir / "practitioners.csv"
    with open(practitioners_csv, "w", encoding="utf-8", newline="") as f:
        f.write(PRACTITIONERS_HEADER + "\n")
        for p in practitioners:
            f.write(f"{p.practitioner_id},{p.profession},{';'.join(p.amc_numbers)},{p.status}\n")
    return DemoFiles(
        rights_csv=rights_csv,
        practitioners_csv=practitioners_csv,
        beneficiaries=generator.beneficiaries,
        rights_rows=generator.rights_rows,
        practitioners=practitioners,
        examples=examples,
    )


def decide(
    rows: Iterable[tuple[str, str, str, str, str]],
    amc_number: str,
    member_number: str,
    domain: str,
    care_date: str,
) -> str:
    """The decision the gate makes on one identity's rows (amc, member, domain, start, end)."""
    matched = [
        r for r in rows if r[0] == amc_number and (not member_number or r[1] == member_number)
    ]
    if not matched:
        return NO_MATCH
    if any(d == domain and start <= care_date <= end for _, _, d, start, end in matched):
        return COVERED
    return NOT_COVERED


# -- generation ----------------------------------------------------------------------------------

# A contract's terms: (insurer index, profile, period status, period index, one domain lapsed).
_Terms = tuple[int, int, int, int, bool]
# Its rows without the identity: (domain, rate, convention, start, end), and the same as CSV text.
_Tails = tuple[tuple[tuple[str, str, str, str, str], ...], tuple[str, ...]]
_Contract = tuple[int, str, _Tails]  # insurer index, member number, rows


@dataclass(frozen=True)
class _Planted:
    """A beneficiary written for the examples."""

    identity: tuple[str, str, str]  # nir, nir_key, birth_date
    rank: int
    amc_numbers: list[str]
    member_numbers: list[str]


def _month(year: int, month: int) -> tuple[int, int]:
    """(year, month) normalised, month counted from 1 and allowed out of 1..12."""
    year += (month - 1) // 12
    return year, (month - 1) % 12 + 1


def _first_day(year: int, month: int) -> str:
    year, month = _month(year, month)
    return f"{year:04d}{month:02d}01"


def _last_day(year: int, month: int) -> str:
    year, month = _month(year, month)
    return f"{year:04d}{month:02d}{rules.days_in_month(year, month):02d}"


class _Generator:
    def __init__(self, seed: int, today: datetime.date) -> None:
        self.today = today
        self.rng = random.Random(seed)
        self.beneficiaries = 0
        self.rights_rows = 0
        self._nirs: set[str] = set()
        self._contracts = [0] * len(AMC_NUMBERS)
        self._member_offset = self.rng.randrange(10**6)
        self._tails: dict[_Terms, _Tails] = {}
        self._planted: dict[tuple[str, str, int], list[tuple[str, str, str, str, str]]] = {}
        self._lines: list[str] = []
        self._amc_pool = [i for i, share in enumerate(_AMC_SHARES) for _ in range(share)]
        self._profile_pool = [i for i, (_, share) in enumerate(_PROFILES) for _ in range(share)]
        self._periods = self._period_pools()
        self._places = self._place_pool()
        self._abroad = [f"99{c}" for c in _COUNTRIES]

    # -- pools drawn once, so the per-beneficiary work is a few indexings ------------------------

    def _period_pools(self) -> tuple[list[tuple[str, str]], ...]:
        """(start, end) pairs: open on today, ended before this month, starting after it."""
        rng, y, m = self.rng, self.today.year, self.today.month
        opened: list[tuple[str, str]] = []
        for _ in range(32):
            # Margins of a month either side keep the examples' decisions true for a while.
            if rng.random() < 0.5:
                start = f"{y - rng.randrange(2)}0101"
                start = min(start, _first_day(y, m - 1))
            else:
                start = _first_day(y, m - rng.randint(1, 30))
            end = _last_day(y, 12) if rng.random() < 0.5 else _last_day(y, m + rng.randint(1, 30))
            end = max(end, _last_day(y, m + 1))
            opened.append((start, end))
        expired = []
        for _ in range(16):
            end_month = m - rng.randint(1, 24)
            length = rng.choice((12, 24))
            expired.append((_first_day(y, end_month - length + 1), _last_day(y, end_month)))
        future = []
        for _ in range(8):
            start_month = m + rng.randint(1, 6)
            future.append((_first_day(y, start_month), _last_day(y, start_month + 11)))
        return opened, expired, future

    def _place_pool(self) -> list[str]:
        """Department + commune of birth: mostly mainland, some Corsica, overseas and abroad."""
        rng = self.rng
        size = 20_000
        places = []
        mainland = [f"{d:02d}" for d in range(1, 96) if d != 20]
        for _ in range(int(size * _SHARE_CORSICA / 100)):
            places.append(rng.choice(("2A", "2B")) + f"{rng.randint(1, 366):03d}")
        for _ in range(int(size * _SHARE_OVERSEAS / 100)):
            places.append("97" + rng.choice(_OVERSEAS) + f"{rng.randint(1, 34):02d}")
        for _ in range(int(size * _SHARE_ABROAD / 100)):
            places.append("99" + rng.choice(_COUNTRIES))
        while len(places) < size:
            places.append(rng.choice(mainland) + f"{rng.randint(1, 899):03d}")
        rng.shuffle(places)
        return places

    def _contract_tails(
        self, amc: int, profile: int, status: int, period: int, lapsed: bool = False
    ) -> _Tails:
        """The rows of one contract, shared by every contract with the same terms."""
        key = (amc, profile, status, period, lapsed)
        tails = self._tails.get(key)
        if tails is None:
            periods = self._periods[status]
            start, end = periods[period % len(periods)]
            domains = _PROFILES[profile][0]
            rows = []
            for i, (domain, rate) in enumerate(domains.items()):
                s, e = start, end
                if lapsed and i == len(domains) - 1 and i > 0:
                    # One domain not renewed (e.g. optical) while the rest of the contract runs on.
                    expired = self._periods[_EXPIRED]
                    s, e = expired[period % len(expired)]
                if domain == "HOSP":
                    convention = f"HO{amc + 1:02d}"
                elif domain in ("DENT", "OPTI", "AUDI"):
                    convention = f"RS{amc + 1:02d}"  # the insurer's care network
                else:
                    convention = f"TP{amc + 1:02d}"
                rows.append((domain, str(rate), convention, s, e))
            tails = (tuple(rows), tuple(",".join(r) + "\n" for r in rows))
            self._tails[key] = tails
        return tails

    # -- one beneficiary ------------------------------------------------------------------------

    def _identity(self, place: str | None = None, lunar: str = "") -> tuple[str, str, str]:
        """A new (nir, nir_key, birth_date) whose NIR carries the sex, birth year and month.

        `lunar` is "", "day" (day unknown), "month" (month unknown) or "both"; an unknown month is
        printed 00 in the birth date and 99 in the NIR.
        """
        rnd = self.rng.random
        today = self.today
        while True:
            age = int(rnd() * 96)
            year = today.year - age
            month = 1 + int(rnd() * (12 if age else today.month))
            last = rules.days_in_month(year, month)
            if not age and month == today.month:
                last = today.day
            day = 1 + int(rnd() * last)
            if lunar in ("month", "both"):
                month = 0
            if lunar in ("day", "both"):
                day = 0
            where = place or (
                self._abroad[int(rnd() * len(self._abroad))]
                if lunar and rnd() < 0.8
                else self._places[int(rnd() * len(self._places))]
            )
            nir = (
                f"{1 + int(rnd() * 2)}{year % 100:02d}{month or 99:02d}{where}"
                f"{1 + int(rnd() * 999):03d}"
            )
            if nir not in self._nirs:
                break
        self._nirs.add(nir)
        return nir, f"{rules.nir_key_for(nir):02d}", f"{year:04d}{month:02d}{day:02d}"

    def _member_number(self, amc: int) -> str:
        prefix, digits = _MEMBER_FORMATS[amc]
        self._contracts[amc] += 1
        # An affine map modulo 10**digits is a bijection: unique yet not sequential.
        n = (self._contracts[amc] * 7_919 + self._member_offset) % 10**digits
        return f"{prefix}{n:0{digits}d}"

    def _emit(
        self,
        identity: tuple[str, str, str],
        rank: int,
        contracts: list[_Contract],
        keep: bool = False,
    ) -> None:
        nir, key, birth = identity
        lines = self._lines
        for amc, member, (rows, csv_tails) in contracts:
            head = f"{nir},{key},{birth},{rank},{AMC_NUMBERS[amc]},{member},"
            lines.extend([head + t for t in csv_tails])
            if keep:
                self._planted.setdefault((nir, birth, rank), []).extend(
                    (AMC_NUMBERS[amc], member, d, s, e) for d, _, _, s, e in rows
                )
        self.beneficiaries += 1

    def _random_contracts(self) -> list[_Contract]:
        rnd = self.rng.random
        amc = self._amc_pool[int(rnd() * len(self._amc_pool))]
        profile = self._profile_pool[int(rnd() * len(self._profile_pool))]
        u = rnd()
        status = _OPEN if u < 0.86 else _EXPIRED if u < 0.93 else _FUTURE
        period = int(rnd() * 32)
        lapsed = status == _OPEN and rnd() < _SHARE_LAPSED_DOMAIN
        member = "" if rnd() < _SHARE_NO_MEMBER else self._member_number(amc)
        contracts = [(amc, member, self._contract_tails(amc, profile, status, period, lapsed))]
        u = rnd()
        if u < _SHARE_TWO_AMCS:
            other = (amc + 1 + int(rnd() * (len(AMC_NUMBERS) - 1))) % len(AMC_NUMBERS)
            if u < _SHARE_TWO_AMCS / 2:
                # Changed insurer: the former contract ended, the new one runs.
                contracts[0] = (amc, member, self._contract_tails(amc, profile, _EXPIRED, period))
                second = self._contract_tails(other, profile, _OPEN, period)
            else:
                # A hospital supplement at a second insurer, beside the main contract.
                second = self._contract_tails(other, _HOSPITAL, _OPEN, period)
            contracts.append((other, self._member_number(other), second))
        return contracts

    def _flush(self, f: TextIO) -> None:
        f.write("".join(self._lines))
        self.rights_rows += len(self._lines)
        self._lines.clear()

    # -- the rights file ------------------------------------------------------------------------

    def write_rights(self, f: TextIO, beneficiaries: int) -> tuple[ExampleIdentity, ...]:
        f.write(RIGHTS_HEADER + "\n")
        examples = self._plant_examples()
        rnd = self.rng.random
        while self.beneficiaries < beneficiaries:
            lunar = ""
            if rnd() < _SHARE_LUNAR:
                lunar = ("day", "both", "both", "month")[int(rnd() * 4)]
            identity = self._identity(lunar=lunar)
            contracts = self._random_contracts()
            self._emit(identity, 1, contracts)
            if rnd() < _SHARE_TWINS and self.beneficiaries < beneficiaries:
                # Twins: one NIR and birth date, told apart by rank, on the same contract with
                # their own rights (a profile and period drawn again).
                amc, member, _ = contracts[0]
                profile = self._profile_pool[int(rnd() * len(self._profile_pool))]
                self._emit(
                    identity,
                    2,
                    [(amc, member, self._contract_tails(amc, profile, _OPEN, int(rnd() * 32)))],
                )
            if len(self._lines) >= _FLUSH_LINES:
                self._flush(f)
        self._flush(f)
        return examples

    def _plant_examples(self) -> tuple[ExampleIdentity, ...]:
        """Beneficiaries made for the examples, written first so that every size has them."""
        care_date = self.today.strftime("%Y%m%d")
        examples: list[ExampleIdentity] = []

        def plant(
            *terms: _Terms,
            identity: tuple[str, str, str] | None = None,
            rank: int = 1,
            place: str | None = None,
            lunar: str = "",
            members: Iterable[str] | None = None,
        ) -> _Planted:
            identity = identity or self._identity(place, lunar)
            member_numbers = (
                list(members) if members is not None else [self._member_number(t[0]) for t in terms]
            )
            contracts = [
                (t[0], member, self._contract_tails(*t))
                for t, member in zip(terms, member_numbers, strict=True)
            ]
            self._emit(identity, rank, contracts, keep=True)
            return _Planted(identity, rank, [AMC_NUMBERS[t[0]] for t in terms], member_numbers)

        def example(
            label: str, who: _Planted, domain: str, *, contract: int = 0, member: str = ""
        ) -> None:
            nir, key, birth = who.identity
            amc = who.amc_numbers[contract]
            expected = decide(self._planted[(nir, birth, who.rank)], amc, member, domain, care_date)
            examples.append(
                ExampleIdentity(
                    label, nir, key, birth, who.rank, amc, member, domain, care_date, expected
                )
            )

        covered = plant((0, _ESSENTIAL, _OPEN, 0, False))
        example("covered pharmacy", covered, "PHAR")
        member = covered.member_numbers[0]
        example("member number required", covered, "MEDE", member=member)
        wrong = member[:-1] + str((int(member[-1]) + 1) % 10)
        example("wrong member number", covered, "PHAR", member=wrong)
        example("domain not in contract", covered, "OPTI")

        # Twins on one family contract, only the second with optical cover.
        twin = plant((1, _PHARMACY, _OPEN, 1, False))
        twin2 = plant(
            (1, _STANDARD, _OPEN, 2, False),
            identity=twin.identity,
            rank=2,
            members=twin.member_numbers,
        )
        example("twin rank 1", twin, "OPTI")
        example("twin rank 2", twin2, "OPTI")
        triplet = plant((2, _ESSENTIAL, _OPEN, 3, False))
        plant((2, _PHARMACY, _OPEN, 4, False), identity=triplet.identity, rank=2)
        triplet3 = plant((2, _ESSENTIAL, _OPEN, 5, False), identity=triplet.identity, rank=3)
        example("triplet rank 3", triplet3, "PHAR")

        example("Corsican 2A", plant((3, _STANDARD, _OPEN, 6, False), place="2A004"), "MEDE")
        example("Corsican 2B", plant((0, _ESSENTIAL, _OPEN, 7, False), place="2B033"), "PHAR")
        lunar = plant((4, _ESSENTIAL, _OPEN, 8, False), lunar="both")
        example("lunar birth date", lunar, "PHAR")
        example("lunar birth day", plant((5, _PHARMACY, _OPEN, 9, False), lunar="day"), "PHAR")
        example("expired rights", plant((1, _ESSENTIAL, _EXPIRED, 10, False)), "PHAR")
        example("future rights", plant((2, _STANDARD, _FUTURE, 11, False)), "PHAR")
        example("lapsed domain", plant((3, _STANDARD, _OPEN, 12, True)), "RADI")
        no_member = plant((6, _PHARMACY, _OPEN, 13, False), members=[""])
        example("no member number", no_member, "PHAR")
        two = plant((0, _ESSENTIAL, _OPEN, 14, False), (4, _HOSPITAL, _OPEN, 14, False))
        example("second insurer", two, "HOSP", contract=1)
        moved = plant((1, _PHARMACY, _EXPIRED, 15, False), (5, _PHARMACY, _OPEN, 15, False))
        example("former insurer", moved, "PHAR", contract=0)
        example("new insurer", moved, "PHAR", contract=1)
        everything = plant((6, _COMPREHENSIVE, _OPEN, 16, False))
        example("comprehensive audiology", everything, "AUDI")

        # The README's example person, the same every day, so the README's commands run as written.
        nir, key, birth = README_IDENTITY
        self._nirs.add(nir)
        readme_rows = [("PHAR", "100", "TP01"), ("MEDE", "70", "TP01")]
        for domain, rate, convention in readme_rows:
            self._lines.append(
                f"{nir},{key},{birth},1,{AMC_NUMBERS[0]},{README_MEMBER},{domain},{rate},"
                f"{convention},20240101,20991231\n"
            )
        self._planted[(nir, birth, 1)] = [
            (AMC_NUMBERS[0], README_MEMBER, d, "20240101", "20991231") for d, _, _ in readme_rows
        ]
        self.beneficiaries += 1
        readme = _Planted(README_IDENTITY, 1, [AMC_NUMBERS[0]], [README_MEMBER])
        example("README example", readme, "PHAR")

        # Nobody: a well-formed identity with a correct key that is not in the data.
        nir, key, birth = self._identity()
        examples.append(
            ExampleIdentity(
                "unknown beneficiary",
                nir,
                key,
                birth,
                1,
                AMC_NUMBERS[0],
                "",
                "PHAR",
                care_date,
                NO_MATCH,
            )
        )
        return tuple(examples)

    # -- practitioners --------------------------------------------------------------------------

    def practitioners(self) -> tuple[DemoPractitioner, ...]:
        """Some of every profession, the first with every insurer, others most; one suspended."""
        rng = self.rng
        ids: set[str] = set()

        def new_id() -> str:
            while True:
                pid = f"10{rng.randrange(10**9):09d}"  # RPPS-like, 11 digits
                if pid not in ids:
                    ids.add(pid)
                    return pid

        result = []
        for profession in PROFESSIONS:
            for i in range(_PRACTITIONERS_PER_PROFESSION.get(profession, _DEFAULT_PRACTITIONERS)):
                amcs = list(AMC_NUMBERS)
                if i and rng.random() < 0.35:
                    for gone in rng.sample(amcs, rng.randint(1, 2)):
                        amcs.remove(gone)
                result.append(DemoPractitioner(new_id(), profession, tuple(amcs), "active"))
        result.append(DemoPractitioner(new_id(), "pharmacist", AMC_NUMBERS, "suspended"))
        return tuple(result)

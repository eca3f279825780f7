"""Quota profiles and the host's shared quota state: builds each practitioner's profile from the
config and its overrides, opens the shared state file, and answers the admin questions about it.

The per-call arithmetic lives in the fast path (fastpath.quota and the gates); this module is what
the server, the auth layer and the CLI need around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath import Practitioner, rules
from fastpath.quota import FLAG_SUSPENDED, SHADOW_RULES, CreditFile, QuotaFile, QuotaProfile
from service.config import Config
from service.store import PractitionerRecord

QUOTA_SUBDIR = "quota"
STATE_FILE = "state"


def quota_path(data_dir: Path) -> Path:
    return Path(data_dir) / QUOTA_SUBDIR / STATE_FILE


SLOT_STEP = 64


def open_quota_file(data_dir: Path, config: Config, slots_needed: int = 0) -> QuotaFile:
    """The shared state, with room for at least `slots_needed` practitioners."""
    slots = max(config.quota.slots, slots_needed)
    return QuotaFile(quota_path(data_dir), -(-slots // SLOT_STEP) * SLOT_STEP)


CREDIT_FILE = "credit"


def open_credit_file(data_dir: Path, slots: int) -> CreditFile:
    """This host's cluster credit per slot (with [cluster]), beside the state file."""
    return CreditFile(Path(data_dir) / QUOTA_SUBDIR / CREDIT_FILE, slots)


def profile_for(config: Config, profession: str, overrides: dict[str, Any] | None) -> QuotaProfile:
    values = config.quota_values(profession, overrides)
    shadow = 0
    for rule in values.pop("shadow"):
        shadow |= SHADOW_RULES[rule]
    return QuotaProfile(shadow=shadow, **values)


def domain_mask(config: Config, profession: str) -> int:
    mask = 0
    for code in config.profession_domains.get(profession, ()):
        mask |= 1 << rules.DOMAIN_CODES[code]
    return mask


class PractitionerFactory:
    """The fast path's view of a practitioner record: scope, quota slot and profile."""

    def __init__(self, config: Config) -> None:
        self._config = config

    def __call__(self, record: PractitionerRecord) -> Practitioner:
        return Practitioner(
            practitioner_id=record.practitioner_id,
            profession=record.profession,
            role="practitioner",
            amc_numbers=frozenset(record.amc_numbers),
            status=record.status,
            slot=record.slot,
            domains=domain_mask(self._config, record.profession),
            quota=profile_for(self._config, record.profession, record.quota),
        )


@dataclass(frozen=True)
class Usage:
    day: int
    daily_count: int
    distinct_count: int
    window_len: int
    window_bad: int
    guard_fired: int
    suspended_by_guard: bool


def usage(quota_file: QuotaFile, slot: int, today: int) -> Usage:
    state = quota_file.read(slot)
    same_day = state.day == today
    return Usage(
        day=state.day,
        daily_count=state.daily_count if same_day else 0,
        distinct_count=state.distinct_count if same_day else 0,
        window_len=state.window_len,
        window_bad=bin(state.window_bits & ((1 << max(state.window_len, 0)) - 1)).count("1"),
        guard_fired=state.guard_fired,
        suspended_by_guard=bool(state.flags & FLAG_SUSPENDED),
    )

"""Quota profiles and the host's shared quota state: builds each practitioner's profile from the
config and its overrides, opens the shared state file, and answers the admin questions about it.

The per-call arithmetic lives in the fast path (fastpath.quota and the gates); this module is what
the server, the auth layer and the CLI need around it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath import Practitioner, baselines, rules
from fastpath.baselines import SIGNALS, BaselineFile, BaselineProfile
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


BASELINE_FILE = "baseline"


def open_baseline_file(data_dir: Path, slots: int) -> BaselineFile:
    """Each practitioner's baseline (fastpath.baselines), beside the state file, slot for slot."""
    return BaselineFile(Path(data_dir) / QUOTA_SUBDIR / BASELINE_FILE, slots)


def baseline_reason(signals: int) -> str:
    """The suspension reason recorded when a baseline policy suspends (signals: its bits)."""
    names = "+".join(name for i, name in enumerate(SIGNALS) if signals >> i & 1)
    return f"baseline policy: {names} against the practitioner's own past"


def clear_baseline_suspension(data_dir: Path, quota_file: QuotaFile, slot: int) -> None:
    """A human reinstated the practitioner: its baseline no longer names the policy that
    suspended it (under the slot's mutex, as the gates write)."""
    path = Path(data_dir) / QUOTA_SUBDIR / BASELINE_FILE
    if not path.exists():
        return
    base = BaselineFile(path, 0)
    try:
        if slot < base.slots:
            quota_file.lock(slot)
            try:
                state = base.read(slot)
                state.suspended_by = 0
                state.pack_into(base.map, base.offset(slot))
            finally:
                quota_file.unlock(slot)
    finally:
        base.close()


def _hour_ranges(hours: list[int]) -> str:
    """[8, 9, 10, 14, 15] -> "08-11h, 14-16h" (each range up to its last hour's end)."""
    ranges: list[list[int]] = []
    for h in hours:
        if ranges and ranges[-1][1] == h:
            ranges[-1][1] = h + 1
        else:
            ranges.append([h, h + 1])
    return ", ".join(f"{a:02d}-{b:02d}h" for a, b in ranges)


def baseline_lines(data_dir: Path, slot: int, today: int, profile: BaselineProfile | None
                   ) -> list[str]:  # fmt: skip
    """What `practitioner show` prints of a practitioner's baseline and today's scores."""
    if profile is None:
        return ["baseline      off ([baselines] enabled = false)"]
    path = Path(data_dir) / QUOTA_SUBDIR / BASELINE_FILE
    if slot < 0 or not path.exists():
        return ["baseline      nothing recorded yet"]
    base = BaselineFile(path, 0)
    try:
        if slot >= base.slots:
            return ["baseline      nothing recorded yet"]
        s = base.read(slot)
    finally:
        base.close()
    f = baselines.FIXED
    learning = s.days_active < profile.learn_days
    usual = [
        h for h in range(baselines.HOURS)
        if s.hours_total and s.hours[h] * 1000 >= s.hours_total * profile.off_permille
    ]  # fmt: skip
    lines = [
        f"baseline      {s.days_active} active day(s)"
        + (f", learning until {profile.learn_days}" if learning else "")
        + f": {s.mean_lookups / f:.1f} lookups/day (sd "
        f"{baselines.deviation(s.mean_lookups, s.square_lookups):.1f}), "
        f"{s.mean_new / f:.1f} new/day "
        f"(sd {baselines.deviation(s.mean_new, s.square_new):.1f}), {s.mean_share / f:.0f}% new; "
        f"usual hours (Paris) {_hour_ranges(usual) or 'none yet'}; domains "
        f"{', '.join(c for c, i in rules.DOMAIN_CODES.items() if s.usual_domains >> i & 1) or '-'}"
    ]
    if s.day == today:
        scores = baselines.signal_scores(s)
        raised = [n for i, n in enumerate(baselines.SIGNALS) if s.fired >> i & 1]
        lines.append(
            f"today scores  {s.lookups} lookups, {s.new} new: new_share {scores[0]}% (at "
            f"{profile.new_share_percent}%), new_today {scores[1]}% of baseline (at "
            f"{profile.new_mult_percent}%), off_hours {scores[2]} (at {profile.off_min}), volume "
            f"{scores[3]}% of baseline (at {profile.volume_mult_percent}%), new_excess "
            f"+{scores[4]} points of share (at +{profile.excess_margin}, with "
            f"{profile.excess_sigma} sd more new people); raised: "
            + (", ".join(raised) or "none")
            + ("" if not learning else " (learning: none counts)")
        )
    else:
        lines.append("today scores  no lookup today")
    enforce = [n for i, n in enumerate(baselines.SIGNALS) if profile.enforce >> i & 1]
    lines.append(
        "policy        "
        + (f"suspends when {' and '.join(enforce)} are raised the same day" if enforce
           else "shadow (signals traced and counted, never enforced)")
        + (f"; last suspended by {baseline_reason(s.suspended_by)}" if s.suspended_by else "")
    )  # fmt: skip
    return lines


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
            baseline=self._config.baseline_profile(record.profession),
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

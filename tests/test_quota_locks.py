"""The quota slot locks: robust process-shared mutexes in the locks file beside the quota state.

Real processes, real mutexes: a holder that dies does not block the others, a mutex left locked by
a crashed machine is cleared by the next lone opener, and the Cython gate and pure-Python callers
(the CLI, the reference gate) exclude each other through the same mutex.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import KNOWN_IDENTITIES, NOW, TODAY, RightsStore

from fastpath import rules
from fastpath.quota import (
    DISTINCT_CAPACITY,
    LOCK_ENTRY,
    LOCK_READY,
    SLOT_HEAD,
    QuotaFile,
    QuotaProfile,
)
from fastpath.rules import Practitioner

SPAWN = multiprocessing.get_context("spawn")
PROFILE = QuotaProfile(rate_per_minute=60000, burst=1000, daily_limit=1000, distinct_limit=100)


def _hold_and_die(path: str, slot: int, locked: Any, copy_to: str | None) -> None:
    """Child: lock `slot`, optionally copy the locks file while holding it, then get killed
    mid-call, as the OOM killer would (the kernel's robust-list cleanup marks the mutex
    owner-dead)."""
    quota = QuotaFile(Path(path), 4)
    quota.lock(slot)
    if copy_to:
        shutil.copyfile(quota.locks.path, copy_to)
    locked.set()
    os.kill(os.getpid(), signal.SIGKILL)


def _hold_until(path: str, slot: int, locked: Any, release: Any) -> None:
    quota = QuotaFile(Path(path), 4)
    quota.lock(slot)
    locked.set()
    release.wait(30)
    quota.unlock(slot)
    quota.close()


def _lock_within(quota: QuotaFile, slot: int, seconds: float) -> bool:
    done = threading.Event()

    def take() -> None:
        quota.lock(slot)
        quota.unlock(slot)
        done.set()

    threading.Thread(target=take, daemon=True).start()
    return done.wait(seconds)


def test_every_slot_has_an_initialised_mutex(tmp_path: Path) -> None:
    quota = QuotaFile(tmp_path / "state", 3)
    grown = QuotaFile(tmp_path / "state", 7)  # another opener adds slots: it initialises them
    try:
        raw = quota.locks.path.read_bytes()
        assert len(raw) == 7 * LOCK_ENTRY
        for slot in range(7):
            assert int.from_bytes(raw[slot * LOCK_ENTRY : slot * LOCK_ENTRY + 4], "little") == (
                LOCK_READY
            )
            grown.lock(slot)
            grown.unlock(slot)
    finally:
        grown.close()
        quota.close()


def test_a_holder_that_dies_does_not_block_the_others(tmp_path: Path) -> None:
    path = tmp_path / "state"
    quota = QuotaFile(path, 4)  # stays open: the child is not alone, nothing is reinitialised
    try:
        locked = SPAWN.Event()
        child = SPAWN.Process(target=_hold_and_die, args=(str(path), 2, locked, None))
        child.start()
        assert locked.wait(30)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL
        assert _lock_within(quota, 2, 10), "slot 2 stayed locked after its holder died"
        assert _lock_within(quota, 2, 10)  # and it is a working mutex again
    finally:
        quota.close()


def test_a_mutex_left_locked_by_a_crash_is_cleared_by_the_next_lone_opener(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state"
    snapshot = tmp_path / "locks-while-held"
    locked = SPAWN.Event()
    child = SPAWN.Process(target=_hold_and_die, args=(str(path), 1, locked, str(snapshot)))
    child.start()
    assert locked.wait(30)
    child.join(30)
    # What the file held at that moment is what a machine crash leaves: a mutex locked by a
    # thread that no longer exists, and no kernel left to mark it owner-dead.
    shutil.copyfile(snapshot, path.with_name("state.locks"))
    quota = QuotaFile(path, 4)
    try:
        assert _lock_within(quota, 1, 10), "a stale lock survived a lone open"
    finally:
        quota.close()


def test_the_cython_gate_and_python_callers_exclude_each_other(
    gate_module: ModuleType, rights_env: RightsStore, tmp_path: Path
) -> None:
    path = tmp_path / "state"
    quota = QuotaFile(path, 4)
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota)
    who = Practitioner(
        practitioner_id="10001234567",
        profession="pharmacist",
        amc_numbers=frozenset({"123456789", "987654321", "1122"}),
        slot=3,
        quota=PROFILE,
    )
    known = next(k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED)
    request = known.request().SerializeToString()
    locked, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=_hold_until, args=(str(path), 3, locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        answered = threading.Event()
        codes: list[int] = []

        def call() -> None:
            codes.append(gate.check(who, request, TODAY, NOW)[0])
            answered.set()

        # Run it on a thread and watch it wait for the mutex (it waits with the GIL released).
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        assert not answered.wait(0.5), "the gate answered while another process held the slot"
        release.set()
        assert answered.wait(30)
        assert codes == [rules.OK]
        assert quota.read(3).daily_count == 1
    finally:
        release.set()
        holder.join(30)
        gate.close()
        quota.close()


@pytest.mark.parametrize("slots", [1, 5])
def test_reopening_in_one_process_keeps_the_mutexes_working(tmp_path: Path, slots: int) -> None:
    """A server reopens the file when it grows: close, then open (alone again)."""
    quota = QuotaFile(tmp_path / "state", slots)
    quota.lock(0)
    quota.unlock(0)
    quota.close()
    again = QuotaFile(tmp_path / "state", slots + 2)
    try:
        for slot in range(slots + 2):
            assert _lock_within(again, slot, 10)
    finally:
        again.close()


def _answers_within(call: Any, seconds: float) -> list[Any]:
    out: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:
            out.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), "the call never came back: a slot mutex stayed locked"
    return out


def _practitioner(slot: int = 3) -> Practitioner:
    return Practitioner(
        practitioner_id="10001234567",
        profession="pharmacist",
        amc_numbers=frozenset({"123456789", "987654321", "1122"}),
        slot=slot,
        quota=PROFILE,
    )


def test_a_call_that_raises_leaves_the_slot_unlocked(
    gate_module: ModuleType, rights_env: RightsStore, tmp_path: Path
) -> None:
    quota = QuotaFile(tmp_path / "state", 4)
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota)
    request = (
        next(k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED)
        .request()
        .SerializeToString()
    )
    try:
        # A day that is no YYYYMMDD (only a broken clock could give one): the call fails...
        (failed,) = _answers_within(lambda: gate.check(_practitioner(), request, -1, NOW), 10)
        assert isinstance(failed, Exception)
        # ...and the next ones, on this process and on the slot, are answered.
        ((code, _payload),) = _answers_within(
            lambda: gate.check(_practitioner(), request, TODAY, NOW), 10
        )
        assert code == rules.OK
        assert _lock_within(quota, 3, 10)
    finally:
        gate.close()
        quota.close()


def test_a_full_distinct_table_is_answered_not_probed_forever(
    gate_module: ModuleType, rights_env: RightsStore, tmp_path: Path
) -> None:
    """Only a corrupted slot can have every entry taken (the limits stop at 3/4): the probe is
    bounded all the same, in both gates alike."""
    quota = QuotaFile(tmp_path / "state", 4)
    gate = gate_module.Gate(rights_env.env, rights_env.db, rights_env.keys, quota=quota)
    state = quota.read(3)
    state.day = TODAY
    quota.write(3, state)
    start = quota.offset(3) + SLOT_HEAD
    quota.map[start : start + 8 * DISTINCT_CAPACITY] = b"".join(
        (i + 1).to_bytes(8, "little") for i in range(DISTINCT_CAPACITY)
    )
    request = (
        next(k for k in KNOWN_IDENTITIES if k.expected == rules.DECISION_COVERED)
        .request()
        .SerializeToString()
    )
    try:
        (result,) = _answers_within(lambda: gate.check(_practitioner(), request, TODAY, NOW), 10)
        assert not isinstance(result, Exception)
    finally:
        gate.close()
        quota.close()


def test_locking_a_closed_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    quota = QuotaFile(tmp_path / "state", 2)
    quota.close()
    with pytest.raises(ValueError, match="closed"):
        quota.locks.lock(0)


def test_a_lone_opener_drops_stale_entries_beyond_its_slots(tmp_path: Path) -> None:
    locks = tmp_path / "state.locks"
    locks.write_bytes(b"\xff" * (9 * LOCK_ENTRY))  # left by an older, larger state
    quota = QuotaFile(tmp_path / "state", 2)
    try:
        assert locks.stat().st_size == 2 * LOCK_ENTRY
    finally:
        quota.close()

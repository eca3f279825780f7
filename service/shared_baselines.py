"""Several hosts, one baseline per practitioner ([cluster] with [baselines]): each host's sync
process publishes what its lookups taught it and merges what the other hosts published.

A host's baseline record (fastpath.baselines) sees only the lookups that host answers. Bloom
filters of the same size and generation merge exactly by bitwise OR, and a segment's generation
fixes its place (generation % FILTER_GENERATIONS), so the other hosts' bits of a generation this
record holds are ORed into it: a beneficiary seen on host A is a repeat on host B. Day counters
travel as each host's own totals for its record's Paris day, never as increments, like credit
totals (service.credit): the record's counters become its own plus the sum of the other hosts'
totals for the same day, so the gates' signals, and the fold into the smoothed baselines at the
day's end, count everything the practitioner did. A merge applied twice changes nothing.

What the other hosts added is kept per slot in DIR/quota/baseline-merged (beside the record,
under the same slot mutex; the gates never touch it), so a host can tell its own totals from the
merged ones after a restart. Redis holds, per practitioner, two hashes: `cg:{id}:b`, each host's
day (its totals, signals, domains and current filter segment), and `cg:{id}:bp`, each host's
older segments (changed only when a generation passes). Each has `seq`, raised by every
publication, so a host reads a hash again only when another host published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastpath import baselines
from fastpath.baselines import (
    FILTER_BYTES,
    FILTER_GENERATIONS,
    HEADER_SIZE,
    RECORD_HEAD,
    RECORD_SIZE,
    BaselineFile,
    BaselineState,
)
from fastpath.quota import QuotaFile, SlotFile

log = logging.getLogger("covergate.baselines")

MERGED_FILE = "baseline-merged"
KEY_TTL_SECONDS = 3 * 86400
CHUNK = 256  # practitioners per pipeline: a round's first publications stay well under a deadline
# A round gives the event loop back this often (practitioners): its file work (~0.3 ms each when
# busy) never holds the admin stream and snapshot following for a whole chunk.
YIELD_EVERY = 16
_U32 = 0xFFFFFFFF

# A publication: version, the record's day, the host's own totals that day (lookups, new,
# off-hours lookups), the day's raised signals and care domains, how many filter segments follow,
# their generations, then their bits (zlib: a practice's filters are mostly zeros).
PUBLICATION_VERSION = 1
_PUBLICATION = struct.Struct("<8I")

# A slot's entry in DIR/quota/baseline-merged: the record's day when the merge last ran, and the
# other hosts' totals for that day already included in the record's counters.
_MERGED = struct.Struct("<4I")
MERGED_MAGIC = b"CGBMRG01"


# The two hashes of a practitioner: every host's day (changed by each lookup) and past segments
# (changed when a generation passes). Each has one field per host and `seq`.
DAY, PAST = "b", "bp"
PARTS = (DAY, PAST)


def baseline_key(practitioner_id: str, part: str = DAY) -> str:
    return f"cg:{{{practitioner_id}}}:{part}"


@dataclass(frozen=True)
class Counts:
    """A day's lookups, new beneficiaries and off-hours lookups (one host's, or several)."""

    lookups: int = 0
    new: int = 0
    off_hours: int = 0


@dataclass(frozen=True)
class Merged:
    """What the other hosts added to a record: their totals for `day` (0: nothing yet)."""

    day: int = 0
    others: Counts = Counts()


class MergedFile(SlotFile):
    """DIR/quota/baseline-merged: per slot, the other hosts' totals included in the record."""

    MAGIC = MERGED_MAGIC
    ENTRY = _MERGED.size
    WHAT = "merged baseline"

    def read(self, slot: int) -> Merged:
        day, lookups, new, off_hours = _MERGED.unpack_from(self.map, self.offset(slot))
        return Merged(day, Counts(lookups, new, off_hours))

    def write(self, slot: int, merged: Merged) -> None:
        c = merged.others
        _MERGED.pack_into(self.map, self.offset(slot), merged.day, c.lookups, c.new, c.off_hours)


def own_counts(s: BaselineState, merged: Merged) -> Counts:
    """The record's counters without what the other hosts added (theirs are of its day only)."""
    if merged.day != s.day:
        return Counts(s.lookups, s.new, s.off_hours)
    o = merged.others
    return Counts(max(s.lookups - o.lookups, 0), max(s.new - o.new, 0),
                  max(s.off_hours - o.off_hours, 0))  # fmt: skip


@dataclass(frozen=True)
class Publication:
    """Part of one host's baseline of a practitioner, as published: its own totals for `day` (0:
    none), the day's raised signals and domains, and filter segments as (generation, bits)."""

    day: int
    own: Counts
    fired: int
    domains: int
    segments: tuple[tuple[int, bytes], ...]

    def to_bytes(self) -> bytes:
        o = self.own
        head = _PUBLICATION.pack(PUBLICATION_VERSION, self.day, o.lookups, o.new, o.off_hours,
                                 self.fired, self.domains, len(self.segments))  # fmt: skip
        generations = struct.pack(f"<{len(self.segments)}I", *(g for g, _ in self.segments))
        return head + generations + zlib.compress(b"".join(b for _, b in self.segments), 1)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Publication | None:
        """None for anything that is not a publication of this version (never an exception: a
        host must not stop merging over another's bytes)."""
        if len(raw) < _PUBLICATION.size:
            return None
        v = _PUBLICATION.unpack_from(raw)
        count = v[7]
        at = _PUBLICATION.size + 4 * count
        if v[0] != PUBLICATION_VERSION or count > FILTER_GENERATIONS or len(raw) < at:
            return None
        generations = struct.unpack_from(f"<{count}I", raw, _PUBLICATION.size)
        try:
            bits = zlib.decompressobj().decompress(raw[at:], count * FILTER_BYTES)
        except zlib.error:
            return None
        if len(bits) != count * FILTER_BYTES:
            return None
        segments = tuple((g, bits[i * FILTER_BYTES : (i + 1) * FILTER_BYTES])
                         for i, g in enumerate(generations))  # fmt: skip
        return cls(v[1], Counts(v[2], v[3], v[4]), v[5], v[6], segments)

    def fingerprint(self) -> tuple[int, ...]:
        """What changes when this host's own lookups change what it publishes (bits merged from
        the other hosts are theirs to publish)."""
        o = self.own
        return (self.day, o.lookups, o.new, o.off_hours, self.fired, self.domains,
                *(g for g, _ in self.segments))  # fmt: skip


def publications(buffer: Any, offset: int, merged: Merged) -> tuple[Publication, Publication]:
    """The record at `offset` as this host publishes it (read under the slot's mutex): its day
    (own totals, signals, domains and the current generation's segment, which the gates set bits
    in) and its past (the older segments: this host's bits in them are fixed once their
    generation has passed, so they are published again only when the generations move)."""
    s = BaselineState.unpack(buffer, offset)
    base = offset + RECORD_HEAD
    current = baselines.generation_of(s.day) if s.day else 0
    today: list[tuple[int, bytes]] = []
    past: list[tuple[int, bytes]] = []
    for g in range(FILTER_GENERATIONS):
        if s.generation[g]:
            bits = bytes(buffer[base + g * FILTER_BYTES : base + (g + 1) * FILTER_BYTES])
            (today if s.generation[g] == current else past).append((s.generation[g], bits))
    return (Publication(s.day, own_counts(s, merged), s.fired, s.domains, tuple(today)),
            Publication(0, Counts(), 0, 0, tuple(past)))  # fmt: skip


def merge(buffer: Any, offset: int, merged: Merged, others: list[Publication]) -> Merged:
    """The other hosts' publications into the record at `offset` (under the slot's mutex); returns
    what the record now includes of theirs. Filters: each segment ORed with the others' segments
    of the generation it holds (another generation's bits are dropped). Counters: the record's
    own plus the sum of the others' totals for the record's day (another day's are not added),
    never below what was merged before that day (a host whose publication expired still counted).
    Idempotent: merging the same publications again changes no byte."""
    s = BaselineState.unpack(buffer, offset)
    if s.day == 0:
        return merged  # nothing ever recorded here: the first lookup starts the record
    base = offset + RECORD_HEAD
    for g in range(FILTER_GENERATIONS):
        mine = s.generation[g]
        parts = [bits for p in others for generation, bits in p.segments
                 if mine and generation == mine]  # fmt: skip
        if not parts:
            continue
        start = base + g * FILTER_BYTES
        union = int.from_bytes(buffer[start : start + FILTER_BYTES], "little")
        for part in parts:
            union |= int.from_bytes(part, "little")
        buffer[start : start + FILTER_BYTES] = union.to_bytes(FILTER_BYTES, "little")
    own = own_counts(s, merged)
    today = [p for p in others if p.day == s.day]
    before = merged.others if merged.day == s.day else Counts()
    theirs = Counts(
        max(sum(p.own.lookups for p in today), before.lookups),
        max(sum(p.own.new for p in today), before.new),
        max(sum(p.own.off_hours for p in today), before.off_hours),
    )
    s.lookups = min(own.lookups + theirs.lookups, _U32)
    s.new = min(own.new + theirs.new, _U32)
    s.off_hours = min(own.off_hours + theirs.off_hours, _U32)
    for p in today:
        s.fired |= p.fired
        s.domains |= p.domains
    s.pack_into(buffer, offset)
    return Merged(s.day, theirs)


# -- the sync process's loop -------------------------------------------------------------------


class BaselineSync:
    """Per host, in the cluster sync process: every `interval`, the baselines of the slots this
    host used today or yesterday are published (those its own lookups changed since) and merged
    with what the other hosts published (when they did): one or two pipelined round trips per
    CHUNK practitioners."""

    def __init__(self, data_dir: Path, backend: Any, practitioners: Callable[[], dict[int, str]],
                 interval: float) -> None:  # fmt: skip
        self.data_dir = Path(data_dir)
        self.backend = backend
        self._practitioners = practitioners  # slot: practitioner id, from this host's store
        self._ids: dict[int, str] = {}
        self.interval = interval
        # Per (slot, part): the fingerprint this host last published, and the seq it last merged.
        self._published: dict[tuple[int, str], tuple[int, ...]] = {}
        self._seen_seq: dict[tuple[int, str], int] = {}
        self._files: tuple[QuotaFile, BaselineFile, MergedFile] | None = None
        self.rounds = 0

    def _open(self) -> tuple[QuotaFile, BaselineFile, MergedFile] | None:
        from service.quotas import BASELINE_FILE, QUOTA_SUBDIR, quota_path

        path = self.data_dir / QUOTA_SUBDIR / BASELINE_FILE
        try:
            on_disk = (os.path.getsize(path) - HEADER_SIZE) // RECORD_SIZE
        except OSError:
            return None  # the server has not opened it yet (or keeps no baselines)
        if self._files is not None:
            if self._files[1].slots >= on_disk:
                return self._files
            self.close()  # grown for new practitioners: map it again
        base = BaselineFile(path, 0)
        quota = QuotaFile(quota_path(self.data_dir), base.slots)
        merged = MergedFile(self.data_dir / QUOTA_SUBDIR / MERGED_FILE, base.slots)
        self._files = (quota, base, merged)
        return self._files

    def close(self) -> None:
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None

    def _active(self, base: BaselineFile, today: int) -> list[int]:
        """Slots whose record holds today's or yesterday's lookups."""
        since = baselines.day_number(today) - 1
        day = struct.Struct("<I")
        return [slot for slot in range(base.slots)
                if (d := day.unpack_from(base.map, base.offset(slot))[0])
                and baselines.day_number(d) >= since]  # fmt: skip

    def _named(self, slots: list[int]) -> dict[int, str]:
        """The practitioner of each slot (the store read again when one is new to this loop)."""
        if any(slot not in self._ids for slot in slots):
            self._ids = self._practitioners()
            self._ids.update({slot: "" for slot in slots if slot not in self._ids})
        return {slot: self._ids[slot] for slot in slots if self._ids[slot]}

    @contextlib.contextmanager
    def _locked(self, quota: QuotaFile, slot: int) -> Any:
        quota.lock(slot)
        try:
            yield
        finally:
            quota.unlock(slot)

    async def run_once(self, today: int) -> int:
        """One round: returns how many records took other hosts' publications in."""
        files = self._open()
        if files is None:
            return 0
        quota, base, merged_file = files
        named = self._named(self._active(base, today))
        order = list(named)
        merged = 0
        for i in range(0, len(order), CHUNK):
            chunk = {slot: named[slot] for slot in order[i : i + CHUNK]}
            merged += await self._round(quota, base, merged_file, chunk)
        self.rounds += 1
        return merged

    async def _round(self, quota: QuotaFile, base: BaselineFile, merged_file: MergedFile,
                     slots: dict[int, str]) -> int:  # fmt: skip
        """Publish and merge the baselines of `slots` (slot: practitioner id)."""
        publish: dict[tuple[int, str], Publication] = {}
        for n, slot in enumerate(slots, 1):
            with self._locked(quota, slot):
                parts = publications(base.map, base.offset(slot), merged_file.read(slot))
            for part, p in zip(PARTS, parts, strict=True):
                if self._published.get((slot, part)) != p.fingerprint():
                    publish[(slot, part)] = p
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # the admin stream and snapshots share this loop
        host = self.backend.host
        polled = [(slot, part) for slot in slots for part in PARTS]

        async def first() -> Any:
            pipe = self.backend.client.pipeline(transaction=False)
            for (slot, part), p in publish.items():
                key = baseline_key(slots[slot], part)
                pipe.hset(key, host, p.to_bytes())
                pipe.hincrby(key, "seq", 1)
                pipe.expire(key, KEY_TTL_SECONDS)
            for slot, part in polled:
                pipe.hget(baseline_key(slots[slot], part), "seq")
            return await pipe.execute()

        replies = await self.backend._call(first)
        own_seq = {which: int(replies[3 * i + 1]) for i, which in enumerate(publish)}
        for which, p in publish.items():
            self._published[which] = p.fingerprint()
        read = []
        for which, seq in zip(polled, replies[3 * len(publish) :], strict=True):
            seq = int(seq or 0)
            seen = self._seen_seq.get(which)
            if seen is not None and (seq == seen or seq == own_seq.get(which) == seen + 1):
                self._seen_seq[which] = seq  # nothing new, or only this host's own publication
            else:
                read.append(which)
        if not read:
            return 0

        async def second() -> Any:
            pipe = self.backend.client.pipeline(transaction=False)
            for slot, part in read:
                pipe.hgetall(baseline_key(slots[slot], part))
            return await pipe.execute()

        hashes = await self.backend._call(second)
        others: dict[int, list[Publication]] = {}
        for which, fields in zip(read, hashes, strict=True):
            mine, seq = False, 0
            for name, value in fields.items():
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name == "seq":
                    seq = int(value)
                elif name == host:
                    mine = True
                elif (theirs := Publication.from_bytes(bytes(value))) is not None:
                    others.setdefault(which[0], []).append(theirs)
            if not mine:
                self._published.pop(which, None)  # Redis lost it (or it expired): publish again
            self._seen_seq[which] = seq
        for n, (slot, publications_read) in enumerate(others.items(), 1):
            with self._locked(quota, slot):
                before = merged_file.read(slot)
                after = merge(base.map, base.offset(slot), before, publications_read)
                if after != before:
                    merged_file.write(slot, after)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return len(others)

    async def run(self, stop: asyncio.Event, today: Callable[[], int]) -> None:
        """Rounds every interval until `stop`; Redis failing only skips rounds (each host goes on
        judging from its own record)."""
        from service.cluster import BackendUnavailable

        while not stop.is_set():
            try:
                await self.run_once(today())
            except BackendUnavailable:
                pass
            except Exception:  # a merge must never take the sync process down
                log.exception("baseline merge failed; retrying at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
        self.close()

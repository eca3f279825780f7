"""`python -m bench.shared_baselines`: what merging baselines across hosts costs (service
.shared_baselines), per merge round of one host: Redis round trips, bytes to and from Redis, and
the sync process's CPU time. Prints a table; not a timed test.

Each host keeps its own records for `--practitioners` practitioners, filled through the gate's own
baseline code (fastpath.observe_baseline) with 60 days of `--per-day` lookups, `--new-per-day` of
them new people, so the filters hold what a practice's do. Then rounds: an idle one (nothing
changed anywhere), and busy ones where every practitioner made `--lookups` lookups of new people
on every host since the last round (the worst case: every publication changes, every host reads
every other's).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import fastpath
from bench.servers import RedisProcess
from fastpath.baselines import BaselineFile, BaselineProfile
from fastpath.quota import QuotaFile
from service.cluster import Backend, ClusterSettings
from service.quotas import BASELINE_FILE, QUOTA_SUBDIR, quota_path
from service.shared_baselines import BaselineSync

START = datetime.date(2025, 8, 1)
PROFILE = BaselineProfile()


def storage_key(host: int, slot: int, person: int) -> bytes:
    return hashlib.blake2b(f"{host}/{slot}/{person}".encode(), digest_size=16).digest()


class BenchHost:
    def __init__(self, root: Path, index: int, slots: int, url: str) -> None:
        self.index = index
        self.data_dir = root / f"host-{index}"
        self.quota = QuotaFile(quota_path(self.data_dir), slots)
        self.base = BaselineFile(self.data_dir / QUOTA_SUBDIR / BASELINE_FILE, slots)
        self.next_person = [0] * slots
        self.backend = Backend(ClusterSettings(redis=url, host_id=f"host-{index}", timeout_ms=5000))
        names = {slot: f"1{slot:010d}" for slot in range(slots)}
        self.sync = BaselineSync(self.data_dir, self.backend, lambda: dict(names), 2.0)

    def look(self, slot: int, day: datetime.date, minute: int, new: bool) -> None:
        """One lookup, observed by the gate's code: a new person or one seen before."""
        today = day.year * 10000 + day.month * 100 + day.day
        now_ms = int(datetime.datetime(day.year, day.month, day.day, 8).timestamp() * 1000)
        if new or not self.next_person[slot]:
            self.next_person[slot] += 1
            person = self.next_person[slot]
        else:
            person = 1 + (minute * 7919) % self.next_person[slot]
        self.quota.lock(slot)
        try:
            fastpath.observe_baseline(self.base.map, self.base.offset(slot), PROFILE, today,
                                      now_ms + minute * 60_000, 1,
                                      storage_key(self.index, slot, person))  # fmt: skip
        finally:
            self.quota.unlock(slot)

    def close(self) -> None:
        self.sync.close()
        self.base.close()
        self.quota.close()


def _today(day: datetime.date) -> int:
    return day.year * 10000 + day.month * 100 + day.day


def measure(args: argparse.Namespace) -> dict[str, Any]:
    return asyncio.run(_measure(args))


async def _measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cg-shared-baselines-") as tmp:
        root = Path(tmp)
        redis = RedisProcess(None, root / "redis.log")
        import redis as redis_py

        info = redis_py.Redis.from_url(redis.url)
        hosts = [BenchHost(root, i, args.practitioners, redis.url) for i in range(args.hosts)]
        try:
            last = START
            for d in range(60):
                last = START + datetime.timedelta(days=d)
                for h in hosts:
                    for slot in range(args.practitioners):
                        for k in range(args.per_day):
                            h.look(slot, last, k, k < args.new_per_day)
            today = _today(last)
            rows = {}

            async def round_of(label: str, lookups: int) -> None:
                for k in range(lookups):
                    for h in hosts:
                        for slot in range(args.practitioners):
                            h.look(slot, last, 600 + k, True)
                before = info.info("stats")
                cpu = merged = 0.0
                for h in hosts:
                    started = time.process_time()
                    merged += await h.sync.run_once(today)
                    cpu += time.process_time() - started
                after = info.info("stats")
                n = len(hosts)

                def delta(name: str) -> float:
                    return (int(after[name]) - int(before[name])) / n

                rows[label] = {
                    "round_trips": delta("total_reads_processed") - 1 / n,  # less INFO's own
                    "bytes_to_redis": delta("total_net_input_bytes"),
                    "bytes_from_redis": delta("total_net_output_bytes"),
                    "cpu_ms": cpu * 1000 / n,
                    "records_merged": merged / n,
                }

            await round_of("first (everything published)", 0)
            await round_of("settle (the first merges read)", 0)
            await round_of("idle", 0)
            await round_of(f"busy ({args.lookups} new lookups each, every host)", args.lookups)
            await round_of("idle after busy", 0)
            for h in hosts:
                await h.backend.close()
        finally:
            for h in hosts:
                h.close()
            info.close()
            redis.stop()
    return {"settings": vars(args) | {"json": None}, "rounds": rows}


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['hosts']} hosts, {s['practitioners']} practitioners active on each, 60 days of "
        f"{s['per_day']} lookups ({s['new_per_day']} new) a day; per host and merge round:",
        "",
        "| round | Redis read events | bytes to Redis | bytes from Redis | CPU ms "
        "| records merged |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in result["rounds"].items():
        lines.append(
            f"| {label} | {r['round_trips']:.0f} | {r['bytes_to_redis']:,.0f} | "
            f"{r['bytes_from_redis']:,.0f} | {r['cpu_ms']:.0f} | {r['records_merged']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--practitioners", type=int, default=1000)
    parser.add_argument("--per-day", type=int, default=20)
    parser.add_argument("--new-per-day", type=int, default=5)
    parser.add_argument("--lookups", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    result = measure(args)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one clock every decision reads: unix seconds, and today's date in Europe/Paris.

Quotas' calendar day and an empty care_date both mean the Paris day, wherever the server runs.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

PARIS = ZoneInfo("Europe/Paris")


class ParisClock:
    """`now()` -> (today as YYYYMMDD int, unix seconds); the day is recomputed once a day."""

    def __init__(self) -> None:
        self._day_start = 0.0
        self._day_end = 0.0
        self._today = 0

    def now(self) -> tuple[int, float]:
        t = time.time()
        if not self._day_start <= t < self._day_end:
            local = datetime.fromtimestamp(t, PARIS)
            start = local.replace(hour=0, minute=0, second=0, microsecond=0)
            # Midnight to midnight in local time: 23 or 25 hours on DST change days.
            end = (start + timedelta(days=1, hours=2)).replace(hour=0, tzinfo=None)
            self._day_start = start.timestamp()
            self._day_end = end.replace(tzinfo=PARIS).timestamp()
            self._today = local.year * 10000 + local.month * 100 + local.day
        return self._today, t

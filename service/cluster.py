"""Several hosts, one set of limits: the Redis side of covergate's shared quotas (`[cluster]`).

Redis is the bank; hosts spend locally. A host takes blocks of credit (daily lookups, distinct
beneficiaries, rate tokens) for a practitioner in one Lua call, spends them in its shared-memory
quota slot inside the fast path at no extra cost per lookup, and reports what it spent with its next
call. The scripts keep, per practitioner and Paris day:

    used + sum(outstanding daily leases)                 <= daily_limit
    SCARD(beneficiaries) + sum(outstanding distinct slots) <= distinct_limit

so the limits hold however the calls are spread. A lease expires (its holder stops spending it at
expiry on its own monotonic clock, started before the request); an expired lease of a host that did
not report is given back to the others. Rate tokens come from a GCRA run on Redis's clock, each
spendable for `rate_lease` seconds: over any window w, at most r * (w + L) + burst are admitted.

Every key of a practitioner carries the hash tag {practitioner_id}: each script touches one slot of
a Redis Cluster. Administrative changes (suspensions, reinstatements, tokens, pins, overrides) go to
a stream every host applies to its own store, and a flag the credit script returns with every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

log = logging.getLogger("covergate.cluster")

T = TypeVar("T")

ADMIN_STREAM = "cg:admin"
ADMIN_CHANNEL = "cg:admin:events"
EPOCH_KEY = "cg:epoch"
ADMIN_STREAM_MAXLEN = 100_000
GUARD_REASON = "harvest guard: too many NO_MATCH or invalid lookups (all hosts)"


def quota_key(practitioner_id: str) -> str:
    return f"cg:{{{practitioner_id}}}:q"


def members_key(practitioner_id: str, day: int) -> str:
    return f"cg:{{{practitioner_id}}}:s:{day}"


def guard_key(practitioner_id: str) -> str:
    return f"cg:{{{practitioner_id}}}:g"


def admin_key(practitioner_id: str) -> str:
    return f"cg:{{{practitioner_id}}}:a"


# -- the scripts -----------------------------------------------------------------------------------

# Credit, in one call per practitioner: this host's totals for the day (idempotent: a call retried
# after a timeout, or applied though its reply was lost, changes nothing), the expired leases of
# silent hosts given back, new blocks granted. Per host h the hash keeps G:h (daily credit granted
# today, in all), U:h (lookups it used), DG:h and DU:h (distinct slots granted, new beneficiaries
# it used them on) and E:h (its lease's end). The set holds the day's beneficiaries (pseudonyms).
#   sum(G:h) <= daily_limit          SCARD + sum(DG:h - DU:h) <= distinct_limit
# KEYS: quota hash, today's beneficiary set, admin hash.
# ARGV: 1 host, 2 day, 3 rebuild (1: the state this host reported to was lost; its totals are the
#       whole day), 4 daily_limit, 5 distinct_limit, 6 interval_ms, 7 tolerance_ms, 8 lease_ms,
#       9 want_daily, 10 want_distinct, 11 want_rate, 12 used (U, the host's total),
#       13 granted (G as the host knows it), 14 distinct used (DU), 15 distinct granted (DG as
#       known), 16 members_wanted (the whole set when distinct slots are short), 17 need_daily,
#       18 need_distinct, 19 give back (1: G = U and DG = DU: the host stops holding credit),
#       20... pseudonyms of new beneficiaries.
# Reply: {status, G, DG, rate tokens granted, redis_now_ms, suspended, day's used (sum of U),
#         scard, epoch, members...}. status: 0 ok, 1 lost (the host holds credit for a day Redis
#         does not have), 2 the host's day is behind Redis's, 3 learning (rebuilt after a loss:
#         grants wait one lease for every host's totals).
TAKE = """
local q, set, adm = KEYS[1], KEYS[2], KEYS[3]
local host, day, rebuild = ARGV[1], ARGV[2], ARGV[3] == '1'
local daily_limit, distinct_limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local interval, tolerance, lease = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local want_d, want_s, want_r = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local u_total, g_known = tonumber(ARGV[12]), tonumber(ARGV[13])
local du_total, dg_known = tonumber(ARGV[14]), tonumber(ARGV[15])
local members_wanted = ARGV[16] == '1'
local need, need_s = tonumber(ARGV[17]), tonumber(ARGV[18])
local give_back = ARGV[19] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local suspended = tonumber(redis.call('HGET', adm, 'suspended') or '0')

local cur_day = redis.call('HGET', q, 'day')
if cur_day and tonumber(cur_day) > tonumber(day) then
  return {2, 0, 0, 0, now, suspended, 0, 0, 0}
end
if cur_day ~= day then
  if (g_known > 0 or dg_known > 0) and not rebuild then
    return {1, 0, 0, 0, now, suspended, 0, 0, 0}
  end
  if cur_day then redis.call('DEL', q) end
  redis.call('HSET', q, 'day', day, 'tat', 0, 'epoch', now)
  redis.call('EXPIRE', q, 3 * 86400)
end
if rebuild and not redis.call('HGET', q, 'learn_until') then
  -- Rebuilt after a loss: no grant until every host had a lease's time to report its day.
  redis.call('HSET', q, 'learn_until', now + lease)
end
local epoch = redis.call('HGET', q, 'epoch')

local function num(field) return tonumber(redis.call('HGET', q, field) or '0') end
-- This host's totals: only ever up (a late or repeated report changes nothing).
local u = math.max(num('U:' .. host), u_total)
local du = math.max(num('DU:' .. host), du_total)
local g = math.max(num('G:' .. host), u)    -- used past its grant (fail-open): counted
local dg = math.max(num('DG:' .. host), du)
for i = 20, #ARGV do redis.call('SADD', set, ARGV[i]) end
if #ARGV >= 20 then redis.call('EXPIRE', set, 3 * 86400) end
if give_back then g, dg = u, du end
redis.call('HSET', q, 'U:' .. host, u, 'DU:' .. host, du, 'G:' .. host, g, 'DG:' .. host, dg,
           'E:' .. host, now + lease)
redis.call('HDEL', q, 'M:' .. host)

-- A silent host's expired lease goes back once seen expired for a second with no call from it:
-- after Redis itself was away, every live host reports within its interval first.
local all = redis.call('HGETALL', q)
local f = {}
for i = 1, #all, 2 do f[all[i]] = all[i + 1] end
local sum_g, out_s, used, hosts = 0, 0, 0, 0
for k, v in pairs(f) do
  if string.sub(k, 1, 2) == 'E:' then
    local h = string.sub(k, 3)
    local hu, hdu = tonumber(f['U:' .. h] or '0'), tonumber(f['DU:' .. h] or '0')
    local hg, hdg = tonumber(f['G:' .. h] or '0'), tonumber(f['DG:' .. h] or '0')
    if h ~= host and tonumber(v) < now then
      local marked = f['M:' .. h]
      if marked == nil then
        redis.call('HSET', q, 'M:' .. h, now)
      elseif now - tonumber(marked) > 1000 and (hg > hu or hdg > hdu) then
        hg, hdg = hu, hdu
        redis.call('HSET', q, 'G:' .. h, hg, 'DG:' .. h, hdg)
      end
    end
    hosts = hosts + 1
    sum_g = sum_g + hg
    out_s = out_s + (hdg - hdu)
    used = used + hu
  end
end

local grant_r, gs = 0, 0
local learning = tonumber(f['learn_until'] or '0') > now
if suspended == 0 and not learning then
  -- Blocks shrink near the limit (a share of what is left per active host), so the end is exact
  -- and a host that dies strands little; a call's `need` is granted whole when there is room.
  local avail = daily_limit - sum_g
  local share = math.max(need, math.floor(avail / (4 * hosts)), 1)
  local gd = math.max(0, math.min(want_d, share, avail))
  local scard = redis.call('SCARD', set)
  local avail_s = distinct_limit - scard - out_s
  local share_s = math.max(need_s, math.floor(avail_s / (4 * hosts)), 1)
  gs = math.max(0, math.min(want_s, share_s, avail_s))
  g, dg = g + gd, dg + gs
  redis.call('HSET', q, 'G:' .. host, g, 'DG:' .. host, dg)
  local tat = tonumber(f['tat'] or '0')
  if tat < now then tat = now end
  -- GCRA for want_r tokens at once: the k-th is granted while tat + (k-1)*interval - now
  -- stays within the tolerance (closed form: a busy host's second of tokens is one step).
  if want_r > 0 and tat - now <= tolerance then
    grant_r = math.min(want_r, math.floor((tolerance - (tat - now)) / interval) + 1)
    tat = tat + grant_r * interval
  end
  redis.call('HSET', q, 'tat', tat)
end

local status = learning and 3 or 0
local reply = {status, g, dg, grant_r, now, suspended, used, redis.call('SCARD', set), epoch}
if members_wanted and gs < want_s then
  -- Short of distinct slots: everyone seen today, so that a repeat beneficiary needs none.
  local m = redis.call('SMEMBERS', set)
  for i = 1, #m do reply[#reply + 1] = m[i] end
end
return reply
"""

# The harvest guard over every host: this call's outcomes (and the goods this host had not yet
# reported) join the practitioner's global window; a trip sets the suspension flag every credit
# reply carries (the caller then records it in the admin stream for every host's store). Each
# sender numbers its reports: one retried after a timeout is not counted twice.
# KEYS: guard hash (window w, S:<sender> last number), admin hash.
# ARGV: outcomes ("0" good, "1" bad, oldest first), window, min_lookups, bad_percent, shadow
# (1: trace only), reason, sender, number.
# Reply: {fired (1/0), index in ARGV[1] of the outcome on which it fired (0-based) or -1,
#         suspended, window length, bad count}.
GUARD = """
local g, adm = KEYS[1], KEYS[2]
local outcomes, window = ARGV[1], tonumber(ARGV[2])
local min_lookups, percent = tonumber(ARGV[3]), tonumber(ARGV[4])
local shadow = ARGV[5] == '1'
local sender, number = ARGV[7], tonumber(ARGV[8])
local suspended = tonumber(redis.call('HGET', adm, 'suspended') or '0')
local w = redis.call('HGET', g, 'w') or ''
local fired_at = -1
if tonumber(redis.call('HGET', g, 'S:' .. sender) or '0') < number then
  for i = 1, #outcomes do
    w = w .. string.sub(outcomes, i, i)
    if #w > window then w = string.sub(w, #w - window + 1) end
    if suspended == 0 and fired_at < 0 and #w >= min_lookups then
      local _, bad = string.gsub(w, '1', '')
      if bad * 100 >= percent * #w and not shadow then
        fired_at = i - 1
        suspended = 1
      end
    end
  end
  redis.call('HSET', g, 'w', w, 'S:' .. sender, number)
  redis.call('EXPIRE', g, 3 * 86400)
end
local _, bad = string.gsub(w, '1', '')
if fired_at >= 0 then
  redis.call('HSET', adm, 'suspended', 1, 'reason', ARGV[6])
end
return {fired_at >= 0 and 1 or 0, fired_at, suspended, #w, bad}
"""


# -- settings and connection -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterSettings:
    """`[cluster]`: without a `redis` URL, one host with shared memory and no Redis."""

    redis: str = ""
    host_id: str = ""  # "": the host name
    credit_lease_seconds: float = 30.0  # a lease's life (daily and distinct blocks)
    rate_lease_seconds: float = 1.0  # L: how long a rate token may be spent
    block_max: int = 64  # the largest block of credit taken at once
    report_interval_seconds: float = 0.25  # spent credit reported at least this often
    timeout_ms: int = 50  # every Redis call's deadline
    breaker_failures: int = 3  # consecutive failures that open the circuit ...
    breaker_open_seconds: float = 1.0  # ... for this long
    fail_open: bool = False  # opt-in: admit without Redis (bounded, printed at start)
    baseline_interval_seconds: float = 2.0  # baselines published and merged this often

    @property
    def enabled(self) -> bool:
        return bool(self.redis)

    def host(self) -> str:
        return self.host_id or socket.gethostname()


def connect(url: str, timeout: float) -> Any:
    """An asyncio Redis client for `url`: redis://, rediss://, unix:// (redis-py's own), and
    redis+sentinel://[password@]host:port[,host:port...]/service[/db] for Sentinel,
    redis+cluster://host:port for Redis Cluster."""
    import redis.asyncio as redis_asyncio

    common = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    parsed = urlparse(url)
    if parsed.scheme in ("redis+sentinel", "rediss+sentinel"):
        from redis.asyncio.sentinel import Sentinel

        netloc = parsed.netloc
        password = None
        if "@" in netloc:
            password, _, netloc = netloc.rpartition("@")
            password = unquote(password.partition(":")[2] or password)
        hosts = []
        for item in netloc.split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port or 26379)))
        parts = [p for p in parsed.path.split("/") if p]
        if not parts:
            raise ValueError(
                "a Sentinel URL names its service: redis+sentinel://host:port/mymaster"
            )
        db = int(parts[1]) if len(parts) > 1 else 0
        sentinel = Sentinel(hosts, password=password, db=db,
                            ssl=parsed.scheme.startswith("rediss"), **common)  # fmt: skip
        return sentinel.master_for(parts[0])
    if parsed.scheme in ("redis+cluster", "rediss+cluster"):
        from redis.asyncio.cluster import RedisCluster

        scheme = "rediss" if parsed.scheme.startswith("rediss") else "redis"
        return RedisCluster.from_url(f"{scheme}://{parsed.netloc}{parsed.path}", **common)
    if parsed.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("[cluster] redis must be a redis://, rediss://, unix://, "
                         "redis+sentinel:// or redis+cluster:// URL")  # fmt: skip
    return redis_asyncio.from_url(url, **common)


ADMIN_BLOCK_MS = 500  # how long the sync process's XREAD waits for an admin change


class BackendUnavailable(Exception):
    """Redis did not answer in time, or the circuit is open."""


class CircuitBreaker:
    """After `failures` consecutive failures, calls fail at once for `open_seconds`; then one
    call is let through to probe."""

    def __init__(self, failures: int, open_seconds: float) -> None:
        self._threshold = failures
        self._open_seconds = open_seconds
        self._failures = 0
        self._open_until = 0.0
        self.degraded = False
        self.since = 0.0

    def allow(self) -> bool:
        return time.monotonic() >= self._open_until

    def success(self) -> None:
        if self.degraded:
            log.warning("Redis answers again: the cluster backend is back")
        self._failures = 0
        self.degraded = False

    def failure(self) -> None:
        self._failures += 1
        if self._failures >= self._threshold:
            if not self.degraded:
                log.error("Redis does not answer: running DEGRADED on the credit this host holds")
                self.since = time.time()
            self.degraded = True
            self._open_until = time.monotonic() + self._open_seconds


class Backend:
    """One worker's connection to the cluster's Redis, every call deadline-bound and behind the
    circuit breaker."""

    def __init__(self, settings: ClusterSettings, client: Any = None) -> None:
        self.settings = settings
        self.host = settings.host()
        self._timeout = settings.timeout_ms / 1000
        self.client = client if client is not None else connect(settings.redis, self._timeout)
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_open_seconds)
        self._take = self.client.register_script(TAKE)
        self._guard = self.client.register_script(GUARD)
        self.calls = 0  # round trips made (for "Redis calls per 1,000 lookups")
        self.epoch = ""
        self.sender = f"{self.host}/{os.getpid()}"

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise BackendUnavailable("the circuit to Redis is open")
        self.calls += 1
        try:
            result = await asyncio.wait_for(make(), self._timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.breaker.failure()
            raise BackendUnavailable(f"Redis: {type(exc).__name__}") from exc
        except Exception as exc:
            import redis.exceptions

            if isinstance(exc, redis.exceptions.RedisError):
                self.breaker.failure()
                raise BackendUnavailable(f"Redis: {type(exc).__name__}") from exc
            raise
        self.breaker.success()
        return result

    async def init_epoch(self) -> str:
        """The cluster's epoch: written once when Redis has none; a changed epoch means Redis
        lost its state."""
        fresh = os.urandom(8).hex()
        await self._call(lambda: self.client.set(EPOCH_KEY, fresh, nx=True))
        value = await self._call(lambda: self.client.get(EPOCH_KEY))
        self.epoch = value.decode() if isinstance(value, bytes) else str(value)
        return self.epoch

    async def current_epoch(self) -> str | None:
        value = await self._call(lambda: self.client.get(EPOCH_KEY))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def take(self, request: CreditRequest) -> CreditReply:
        pid = request.practitioner_id
        keys = [quota_key(pid), members_key(pid, request.day), admin_key(pid)]
        args: list[Any] = [
            self.host, request.day, 1 if request.rebuild else 0, request.daily_limit,
            request.distinct_limit, request.interval_ms, request.tolerance_ms,
            int(self.settings.credit_lease_seconds * 1000),
            request.want_daily, request.want_distinct, request.want_rate,
            request.used, request.granted, request.distinct_used, request.distinct_granted,
            1 if request.members_wanted else 0, request.need_daily, request.need_distinct,
            1 if request.give_back else 0, *request.pseudonyms,
        ]  # fmt: skip
        raw = await self._call(lambda: self._take(keys=keys, args=args))
        return CreditReply.from_redis(raw)

    async def guard(
        self, practitioner_id: str, outcomes: str, window: int, min_lookups: int, percent: int,
        shadow: bool, number: int,
    ) -> GuardReply:  # fmt: skip
        """The outcomes join the global window; `number` (increasing per sender) makes a retry
        harmless."""
        keys = [guard_key(practitioner_id), admin_key(practitioner_id)]
        args = [outcomes, window, min_lookups, percent, 1 if shadow else 0, GUARD_REASON,
                self.sender, number]  # fmt: skip
        raw = await self._call(lambda: self._guard(keys=keys, args=args))
        return GuardReply(bool(int(raw[0])), int(raw[1]), bool(int(raw[2])), int(raw[3]),
                          int(raw[4]))  # fmt: skip

    async def admin(self, op: str, practitioner_id: str, **fields: str) -> str:
        """Record an administrative change for every host (and the suspension flag the credit
        script returns)."""
        entry = {"op": op, "practitioner": practitioner_id, **fields}

        async def run() -> Any:
            pipe = self.client.pipeline(transaction=False)
            if op == "suspend":
                pipe.hset(admin_key(practitioner_id), mapping={"suspended": 1,
                          "reason": fields.get("reason", "")})  # fmt: skip
            elif op == "reinstate":
                pipe.hset(admin_key(practitioner_id), mapping={"suspended": 0, "reason": ""})
                pipe.delete(guard_key(practitioner_id))
            pipe.xadd(ADMIN_STREAM, entry, maxlen=ADMIN_STREAM_MAXLEN, approximate=True)
            pipe.publish(ADMIN_CHANNEL, practitioner_id)
            return await pipe.execute()

        result = await self._call(run)
        entry_id = result[-2]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def read_admin(self, after: str, block_ms: int) -> list[tuple[str, dict[str, str]]]:
        """Administrative changes after stream id `after` (waiting up to `block_ms` for one)."""
        if not self.breaker.allow():
            raise BackendUnavailable("the circuit to Redis is open")
        self.calls += 1
        try:
            raw = await asyncio.wait_for(
                self.client.xread({ADMIN_STREAM: after}, count=500, block=block_ms),
                block_ms / 1000 + self._timeout + 0.5,
            )
        except Exception as exc:
            self.breaker.failure()
            raise BackendUnavailable(f"Redis: {type(exc).__name__}") from exc
        self.breaker.success()
        out = []
        for _stream, entries in raw or ():
            for entry_id, values in entries:
                decoded = {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in values.items()
                }
                out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                            decoded))  # fmt: skip
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


@dataclass(frozen=True)
class CreditRequest:
    """A host's totals for one practitioner's day, and what it asks for (TAKE's arguments)."""

    practitioner_id: str
    day: int
    daily_limit: int
    distinct_limit: int
    interval_ms: int
    tolerance_ms: int
    used: int = 0  # lookups this host counted today, in all
    granted: int = 0  # daily credit granted to this host today, as it knows it
    distinct_used: int = 0  # beneficiaries new to this host today, in all
    distinct_granted: int = 0
    want_daily: int = 0
    want_distinct: int = 0
    want_rate: int = 0
    need_daily: int = 0  # granted whole when there is room, whatever the share
    need_distinct: int = 0
    members_wanted: bool = False
    give_back: bool = False
    rebuild: bool = False
    pseudonyms: Sequence[int] = ()


@dataclass(frozen=True)
class CreditReply:
    status: int  # 0 ok, 1 state lost, 2 host's day behind, 3 learning
    granted: int  # daily credit granted to this host today, in all
    distinct_granted: int
    rate: int  # rate tokens granted now
    redis_now_ms: int
    suspended: bool
    used: int
    distinct_count: int
    epoch: int
    members: tuple[int, ...]

    OK, LOST, DAY_BEHIND, LEARNING = 0, 1, 2, 3

    @classmethod
    def from_redis(cls, raw: Sequence[Any]) -> CreditReply:
        values = [int(v) for v in raw]
        return cls(values[0], values[1], values[2], values[3], values[4], bool(values[5]),
                   values[6], values[7], values[8], tuple(values[9:]))  # fmt: skip


@dataclass(frozen=True)
class GuardReply:
    fired: bool
    index: int
    suspended: bool
    window: int
    bad: int


__all__ = [
    "Backend",
    "BackendUnavailable",
    "CircuitBreaker",
    "ClusterSettings",
    "CreditReply",
    "CreditRequest",
    "GuardReply",
    "connect",
]


# -- administrative changes, for every host ------------------------------------------------------
#
# An admin command run on any host changes that host's store, then appends the change to the admin
# stream (and sets the suspension flag the credit script returns with every reply). Each host's sync
# process (run_sync, started by `covergate serve` with [cluster]) applies the stream to its own
# store within a second; the workers see it on their next call or stream message, as they see a
# local change. A host without Redis keeps enforcing what its store says.

PRACTITIONER_FIELDS = ("status", "suspension_reason", "cert_fingerprints", "quota")


def practitioner_change(
    practitioner_id: str, changes: dict[str, Any], event: dict[str, Any], origin: str
) -> dict[str, str]:
    unknown = set(changes) - set(PRACTITIONER_FIELDS)
    if unknown:
        raise ValueError(f"not a shared practitioner field: {', '.join(sorted(unknown))}")
    return {"op": "practitioner", "practitioner": practitioner_id, "origin": origin,
            "changes": json.dumps(changes), "event": json.dumps(event)}  # fmt: skip


def token_change(record: Any, origin: str) -> dict[str, str]:
    return {"op": "token", "practitioner": record.practitioner_id, "origin": origin,
            "credential": record.to_bytes().decode()}  # fmt: skip


def revoke_change(practitioner_id: str, event: dict[str, Any], origin: str) -> dict[str, str]:
    return {"op": "revoke", "practitioner": practitioner_id, "origin": origin,
            "event": json.dumps(event)}  # fmt: skip


def publish(settings: ClusterSettings, entry: dict[str, str], suspended: bool | None) -> str:
    """From the CLI (synchronous): record `entry` for every host; `suspended` sets or clears the
    practitioner's flag in the credit replies. Raises BackendUnavailable."""
    import redis

    client = connect_sync(settings.redis, max(settings.timeout_ms / 1000, 1.0))
    pid = entry["practitioner"]
    try:
        pipe = client.pipeline(transaction=False)
        if suspended is not None:
            reason = json.loads(entry.get("changes", "{}")).get("suspension_reason", "")
            pipe.hset(admin_key(pid), mapping={"suspended": int(suspended), "reason": reason})
            if not suspended:
                pipe.delete(guard_key(pid))
        pipe.xadd(ADMIN_STREAM, entry, maxlen=ADMIN_STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.publish(ADMIN_CHANNEL, pid)
        result = pipe.execute()
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailable(f"Redis: {type(exc).__name__}") from exc
    finally:
        client.close()
    entry_id = result[-2]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def connect_sync(url: str, timeout: float) -> Any:
    """A synchronous client for the CLI, for the same URLs as connect()."""
    import redis

    common = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    parsed = urlparse(url)
    if "+sentinel" in parsed.scheme:
        from redis.sentinel import Sentinel

        netloc = parsed.netloc.rpartition("@")[2]
        hosts = [(h.rpartition(":")[0], int(h.rpartition(":")[2] or 26379))
                 for h in netloc.split(",")]  # fmt: skip
        parts = [p for p in parsed.path.split("/") if p]
        return Sentinel(hosts, **common).master_for(parts[0])
    if "+cluster" in parsed.scheme:
        from redis.cluster import RedisCluster

        scheme = "rediss" if parsed.scheme.startswith("rediss") else "redis"
        return RedisCluster.from_url(f"{scheme}://{parsed.netloc}{parsed.path}", **common)
    return redis.Redis.from_url(url, **common)


def apply_change(
    store: Any, entry: dict[str, str], host: str, reinstate: Callable[[int], None] | None = None
) -> bool:
    """Apply one admin stream entry to this host's store (and, for a reinstatement, lift the
    guard's flag in this host's quota slot with `reinstate(slot)`); False when it was this
    host's own (already applied) or names a practitioner this host does not know."""
    from service.store import CredentialRecord, StoreError

    if entry.get("origin") == host:
        return False
    op, pid = entry.get("op"), entry.get("practitioner", "")
    try:
        if op == "practitioner":
            changes = json.loads(entry["changes"])
            event = {**json.loads(entry.get("event", "{}")), "via": f"cluster ({entry['origin']})"}
            record = store.update_practitioner(pid, event=event, **{
                k: v for k, v in changes.items() if k in PRACTITIONER_FIELDS})  # fmt: skip
            if changes.get("status") == "active" and reinstate is not None and record.slot >= 0:
                reinstate(record.slot)
        elif op == "token":
            with contextlib.suppress(StoreError):  # already there
                store.add_credential(CredentialRecord.from_bytes(entry["credential"].encode()))
        elif op == "revoke":
            store.revoke_credentials(pid)
            event = {**json.loads(entry.get("event", "{}")), "via": f"cluster ({entry['origin']})"}
            with contextlib.suppress(KeyError):
                store.add_history(pid, event)
        elif op == "suspend":  # by the harvest guard, on another host
            record = store.practitioner(pid)
            if record is not None and record.status != "suspended":
                store.update_practitioner(
                    pid, status="suspended", suspension_reason=entry.get("reason", GUARD_REASON),
                    event={"by": entry.get("by", "harvest guard"), "action": "suspended",
                           "reason": entry.get("reason", ""), "via": "cluster"},
                )  # fmt: skip
        else:
            log.warning("unknown admin change %r ignored", op)
            return False
    except KeyError:
        return False
    return True


async def follow_admin(
    backend: Backend,
    store: Any,
    cursor_path: Any,
    stop: asyncio.Event,
    reinstate: Callable[[int], None] | None = None,
) -> None:
    """Apply the admin stream to `store` from the saved cursor until `stop`."""
    try:
        after = cursor_path.read_text().strip() or "0"
    except OSError:
        after = "0"
    while not stop.is_set():
        try:
            entries = await backend.read_admin(after, block_ms=ADMIN_BLOCK_MS)
        except BackendUnavailable:
            await asyncio.sleep(0.5)
            continue
        for entry_id, entry in entries:
            apply_change(store, entry, backend.host, reinstate)
            after = entry_id
        if entries:
            tmp = cursor_path.with_suffix(".tmp")
            tmp.write_text(after)
            os.replace(tmp, cursor_path)


def sync_backend(settings: ClusterSettings) -> Backend:
    """The sync process's Redis: its XREAD waits up to ADMIN_BLOCK_MS for a change, so a socket
    timeout shorter than that would end every quiet wait in a timeout and call Redis dead."""
    return Backend(replace(settings, timeout_ms=max(settings.timeout_ms, ADMIN_BLOCK_MS + 1000)))


def run_sync(
    data_dir: str,
    settings: ClusterSettings,
    store_settings: Any,
    snapshot_settings: Any = None,
    pepper_file: str | None = None,
    baselines: bool = False,
) -> None:
    """The cluster sync process of a host (started by `covergate serve` with [cluster]): applies
    every host's admin changes to this host's store, serves the cluster's active rights
    generation (service.snapshots) and, with `baselines`, merges every host's baselines of a
    practitioner (service.shared_baselines)."""
    import signal
    from pathlib import Path

    from service.server import configure_logging
    from service.store import Store

    configure_logging()
    directory = Path(data_dir) / "cluster"
    directory.mkdir(mode=0o700, exist_ok=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        backend = sync_backend(settings)

        def reinstate(slot: int) -> None:
            from fastpath.quota import QuotaFile
            from service.quotas import quota_path

            quota = QuotaFile(quota_path(Path(data_dir)), slot + 1)
            try:
                quota.reinstate(slot)
            finally:
                quota.close()

        jobs = []
        merge_backend: Backend | None = None
        if snapshot_settings is not None and snapshot_settings.public_key:
            from fastpath.rules import Keys
            from service import snapshots
            from service.config import PepperError, load_pepper

            try:
                fingerprint = Keys(load_pepper(Path(data_dir), pepper_file)).fingerprint
            except PepperError as exc:
                log.error("rights snapshots not followed: %s", exc)
            else:
                jobs.append(snapshots.follow_active(
                    backend, Path(data_dir), snapshot_settings.public_key, fingerprint,
                    snapshot_settings.source, stop,
                ))  # fmt: skip
        with Store(Path(data_dir), store_settings) as store:
            if baselines:
                from service.clock import ParisClock
                from service.shared_baselines import BaselineSync

                clock = ParisClock()
                # Its own connection and circuit: a slow merge never holds up admin changes.
                merge_backend = Backend(replace(settings, timeout_ms=max(settings.timeout_ms,
                                                                         1000)))  # fmt: skip
                merger = BaselineSync(
                    Path(data_dir), merge_backend,
                    lambda: {r.slot: r.practitioner_id for r in store.practitioners()
                             if r.slot >= 0},
                    settings.baseline_interval_seconds,
                )  # fmt: skip
                jobs.append(merger.run(stop, lambda: clock.now()[0]))
            log.info("cluster sync: applying every host's admin changes from %s as host %s",
                     redacted(settings.redis), backend.host)  # fmt: skip
            await asyncio.gather(
                follow_admin(backend, store, directory / "admin.cursor", stop, reinstate), *jobs
            )
        await backend.close()
        if merge_backend is not None:
            await merge_backend.close()

    asyncio.run(main())


def redacted(url: str) -> str:
    """The Redis URL without its password, for logs."""
    parsed = urlparse(url)
    if "@" not in parsed.netloc:
        return url
    return url.replace(parsed.netloc, "***@" + parsed.netloc.rpartition("@")[2], 1)

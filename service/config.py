"""Configuration: defaults, the TOML file (`--config`), and where the data dir and pepper live.

Every setting has a safe default so that `covergate serve --insecure` works with no file at all.
"""

from __future__ import annotations

import os
import secrets
import sys
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fastpath.baselines import SIGNALS, BaselineProfile
from fastpath.quota import QuotaProfile
from fastpath.rules import DOMAIN_CODES
from service.cluster import ClusterSettings

# Profession -> care domains it may check (CSV codes). Overridable under [professions.NAME].
DEFAULT_PROFESSION_DOMAINS: dict[str, tuple[str, ...]] = {
    "pharmacist": ("PHAR",),
    "physician": ("MEDE", "LABO", "RADI", "AUXM"),
    "dentist": ("DENT", "RADI"),
    "optician": ("OPTI",),
    "audiologist": ("AUDI",),
    "laboratory": ("LABO",),
    "radiology": ("RADI",),
    "paramedical": ("AUXM",),
    "hospital": ("HOSP", "MEDE", "PHAR", "LABO", "RADI", "DENT", "AUXM", "TRAN"),
    "transport": ("TRAN",),
}
PROFESSIONS: tuple[str, ...] = tuple(DEFAULT_PROFESSION_DOMAINS)


# Default quota profile per profession, over QuotaSettings' base values. A pharmacy sees a few
# hundred patients a day and checks some of them several times; a hospital credential serves a
# whole admissions desk. Overridable under [professions.NAME.quota] and per practitioner.
DEFAULT_PROFESSION_QUOTAS: dict[str, dict[str, int]] = {
    "pharmacist": {"rate_per_minute": 60, "burst": 40, "daily_limit": 3000, "distinct_limit": 1500},
    "physician": {"rate_per_minute": 20, "burst": 20, "daily_limit": 600, "distinct_limit": 300},
    "dentist": {"rate_per_minute": 20, "burst": 20, "daily_limit": 400, "distinct_limit": 200},
    "optician": {"rate_per_minute": 20, "burst": 20, "daily_limit": 400, "distinct_limit": 200},
    "audiologist": {"rate_per_minute": 20, "burst": 20, "daily_limit": 300, "distinct_limit": 150},
    "laboratory": {"rate_per_minute": 120, "burst": 60, "daily_limit": 6000, "distinct_limit": 3000},  # noqa: E501
    "radiology": {"rate_per_minute": 60, "burst": 40, "daily_limit": 2000, "distinct_limit": 1000},
    "paramedical": {"rate_per_minute": 20, "burst": 20, "daily_limit": 300, "distinct_limit": 150},
    "hospital": {"rate_per_minute": 300, "burst": 150, "daily_limit": 20000, "distinct_limit": 3000},  # noqa: E501
    "transport": {"rate_per_minute": 20, "burst": 20, "daily_limit": 300, "distinct_limit": 150},
}  # fmt: skip


# Per-profession baselines over BaselineSettings' base values (fastpath.baselines). Each signal
# is measured against the practitioner's own past, so one set of values fits most professions.
DEFAULT_PROFESSION_BASELINES: dict[str, dict[str, int]] = {}


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    workers: int = 0  # 0: one per core
    max_batch_items: int = 500
    max_message_bytes: int = 1 << 20
    shutdown_grace_seconds: float = 10.0
    attestation_ttl_seconds: int = 7 * 86400
    readiness_poll_seconds: float = 1.0
    # -- how long a connection may live (grpc channel args; see README, "How the server bounds
    # connections"). Practitioner software keeps one connection open all day, often through a
    # load balancer or NAT that silently drops idle flows after 5-10 minutes (350 s on some
    # cloud balancers): closing an idle connection ourselves, with a GOAWAY, at 5 minutes makes
    # the client reconnect cleanly instead of finding a dead socket on its next check.
    max_connection_idle_seconds: float = 300.0
    # Every connection is retired after 15 minutes (grpc adds +-10% jitter), calls in flight
    # getting a 30 s grace. Workers share the port with SO_REUSEPORT, which spreads
    # connections, not calls: without an age a long-lived connection stays pinned to one worker
    # (or one host behind a balancer) forever. The grace is also the bound on a call that never
    # completes, such as a unary request whose message is never fully sent: it ends at
    # age + grace at the latest.
    max_connection_age_seconds: float = 900.0
    max_connection_age_grace_seconds: float = 30.0
    # Keepalive enforcement: a client may ping at most every 30 s when no data flows (common
    # client keepalive settings are 30-60 s, enough to keep a balancer's or NAT's flow alive;
    # grpc's own default minimum, 5 min, would punish them). Pings are allowed without calls,
    # since the idle limit above closes such a connection anyway. A client pinging more often
    # gets 2 strikes, then GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
    keepalive_min_ping_interval_seconds: float = 30.0
    keepalive_max_ping_strikes: int = 2
    keepalive_permit_without_calls: bool = True
    # Concurrent calls on one connection: far above what practitioner software needs (a few at
    # a time), low enough that one connection cannot queue thousands of calls on a worker.
    max_concurrent_streams: int = 256
    # A connection must finish its HTTP/2 (and TLS) handshake within this time.
    handshake_timeout_seconds: float = 20.0
    # Compressed requests (gzip, deflate). Off: they are refused with UNIMPLEMENTED (and the
    # server says `grpc-accept-encoding: identity`), so no work is spent inflating a request
    # before its credential and quota are checked, and a corrupt compressed message cannot
    # draw an INTERNAL from grpc. A check is ~60 bytes (per batch item): compression buys nothing.
    accept_compressed_requests: bool = False


@dataclass(frozen=True)
class TelemetrySettings:
    # The audit spool (service.spool): every lookup's span is written here before its answer
    # leaves the worker. "": DIR/spool.
    spool_dir: str = ""
    spool_max_bytes: int = 1 << 30
    # When the spool is full: "refuse" new lookups (UNAVAILABLE, AUDIT_BACKLOG), or "drop" spans
    # (an explicit opt-in, logged loudly; the gap is recorded once there is room again).
    when_full: str = "refuse"
    spool_segment_bytes: int = 8 << 20


@dataclass(frozen=True)
class SnapshotSettings:
    # The Ed25519 public key (base64) a fetched generation's manifest must verify with; its
    # private half stays outside every data dir (`covergate snapshot keygen`).
    public_key: str = ""
    # Where generations are fetched from: a directory or an http(s) URL holding <N>/ and `latest`.
    source: str = ""


@dataclass(frozen=True)
class StoreSettings:
    map_size: int = 32 << 30  # virtual: the file only grows as data is written
    max_readers: int = 2048
    # Fault the whole rights file into each worker's map before it serves (store.prefault): no
    # page fault, nor disk read, in the first lookups, at the cost of reading the file at start.
    prefault: bool = False


@dataclass(frozen=True)
class AuthSettings:
    # Credentials accepted: "token" (authorization: Bearer), "certificate" (mTLS client cert).
    methods: list[str] = field(default_factory=lambda: ["token", "certificate"])
    # Refuse client certificates whose fingerprint is not registered for their practitioner.
    pin_certificates: bool = False


@dataclass(frozen=True)
class QuotaSettings:
    """Base quota values; profession defaults, then practitioner overrides, apply on top. The
    defaults are QuotaProfile's, the one place they are written."""

    rate_per_minute: int = QuotaProfile.rate_per_minute
    burst: int = QuotaProfile.burst
    daily_limit: int = QuotaProfile.daily_limit
    distinct_limit: int = QuotaProfile.distinct_limit
    guard_window: int = QuotaProfile.guard_window
    guard_min_lookups: int = QuotaProfile.guard_min_lookups
    guard_bad_percent: int = QuotaProfile.guard_bad_percent
    shadow: list[str] = field(default_factory=list)  # rules in shadow mode: rate, daily, ...
    # false: no quota or harvest guard at all (benchmark baselines only; logged loudly)
    enabled: bool = True
    # Room in the shared quota file (32 KiB a practitioner, sparse); it grows to fit every
    # practitioner the store has given a slot, in steps of 64.
    slots: int = 64


@dataclass(frozen=True)
class BaselineSettings:
    """[baselines]: each practitioner's own past (fastpath.baselines). Signals run in shadow
    (traced and counted) unless `enforce` lists signals that, all raised the same day, suspend
    the practitioner; profession defaults, then [professions.NAME.baselines], apply on top."""

    enabled: bool = True
    enforce: list[str] = field(default_factory=list)
    learn_days: int = BaselineProfile.learn_days
    min_lookups: int = BaselineProfile.min_lookups
    new_share_percent: int = BaselineProfile.new_share_percent
    share_margin: int = BaselineProfile.share_margin
    new_min: int = BaselineProfile.new_min
    new_mult_percent: int = BaselineProfile.new_mult_percent
    sigma: int = BaselineProfile.sigma
    volume_min: int = BaselineProfile.volume_min
    volume_mult_percent: int = BaselineProfile.volume_mult_percent
    off_permille: int = BaselineProfile.off_permille
    off_min: int = BaselineProfile.off_min
    share_sigma: int = BaselineProfile.share_sigma
    excess_min: int = BaselineProfile.excess_min
    excess_sigma: int = BaselineProfile.excess_sigma
    excess_share_sigma: int = BaselineProfile.excess_share_sigma
    excess_margin: int = BaselineProfile.excess_margin


BASELINE_FIELDS = (
    *(f for f in BaselineProfile.__dataclass_fields__ if f not in ("packed", "enforce")),
    "enforce",
)


QUOTA_FIELDS = (
    "rate_per_minute", "burst", "daily_limit", "distinct_limit",
    "guard_window", "guard_min_lookups", "guard_bad_percent", "shadow",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    snapshots: SnapshotSettings = field(default_factory=SnapshotSettings)
    profession_domains: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_PROFESSION_DOMAINS)
    )
    profession_quotas: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PROFESSION_QUOTAS.items()}
    )
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    profession_baselines: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {k: dict(v) for k, v in DEFAULT_PROFESSION_BASELINES.items()}
    )

    def baseline_profile(self, profession: str) -> BaselineProfile | None:
        """The profession's baseline profile (None: [baselines] enabled = false)."""
        if not self.baselines.enabled:
            return None
        values = {name: getattr(self.baselines, name) for name in BASELINE_FIELDS}
        values.update(self.profession_baselines.get(profession, {}))
        enforce = 0
        for signal in values.pop("enforce"):
            enforce |= 1 << SIGNALS.index(signal)
        return BaselineProfile(enforce=enforce, **values)

    def quota_values(
        self, profession: str, overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Base values, then the profession's, then the practitioner's overrides."""
        values = {name: getattr(self.quota, name) for name in QUOTA_FIELDS}
        values.update(self.profession_quotas.get(profession, {}))
        values.update(overrides or {})
        return values


class ConfigError(Exception):
    """The configuration file is unreadable or holds an unknown or mistyped setting."""


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"[{name}] has no setting {key!r}")
        default = getattr(cls(), key)
        if type(default) is float and isinstance(value, int):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"[{name}] {key} must be a {type(default).__name__}")
        values[key] = value
    return replace(cls(), **values)


# grpc takes durations as int milliseconds: a setting must fit in 2**31 - 1 ms (24.8 days).
_MAX_SECONDS = (2**31 - 1) / 1000
_DURATIONS = (
    "shutdown_grace_seconds", "readiness_poll_seconds", "max_connection_idle_seconds",
    "max_connection_age_seconds", "max_connection_age_grace_seconds",
    "keepalive_min_ping_interval_seconds", "handshake_timeout_seconds",
)  # fmt: skip
_COUNTS = (
    "max_batch_items", "max_message_bytes", "attestation_ttl_seconds",
    "keepalive_max_ping_strikes", "max_concurrent_streams",
)  # fmt: skip


def check_server_settings(settings: ServerSettings) -> ServerSettings:
    """[server] values within what they mean (types are checked by _section)."""
    for name in _DURATIONS:
        value = getattr(settings, name)
        if not (value > 0 and value <= _MAX_SECONDS):  # also refuses nan and inf
            raise ConfigError(f"[server] {name} must be above 0 and at most {_MAX_SECONDS:.0f}")
    for name in _COUNTS:
        if getattr(settings, name) < 1:
            raise ConfigError(f"[server] {name} must be a positive integer")
    if settings.workers < 0:
        raise ConfigError("[server] workers must be 0 (one per core) or more")
    if settings.max_message_bytes > (2**31 - 1) // 4:  # responses may be 4x: an int32 in grpc
        raise ConfigError(f"[server] max_message_bytes must be at most {(2**31 - 1) // 4}")
    return settings


def check_quota_overrides(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Quota overrides (config table, CLI or import): known names, right types."""
    for key, value in values.items():
        if key not in QUOTA_FIELDS:
            raise ConfigError(f"{where} has no quota setting {key!r}")
        if key == "shadow":
            if not isinstance(value, list) or not all(
                v in ("rate", "daily", "distinct", "guard") for v in value
            ):
                raise ConfigError(f"{where} shadow must list some of: rate, daily, distinct, guard")
        elif type(value) is not int or value < 1:
            raise ConfigError(f"{where} {key} must be a positive integer")
    return values


def check_baselines(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Baseline settings (the [baselines] table or a profession's): known names, right types and
    ranges (BaselineProfile checks the ranges)."""
    for key, value in values.items():
        if key not in BASELINE_FIELDS:
            raise ConfigError(f"{where} has no baseline setting {key!r}")
        if key == "enforce":
            if not isinstance(value, list) or not all(v in SIGNALS for v in value):
                raise ConfigError(f"{where} enforce must list some of: {', '.join(SIGNALS)}")
        elif type(value) is not int:
            raise ConfigError(f"{where} {key} must be an integer")
    try:
        BaselineProfile(**{k: v for k, v in values.items() if k != "enforce"})
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return values


def check_cluster(cluster: ClusterSettings) -> None:
    if cluster.redis and cluster.redis.split("://", 1)[0] not in (
        "redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster",
        "rediss+cluster",
    ):  # fmt: skip
        raise ConfigError(
            "[cluster] redis must be a redis://, rediss://, unix://, redis+sentinel:// or "
            "redis+cluster:// URL"
        )
    if not 0 < cluster.rate_lease_seconds <= 1.0:
        raise ConfigError("[cluster] rate_lease_seconds must be above 0 and at most 1")
    if not 1.0 <= cluster.credit_lease_seconds <= 300:
        raise ConfigError("[cluster] credit_lease_seconds must be from 1 to 300")
    if not 1 <= cluster.block_max <= 1024 or not 1 <= cluster.timeout_ms <= 5000:
        raise ConfigError("[cluster] block_max from 1 to 1024, timeout_ms from 1 to 5000")
    if not 0.01 <= cluster.report_interval_seconds <= 5:
        raise ConfigError("[cluster] report_interval_seconds from 0.01 to 5")
    if not 0.05 <= cluster.baseline_interval_seconds <= 300:
        raise ConfigError("[cluster] baseline_interval_seconds from 0.05 to 300")


def load_config(path: str | os.PathLike[str] | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    unknown = set(raw) - {
        "server", "store", "auth", "quota", "telemetry", "cluster", "snapshots", "professions",
        "baselines",
    }  # fmt: skip
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    domains = dict(DEFAULT_PROFESSION_DOMAINS)
    quotas = {k: dict(v) for k, v in DEFAULT_PROFESSION_QUOTAS.items()}
    profession_baselines = {k: dict(v) for k, v in DEFAULT_PROFESSION_BASELINES.items()}
    professions = raw.get("professions", {})
    if not isinstance(professions, dict):
        raise ConfigError("[professions] must hold one table per profession")
    for name, section in professions.items():
        if name not in domains:
            raise ConfigError(f"[professions.{name}] is not a known profession")
        if not isinstance(section, dict):
            raise ConfigError(f"[professions.{name}] must be a table")
        unknown_keys = set(section) - {"domains", "quota", "baselines"}
        if unknown_keys:
            raise ConfigError(
                f"[professions.{name}] has no setting {', '.join(sorted(unknown_keys))}"
            )
        if "domains" in section:
            codes = section["domains"]
            if not isinstance(codes, list) or not all(c in DOMAIN_CODES for c in codes):
                raise ConfigError(
                    f"[professions.{name}] domains must be a list of: {', '.join(DOMAIN_CODES)}"
                )
            domains[name] = tuple(codes)
        if "quota" in section:
            if not isinstance(section["quota"], dict):
                raise ConfigError(f"[professions.{name}.quota] must be a table")
            quotas[name].update(
                check_quota_overrides(section["quota"], f"[professions.{name}.quota]")
            )
        if "baselines" in section:
            where = f"[professions.{name}.baselines]"
            if not isinstance(section["baselines"], dict):
                raise ConfigError(f"{where} must be a table")
            profession_baselines.setdefault(name, {}).update(
                check_baselines(section["baselines"], where)
            )
    config = Config(
        server=check_server_settings(_section(ServerSettings, raw.get("server", {}), "server")),
        store=_section(StoreSettings, raw.get("store", {}), "store"),
        auth=_section(AuthSettings, raw.get("auth", {}), "auth"),
        quota=_section(QuotaSettings, raw.get("quota", {}), "quota"),
        telemetry=_section(TelemetrySettings, raw.get("telemetry", {}), "telemetry"),
        cluster=_section(ClusterSettings, raw.get("cluster", {}), "cluster"),
        snapshots=_section(SnapshotSettings, raw.get("snapshots", {}), "snapshots"),
        profession_domains=domains,
        profession_quotas=quotas,
        baselines=_section(BaselineSettings, raw.get("baselines", {}), "baselines"),
        profession_baselines=profession_baselines,
    )
    base = config.baselines
    check_baselines({k: getattr(base, k) for k in BASELINE_FIELDS}, "[baselines]")
    for name in config.profession_domains:
        try:
            config.baseline_profile(name)
        except ValueError as exc:
            raise ConfigError(f"[professions.{name}.baselines]: {exc}") from None
    bad_methods = set(config.auth.methods) - {"token", "certificate"}
    if bad_methods or not config.auth.methods:
        raise ConfigError("[auth] methods must list token and/or certificate")
    check_quota_overrides({k: getattr(config.quota, k) for k in QUOTA_FIELDS}, "[quota]")
    check_cluster(config.cluster)
    if config.telemetry.when_full not in ("refuse", "drop"):
        raise ConfigError('[telemetry] when_full must be "refuse" or "drop"')
    if config.telemetry.spool_max_bytes < 4096 or config.telemetry.spool_segment_bytes < 4096:
        raise ConfigError("[telemetry] spool_max_bytes and spool_segment_bytes: at least 4096")
    return config


# -- data dir and pepper ---------------------------------------------------------------------------

DEFAULT_DATA_DIR = "covergate-data"
PEPPER_BYTES = 32


def resolve_data_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("COVERGATE_DATA") or DEFAULT_DATA_DIR)


class PepperError(Exception):
    """No usable pepper: the keyed hashes cannot be computed."""


def load_pepper(data_dir: Path, pepper_file: str | None, *, create: bool = False) -> bytes:
    """The pepper from --pepper-file / COVERGATE_PEPPER_FILE, else DATA/pepper.

    With `create`, a missing DATA/pepper is generated (mode 0600) with a warning that production
    keeps it outside the data dir, so a copied data dir alone reveals nothing.
    """
    explicit = pepper_file or os.environ.get("COVERGATE_PEPPER_FILE")
    path = Path(explicit) if explicit else data_dir / "pepper"
    if path.exists():
        pepper = path.read_bytes().strip()
        try:
            pepper = bytes.fromhex(pepper.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise PepperError(f"pepper file {path} must hold hex") from None
        if not 16 <= len(pepper) <= 64:
            raise PepperError(f"pepper file {path} must hold 16 to 64 bytes of hex")
        return pepper
    if explicit or not create:
        raise PepperError(
            f"no pepper at {path}: pass --pepper-file or set COVERGATE_PEPPER_FILE"
            if explicit
            else f"no pepper at {path}: import data first, or pass --pepper-file"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    pepper = secrets.token_bytes(PEPPER_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pepper.hex() + "\n")
    print(
        f"covergate: created a new pepper in {path} (mode 0600). In production keep the pepper "
        "outside the data dir (--pepper-file / COVERGATE_PEPPER_FILE): together they reveal "
        "nothing, apart they are useless.",
        file=sys.stderr,
    )
    return pepper

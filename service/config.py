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

from fastpath.rules import DOMAIN_CODES

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


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    workers: int = 0  # 0: one per core
    max_batch_items: int = 500
    max_message_bytes: int = 1 << 20
    max_concurrent_streams: int = 256
    shutdown_grace_seconds: float = 10.0
    attestation_ttl_seconds: int = 7 * 86400
    readiness_poll_seconds: float = 1.0


@dataclass(frozen=True)
class StoreSettings:
    map_size: int = 32 << 30  # virtual: the file only grows as data is written
    max_readers: int = 2048


@dataclass(frozen=True)
class Config:
    server: ServerSettings = field(default_factory=ServerSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    profession_domains: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_PROFESSION_DOMAINS)
    )


class ConfigError(Exception):
    """The configuration file is unreadable or holds an unknown or mistyped setting."""


def _section(cls: type, raw: dict[str, Any], name: str) -> Any:
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


def load_config(path: str | os.PathLike[str] | None) -> Config:
    if path is None:
        return Config()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    unknown = set(raw) - {"server", "store", "professions"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    domains = dict(DEFAULT_PROFESSION_DOMAINS)
    professions = raw.get("professions", {})
    if not isinstance(professions, dict):
        raise ConfigError("[professions] must hold one table per profession")
    for name, section in professions.items():
        if name not in domains:
            raise ConfigError(f"[professions.{name}] is not a known profession")
        if not isinstance(section, dict):
            raise ConfigError(f"[professions.{name}] must be a table")
        unknown_keys = set(section) - {"domains"}
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
    return Config(
        server=_section(ServerSettings, raw.get("server", {}), "server"),
        store=_section(StoreSettings, raw.get("store", {}), "store"),
        profession_domains=domains,
    )


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

"""The servers a run compares: covergate and its baselines, each a name, a server command, an
environment and a CPU placement; on/off pairs (quotas, tracing, cluster) are variants too.

A variant is what the load hits; `bench.plan` pairs them into comparisons and goals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

COVERGATE = "covergate"
NOOP = "noop"
CONVENTIONAL = "conventional"

ALL_CORES = 0  # workers=0: one worker per core, like `covergate serve` by default

# Quotas stay on, as in production: every lookup is counted and checked. The limits are raised so
# that the load of the bench's single practitioner is never refused (GCRA's interval bottoms out
# at 1 ms, so the burst carries the excess); distinct beneficiaries are counted in shadow mode
# because the bench's sample is larger than the largest distinct limit the quota file can hold, and
# the harvest guard runs in shadow mode too: the mixes send their NO_MATCH and invalid shares from
# h2load processes of their own, and a burst of 40 of those in a row on a busy load core once
# suspended the bench's practitioner for every variant sharing the data dir. Shadow rules cost
# what enforced ones do (they are evaluated and traced), so the quota pairs still measure them.
# Later on/off pairs (quotas off, tracing on) are variants with another config or environment.
BENCH_CONFIG = """\
[professions.pharmacist.quota]
rate_per_minute = 60000
burst = 1000000000
daily_limit = 1000000000
distinct_limit = 3072
guard_bad_percent = 100
shadow = ["distinct", "guard"]
"""

# Placeholders in a variant's config, replaced by the run (Variant.config_text): this run's Redis
# and the variant's own audit spool directory.
REDIS_URL = "@redis_url@"
SPOOL_DIR = "@spool_dir@"


@dataclass(frozen=True)
class ServerContext:
    """What a server command needs to know about this run."""

    python: str
    covergate: str
    data_dir: Path
    workers: int
    redis_url: str | None = None
    config_path: Path | None = None
    spool_dir: Path | None = None


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    server: str  # COVERGATE, NOOP or CONVENTIONAL
    workers: int = 1  # ALL_CORES: as many as the machine has
    env: tuple[tuple[str, str], ...] = ()
    unset_env: tuple[str, ...] = ()
    # covergate --config TOML text (e.g. quota or tracing settings of a later variant), with
    # REDIS_URL and SPOOL_DIR placeholders the run fills in.
    config: str | None = None
    needs_redis: bool = False
    # A data dir of its own (a copy of the dataset's): its quota state is not shared with the
    # other variants' (a cluster host keeps its credit there).
    own_data: bool = False
    # Tracing on: the run starts an OTLP/gRPC receiver (bench.otlp_receiver) and points the
    # server at it with OTEL_EXPORTER_OTLP_ENDPOINT.
    needs_otlp: bool = False
    # Whether sampled answers must carry the right decisions (the no-op ceiling answers COVERED
    # to everything: only status and shape are checked for it).
    checks_decisions: bool = True

    def worker_count(self, cores: int) -> int:
        return self.workers or cores

    def config_text(self, ctx: ServerContext) -> str | None:
        """The config with this run's values in place of the placeholders."""
        if self.config is None:
            return None
        text = self.config
        for placeholder, value in ((REDIS_URL, ctx.redis_url), (SPOOL_DIR, ctx.spool_dir)):
            if placeholder in text:
                if value is None:
                    raise ValueError(f"{self.name}: no value for {placeholder} in its config")
                text = text.replace(placeholder, str(value))
        return text

    def command(self, ctx: ServerContext) -> list[str]:
        if self.server == COVERGATE:
            cmd = [
                ctx.covergate,
                "serve",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--workers",
                str(ctx.workers),
                "--data",
                str(ctx.data_dir),
            ]
            if ctx.config_path is not None:
                cmd += ["--config", str(ctx.config_path)]
            return cmd
        if self.server == NOOP:
            return [ctx.python, "-m", "bench.noop_server", "--workers", str(ctx.workers)]
        if self.server == CONVENTIONAL:
            if not ctx.redis_url:
                raise ValueError(f"{self.name} needs Redis")
            return [
                ctx.python,
                "-m",
                "bench.conventional_server",
                "--data",
                str(ctx.data_dir),
                "--workers",
                str(ctx.workers),
                "--redis",
                ctx.redis_url,
            ]
        raise ValueError(f"unknown server kind {self.server!r}")

    def environment(
        self, base: Mapping[str, str] | None = None, otlp_endpoint: str | None = None
    ) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        for name in (*self.unset_env, *TRACING_ENV):
            env.pop(name, None)
        env.update(self.env)
        if self.needs_otlp:
            if not otlp_endpoint:
                raise ValueError(f"{self.name} needs an OTLP receiver")
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp_endpoint
        env.setdefault("COVERGATE_LOG_LEVEL", "WARNING")
        return env


TRACING_CONFIG = f"""
[telemetry]
spool_dir = "{SPOOL_DIR}"
"""

CLUSTER_CONFIG = f"""
[cluster]
redis = "{REDIS_URL}"
"""

# Tracing is off unless a variant turns it on: the caller's environment must not decide.
TRACING_ENV = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "COVERGATE_TRACE_CONSOLE",
)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "covergate",
            "covergate, Cython fast path, 1 worker",
            COVERGATE,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG,
        ),
        Variant(
            "covergate-Nw",
            "covergate, Cython fast path, one worker per core",
            COVERGATE,
            workers=ALL_CORES,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG,
        ),
        Variant(
            "reference",
            "covergate with COVERGATE_NO_EXTENSIONS=1 (pure-Python reference gate), 1 worker",
            COVERGATE,
            env=(("COVERGATE_NO_EXTENSIONS", "1"),),
            unset_env=("COVERGATE_REQUIRE_EXTENSIONS",),
            config=BENCH_CONFIG,
        ),
        Variant(
            "covergate-tracing",
            "covergate, 1 worker, every lookup traced and exported to a live OTLP/gRPC receiver "
            "(through the audit spool, in a directory of its own)",
            COVERGATE,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG + TRACING_CONFIG,
            needs_otlp=True,
        ),
        Variant(
            "covergate-cluster",
            "covergate, 1 worker, [cluster] on this run's Redis (limits shared across hosts)",
            COVERGATE,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG + CLUSTER_CONFIG,
            needs_redis=True,
            own_data=True,
        ),
        Variant(
            "covergate-noquota",
            "covergate, 1 worker, quotas and the harvest guard off ([quota] enabled = false)",
            COVERGATE,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG + "\n[quota]\nenabled = false\n",
        ),
        Variant(
            "covergate-nobaselines",
            "covergate, 1 worker, per-practitioner baselines off ([baselines] enabled = false)",
            COVERGATE,
            env=(("COVERGATE_REQUIRE_EXTENSIONS", "1"),),
            config=BENCH_CONFIG + "\n[baselines]\nenabled = false\n",
        ),
        Variant(
            "noop",
            "no-op grpc.aio server from the same protos, constant valid answer (the ceiling)",
            NOOP,
            checks_decisions=False,
        ),
        Variant(
            "noop-Nw",
            "the no-op server with one worker per core (the ceiling of covergate-Nw)",
            NOOP,
            workers=ALL_CORES,
            checks_decisions=False,
        ),
        Variant(
            "conventional",
            "plain grpc.aio servicer: Python lookup (hashlib + py-lmdb + protobuf), Redis "
            "INCR+EXPIRE per lookup, one OpenTelemetry span per lookup",
            CONVENTIONAL,
            needs_redis=True,
        ),
        # A new on/off pair is a variant here and a Comparison in bench.plan naming it.
    )
}

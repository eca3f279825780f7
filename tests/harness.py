"""Test harness: synthetic identities and files, data dirs built through the real CLI, and a real
`covergate serve` process on an ephemeral loopback port.

Only synthetic data: NIRs are made up from a seeded generator and carry correct keys.
"""

from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from fastpath import rules
from service.importer import PRACTITIONER_COLUMNS, RIGHTS_COLUMNS

COVERGATE = str(Path(sys.executable).with_name("covergate"))


@dataclass(frozen=True)
class Identity:
    nir: str
    nir_key: str
    birth_date: str
    birth_rank: int

    def fields(self) -> dict[str, object]:
        return {
            "nir": self.nir,
            "nir_key": self.nir_key,
            "birth_date": self.birth_date,
            "birth_rank": self.birth_rank,
        }


def make_nir(rng: random.Random, *, corsica: str = "") -> str:
    sex = rng.choice("12")
    yy = f"{rng.randrange(100):02d}"
    mm = f"{rng.randrange(1, 13):02d}"
    dept = corsica or f"{rng.randrange(1, 96):02d}"
    commune = f"{rng.randrange(1, 999):03d}"
    order = f"{rng.randrange(1, 999):03d}"
    return sex + yy + mm + dept + commune + order


def make_identity(
    rng: random.Random, *, corsica: str = "", lunar: bool = False, rank: int = 1
) -> Identity:
    nir = make_nir(rng, corsica=corsica)
    year = 1930 + rng.randrange(90)
    if lunar:
        birth = f"{year}0000"
    else:
        month = rng.randrange(1, 13)
        birth = f"{year}{month:02d}{rng.randrange(1, 29):02d}"
    return Identity(nir, f"{rules.nir_key_for(nir):02d}", birth, rank)


@dataclass(frozen=True)
class Right:
    identity: Identity
    amc_number: str
    domain: str
    member_number: str = ""
    rate_percent: int = 100
    convention_type: str = "TP01"
    start_date: str = "20200101"
    end_date: str = "20991231"

    def row(self) -> list[str]:
        i = self.identity
        return [
            i.nir, i.nir_key, i.birth_date, str(i.birth_rank), self.amc_number,
            self.member_number, self.domain, str(self.rate_percent), self.convention_type,
            self.start_date, self.end_date,
        ]  # fmt: skip


def write_rights_csv(path: Path, rights: Iterable[Right]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(RIGHTS_COLUMNS)
        for r in rights:
            w.writerow(r.row())
    return path


@dataclass(frozen=True)
class PractitionerRow:
    practitioner_id: str
    profession: str
    amc_numbers: Sequence[str]
    status: str = "active"


def write_practitioners_csv(path: Path, practitioners: Iterable[PractitionerRow]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(PRACTITIONER_COLUMNS)
        for p in practitioners:
            w.writerow([p.practitioner_id, p.profession, ";".join(p.amc_numbers), p.status])
    return path


def cli(
    *args: str, data_dir: Path | None = None, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `covergate` command."""
    full_env = dict(os.environ, **(env or {}))
    if data_dir is not None:
        full_env["COVERGATE_DATA"] = str(data_dir)
    proc = subprocess.run(
        [COVERGATE, *args], capture_output=True, text=True, env=full_env, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"covergate {' '.join(args[:2])} exited {proc.returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def create_token(data_dir: Path, subject: str, role: str = "practitioner") -> str:
    out = cli("token", "create", subject, "--role", role, data_dir=data_dir).stdout
    return out.strip().splitlines()[-1]


PHARMACY_AMC = "123456789"
OTHER_AMC = "987654321"
PHARMACIST_ID = "10001234567"
HOSPITAL_ID = "10007654321"
CLAIMS_ID = "900000001"


@dataclass
class Dataset:
    """A small synthetic dataset with known answers, loaded into a real data dir."""

    data_dir: Path
    covered: Identity
    not_covered: Identity
    twin: Identity  # same NIR and birth date as `covered`, rank 2, rights elsewhere
    corsican: Identity
    lunar: Identity
    member_number: str
    tokens: dict[str, str] = field(default_factory=dict)
    rights: list[Right] = field(default_factory=list)


def build_dataset(tmp: Path, *, seed: int = 7, extra_beneficiaries: int = 50) -> Dataset:
    rng = random.Random(seed)
    data_dir = tmp / "data"
    covered = make_identity(rng)
    twin = Identity(covered.nir, covered.nir_key, covered.birth_date, 2)
    not_covered = make_identity(rng)
    corsican = make_identity(rng, corsica="2A")
    lunar = make_identity(rng, lunar=True)
    member = "M0012345"
    rights = [
        Right(
            covered,
            PHARMACY_AMC,
            "PHAR",
            member_number=member,
            rate_percent=100,
            convention_type="TP01",
        ),
        Right(
            covered,
            PHARMACY_AMC,
            "MEDE",
            member_number=member,
            rate_percent=70,
            convention_type="TP02",
        ),
        Right(twin, OTHER_AMC, "PHAR", member_number="M0099999", rate_percent=65),
        Right(not_covered, PHARMACY_AMC, "PHAR", start_date="20200101", end_date="20201231"),
        Right(corsican, PHARMACY_AMC, "PHAR", rate_percent=90, convention_type="CO2A"),
        Right(lunar, PHARMACY_AMC, "PHAR", convention_type="LUNA"),
    ]
    for _ in range(extra_beneficiaries):
        rights.append(Right(make_identity(rng), rng.choice((PHARMACY_AMC, OTHER_AMC)), "PHAR"))
    write_rights_csv(tmp / "rights.csv", rights)
    write_practitioners_csv(
        tmp / "practitioners.csv",
        [
            PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC, OTHER_AMC)),
            PractitionerRow(HOSPITAL_ID, "hospital", (PHARMACY_AMC, OTHER_AMC)),
        ],
    )
    cli("import", "practitioners", str(tmp / "practitioners.csv"), data_dir=data_dir)
    cli("import", "rights", str(tmp / "rights.csv"), data_dir=data_dir)
    ds = Dataset(data_dir, covered, not_covered, twin, corsican, lunar, member, rights=rights)
    ds.tokens["pharmacist"] = create_token(data_dir, PHARMACIST_ID)
    ds.tokens["hospital"] = create_token(data_dir, HOSPITAL_ID)
    ds.tokens["claims"] = create_token(data_dir, CLAIMS_ID, "claims")
    return ds


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason a refusal carries ("" when it carries none)."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


class RunningServer:
    """`covergate serve --insecure` on 127.0.0.1:<ephemeral>, stopped with SIGTERM."""

    def __init__(
        self,
        data_dir: Path,
        *,
        workers: int = 1,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        wait_serving: bool = True,
        log_path: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.credentials = credentials
        full_env = dict(os.environ, COVERGATE_DATA=str(data_dir), **(env or {}))
        self.log_path = (
            log_path or data_dir.parent / f"server-{os.getpid()}-{time.monotonic_ns()}.log"
        )
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [COVERGATE, "serve", "--listen", f"{listen_host}:0", "--workers", str(workers), *args]
            + ([] if any(a.startswith("--tls") for a in args) else ["--insecure"]),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=full_env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(rf"serving on {re.escape(listen_host)}:(\d+)", line)
        if not match:
            self.stop()
            raise AssertionError(f"server did not start: {line!r}\n{self.log()}")
        self.port = int(match.group(1))
        self.target = f"{listen_host}:{self.port}"
        if wait_serving:
            self.wait_health(health_pb2.HealthCheckResponse.SERVING)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials)
        return grpc.insecure_channel(self.target)

    def health(self, service: str = "") -> int:
        with self.channel() as ch:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )

    def wait_health(self, status: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.health() == status:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"health never reached {status}\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """A throwaway `redis-server` on a free loopback port, for tests that kill (SIGKILL), freeze
    (SIGSTOP) or flush it. No persistence unless `appendonly`."""

    def __init__(self, tmp: Path, *, appendonly: bool = False) -> None:
        import shutil
        import socket

        binary = shutil.which("redis-server")
        if binary is None:
            import pytest

            pytest.skip("redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tmp
        self._cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--dir", str(tmp),
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self._cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def ping(self) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.3) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

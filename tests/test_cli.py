"""The `covergate` command line, run as a real process: data dir and config options, the pepper,
tokens, practitioner administration, `serve` refusing plaintext by default, and `covergate demo`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import re
import shlex
import stat
import subprocess
import tempfile
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    CLAIMS_ID,
    COVERGATE,
    HOSPITAL_ID,
    OTHER_AMC,
    PHARMACIST_ID,
    PHARMACY_AMC,
    PractitionerRow,
    Right,
    RunningServer,
    cli,
    make_identity,
    write_practitioners_csv,
    write_rights_csv,
)

from fastpath import rules
from fastpath.rules import Keys
from service import importer
from service.auth import INVALID, SUSPENDED, Authenticator, AuthFailure, create_token
from service.config import DEFAULT_PROFESSION_DOMAINS, load_pepper
from service.store import Store

TOKEN_RE = re.compile(r"cg1\.[0-9a-f]{16}\.[A-Za-z0-9_-]{43}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No COVERGATE_* from outside, and a scratch cwd so a default ./covergate-data stays here."""
    for name in ("COVERGATE_PEPPER_FILE", "COVERGATE_DATA", "COVERGATE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def practitioners_file(tmp_path: Path, *rows: PractitionerRow) -> Path:
    rows = rows or (
        PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC, OTHER_AMC)),
        PractitionerRow(HOSPITAL_ID, "hospital", (PHARMACY_AMC,)),
    )
    return write_practitioners_csv(tmp_path / "practitioners.csv", rows)


def rights_file(tmp_path: Path, n: int = 5, seed: int = 3) -> tuple[Path, list[Right]]:
    import random

    rng = random.Random(seed)
    rights = [
        Right(make_identity(rng), PHARMACY_AMC, "PHAR", member_number=f"M{i:07d}") for i in range(n)
    ]
    return write_rights_csv(tmp_path / "rights.csv", rights), rights


def write_pepper(path: Path, pepper: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pepper.hex() + "\n")
    return path


def storage_keys(data_dir: Path) -> set[bytes]:
    with Store(data_dir) as store, store.env.begin(db=store.rights_db) as txn:
        return {bytes(k) for k, _ in txn.cursor()}


def expected_keys(rights: list[Right], pepper: bytes) -> set[bytes]:
    keys = Keys(pepper)
    return {
        keys.storage_key(
            rules.identity_bytes(r.identity.nir, r.identity.birth_date, r.identity.birth_rank)
        )
        for r in rights
    }


@contextlib.contextmanager
def serving(data_dir: Path, **kwargs: Any) -> Iterator[RunningServer]:
    """harness.RunningServer, also closing the pipe it reads the banner from."""
    server = RunningServer(data_dir, **kwargs)
    try:
        yield server
    finally:
        server.stop()
        if server.proc.stdout is not None:
            server.proc.stdout.close()


def raw_data_files(data_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in data_dir.rglob("*") if p.is_file()}


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# -- --data / COVERGATE_DATA -----------------------------------------------------------------------


def test_data_option(tmp_path: Path) -> None:
    data = tmp_path / "by-option"
    cli("import", "practitioners", str(practitioners_file(tmp_path)), "--data", str(data))
    assert (data / "store" / "data.mdb").is_file()
    assert not (tmp_path / "covergate-data").exists()
    out = cli("practitioner", "show", PHARMACIST_ID, "--data", str(data)).stdout
    assert f"practitioner  {PHARMACIST_ID}" in out


def test_data_environment_variable(tmp_path: Path) -> None:
    data = tmp_path / "by-env"
    cli(
        "import",
        "practitioners",
        str(practitioners_file(tmp_path)),
        env={"COVERGATE_DATA": str(data)},
    )
    assert (data / "store" / "data.mdb").is_file()
    assert not (tmp_path / "covergate-data").exists()
    assert "pharmacist" in cli("practitioner", "show", PHARMACIST_ID, data_dir=data).stdout


def test_data_option_wins_over_the_environment(tmp_path: Path) -> None:
    chosen, ignored = tmp_path / "chosen", tmp_path / "ignored"
    cli(
        "import",
        "practitioners",
        str(practitioners_file(tmp_path)),
        "--data",
        str(chosen),
        data_dir=ignored,
    )
    assert (chosen / "store").is_dir()
    assert not ignored.exists()


def test_default_data_dir_is_relative_to_cwd(tmp_path: Path) -> None:
    cli("import", "practitioners", str(practitioners_file(tmp_path)))
    assert (tmp_path / "covergate-data" / "store" / "data.mdb").is_file()


# -- --config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nlisten_adress = '0.0.0.0:1'\n", "[server] has no setting 'listen_adress'"),
        ("[store]\nmapsize = 1\n", "[store] has no setting 'mapsize'"),
        ("[serveur]\nworkers = 2\n", "unknown config section(s): serveur"),
        ("workers = 2\n", "unknown config section(s): workers"),
        ("[server]\nworkers = '4'\n", "[server] workers must be a int"),
        (
            "[professions.nurse]\ndomains = ['AUXM']\n",
            "[professions.nurse] is not a known profession",
        ),
        ("[server\n", "cannot read config"),
    ],
    ids=["server-key", "store-key", "section", "top-level-key", "type", "profession", "syntax"],
)
def test_bad_config_fails_with_a_clear_message(tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "covergate.toml"
    config.write_text(toml)
    data = tmp_path / "data"
    proc = cli(
        "import",
        "practitioners",
        str(practitioners_file(tmp_path)),
        "--config",
        str(config),
        "--data",
        str(data),
        check=False,
    )
    assert proc.returncode == 1
    assert f"covergate: {message}" in proc.stderr
    no_traceback(proc)
    assert not (data / "store").exists()


@pytest.mark.parametrize(
    ("toml", "word"),
    [
        ("[professions.pharmacist]\ndomian = ['PHAR']\n", "domian"),  # typo of `domains`
        ("[professions]\npharmacist = ['PHAR']\n", "pharmacist"),  # not a table
    ],
    ids=["unknown-key", "not-a-table"],
)
def test_bad_professions_section_fails_with_a_clear_message(
    tmp_path: Path, toml: str, word: str
) -> None:
    config = tmp_path / "covergate.toml"
    config.write_text(toml)
    proc = cli(
        "practitioner",
        "show",
        PHARMACIST_ID,
        "--config",
        str(config),
        "--data",
        str(tmp_path / "data"),
        check=False,
    )
    assert proc.returncode == 1, "a mistyped professions setting is silently ignored"
    assert word in proc.stderr
    no_traceback(proc)


def test_valid_config_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "covergate.toml"
    config.write_text(
        "[server]\nmax_batch_items = 100\nshutdown_grace_seconds = 3\n"
        "[store]\nmap_size = 1073741824\n"
        "[professions.optician]\ndomains = ['OPTI', 'AUDI']\n"
    )
    cli(
        "import",
        "practitioners",
        str(practitioners_file(tmp_path)),
        "--config",
        str(config),
        "--data",
        str(tmp_path / "data"),
    )


# -- the pepper ------------------------------------------------------------------------------------


def test_first_import_creates_a_private_pepper_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path, rights = rights_file(tmp_path)
    first = cli("import", "rights", str(path), data_dir=data)
    pepper = data / "pepper"
    assert pepper.is_file()
    assert stat.S_IMODE(pepper.stat().st_mode) == 0o600
    assert "created a new pepper" in first.stderr
    assert "production" in first.stderr and "--pepper-file" in first.stderr
    assert storage_keys(data) == expected_keys(rights, load_pepper(data, None))
    content = pepper.read_bytes()
    again = cli("import", "rights", str(path), data_dir=data)
    assert "created a new pepper" not in again.stderr
    assert pepper.read_bytes() == content


@pytest.mark.parametrize("how", ["option", "environment"])
def test_pepper_file_is_used_and_no_data_pepper_is_created(tmp_path: Path, how: str) -> None:
    data = tmp_path / "data"
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    pepper = bytes(range(7, 39))
    pepper_file = write_pepper(secret_dir / "pepper.hex", pepper)
    path, rights = rights_file(tmp_path)
    if how == "option":
        proc = cli("import", "rights", str(path), "--pepper-file", str(pepper_file), data_dir=data)
    else:
        proc = cli(
            "import",
            "rights",
            str(path),
            data_dir=data,
            env={"COVERGATE_PEPPER_FILE": str(pepper_file)},
        )
    assert "created a new pepper" not in proc.stderr
    assert not (data / "pepper").exists()
    assert storage_keys(data) == expected_keys(rights, pepper)
    with Store(data) as store:
        assert store.pepper_fingerprint() == Keys(pepper).fingerprint
    # Later commands without the pepper file don't invent one either.
    cli("import", "practitioners", str(practitioners_file(tmp_path)), data_dir=data)
    assert not (data / "pepper").exists()
    assert not list(data.rglob("pepper"))


def test_missing_pepper_file_fails_without_creating_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    path, _ = rights_file(tmp_path)
    proc = cli(
        "import",
        "rights",
        str(path),
        "--pepper-file",
        str(tmp_path / "nope"),
        data_dir=data,
        check=False,
    )
    assert proc.returncode == 1
    assert "covergate: no pepper at" in proc.stderr
    no_traceback(proc)
    assert not (data / "pepper").exists()
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("content", [b"not hex at all\n", b"abcd\n"], ids=["not-hex", "too-short"])
def test_unusable_pepper_file_fails_cleanly(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "pepper.hex"
    bad.write_bytes(content)
    path, _ = rights_file(tmp_path)
    proc = cli(
        "import",
        "rights",
        str(path),
        "--pepper-file",
        str(bad),
        data_dir=tmp_path / "data",
        check=False,
    )
    assert proc.returncode == 1
    assert "pepper file" in proc.stderr
    no_traceback(proc)


@pytest.mark.slow
def test_server_uses_the_pepper_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pepper_file = write_pepper(tmp_path / "pepper.hex", bytes(range(50, 82)))
    path, rights = rights_file(tmp_path)
    cli("import", "practitioners", str(practitioners_file(tmp_path)), data_dir=data)
    cli("import", "rights", str(path), "--pepper-file", str(pepper_file), data_dir=data)
    token = cli("token", "create", PHARMACIST_ID, data_dir=data).stdout.splitlines()[-1]
    who = rights[0]
    with serving(data, env={"COVERGATE_PEPPER_FILE": str(pepper_file)}) as server:
        base = [
            "check",
            "--target",
            server.target,
            "--insecure",
            "--token",
            token,
            "--nir",
            who.identity.nir,
            "--nir-key",
            who.identity.nir_key,
            "--birth-date",
            who.identity.birth_date,
            "--amc",
            PHARMACY_AMC,
            "--domain",
            "PHAR",
        ]
        covered = cli(*base, "--birth-rank", "1", "--member", who.member_number).stdout
        wrong_rank = cli(*base, "--birth-rank", "2").stdout
    assert "decision      COVERED" in covered
    assert "rate          100%" in covered and "convention    TP01" in covered
    assert "decision      NO_MATCH" in wrong_rank
    assert who.identity.nir not in covered + wrong_rank


# -- serve -----------------------------------------------------------------------------------------


def run_serve(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    # Its own timeout: a server that wrongly starts must not hang the suite.
    return subprocess.run(
        [
            COVERGATE,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--data",
            str(data),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_without_insecure_or_tls(tmp_path: Path) -> None:
    proc = run_serve(data=tmp_path / "data")
    assert proc.returncode == 2
    assert "choose --insecure (development) or --tls-cert F --tls-key F" in proc.stderr
    assert "serving on" not in proc.stdout
    no_traceback(proc)


def test_serve_refuses_insecure_and_tls_together(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    proc = run_serve(
        "--insecure", "--tls-cert", str(cert), "--tls-key", str(cert), data=tmp_path / "data"
    )
    assert proc.returncode == 2
    assert "--insecure" in proc.stderr
    assert "serving on" not in proc.stdout


def test_serve_tls_cert_needs_key(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    proc = run_serve("--tls-cert", str(cert), data=tmp_path / "data")
    assert proc.returncode == 2
    assert "--tls-cert needs --tls-key" in proc.stderr


# -- tokens ----------------------------------------------------------------------------------------


@pytest.fixture
def admin_data(tmp_path: Path) -> Path:
    """Practitioners loaded in-process (faster); the commands under test run as real processes."""
    data = tmp_path / "data"
    with Store(data) as store:
        importer.import_practitioners(store, practitioners_file(tmp_path))
    return data


def new_token(data: Path, subject: str, role: str = "practitioner") -> str:
    with Store(data) as store:
        return create_token(store, subject, role)


def authenticate(data: Path, token: str, role: str = "practitioner") -> object:
    with Store(data) as store:
        return Authenticator(store).authenticate([("authorization", f"Bearer {token}")], role)


def test_token_create_prints_the_token_alone_on_the_last_line(admin_data: Path) -> None:
    proc = cli("token", "create", PHARMACIST_ID, data_dir=admin_data)
    lines = proc.stdout.splitlines()
    assert len(lines) >= 2
    assert TOKEN_RE.fullmatch(lines[-1]), lines[-1]
    assert TOKEN_RE.search("\n".join(lines[:-1])) is None
    assert TOKEN_RE.search(proc.stderr) is None
    caller = authenticate(admin_data, lines[-1])
    assert getattr(caller, "practitioner_id", None) == PHARMACIST_ID
    assert getattr(caller, "profession", None) == "pharmacist"


def test_only_the_sha256_of_the_secret_is_stored(admin_data: Path) -> None:
    token = cli("token", "create", PHARMACIST_ID, data_dir=admin_data).stdout.splitlines()[-1]
    _, token_id, secret = token.split(".")
    with Store(admin_data) as store:
        record = store.credential(token_id)
    assert record is not None
    assert record.practitioner_id == PHARMACIST_ID and record.role == "practitioner"
    assert record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    for path, raw in raw_data_files(admin_data).items():
        assert secret.encode() not in raw, path.name
        assert secret.encode("utf-16-le") not in raw, path.name
        assert token.encode() not in raw, path.name


def test_claims_token(admin_data: Path) -> None:
    token = cli(
        "token", "create", CLAIMS_ID, "--role", "claims", data_dir=admin_data
    ).stdout.splitlines()[-1]
    assert TOKEN_RE.fullmatch(token)
    assert getattr(authenticate(admin_data, token, "claims"), "role", None) == "claims"
    assert authenticate(admin_data, token, "practitioner") is not INVALID  # wrong role, not unknown


def test_token_for_unknown_practitioner_is_refused(admin_data: Path) -> None:
    proc = cli("token", "create", "10000000099", data_dir=admin_data, check=False)
    assert proc.returncode == 1
    assert "no practitioner 10000000099" in proc.stderr
    assert TOKEN_RE.search(proc.stdout) is None
    no_traceback(proc)
    with Store(admin_data) as store:
        assert store.counts()["credentials"] == 0


def test_revoke_removes_every_token_of_the_practitioner(admin_data: Path) -> None:
    mine = [new_token(admin_data, PHARMACIST_ID) for _ in range(2)]
    other = new_token(admin_data, HOSPITAL_ID)
    assert all(
        getattr(authenticate(admin_data, t), "practitioner_id", None) == PHARMACIST_ID for t in mine
    )
    out = cli("token", "revoke", PHARMACIST_ID, data_dir=admin_data).stdout
    assert f"revoked 2 token(s) of {PHARMACIST_ID}" in out
    for t in mine:
        assert authenticate(admin_data, t) is INVALID
    assert getattr(authenticate(admin_data, other), "practitioner_id", None) == HOSPITAL_ID
    with Store(admin_data) as store, store.env.begin(db=store.credentials_db) as txn:
        assert [k.decode() for k, _ in txn.cursor()] == [other.split(".")[1]]
    assert "revoked 0 token(s)" in cli("token", "revoke", PHARMACIST_ID, data_dir=admin_data).stdout


# -- practitioner administration -------------------------------------------------------------------


def show(data: Path, pid: str) -> dict[str, str]:
    out = cli("practitioner", "show", pid, data_dir=data).stdout
    return {line[:14].strip(): line[14:] for line in out.splitlines()}


def test_practitioner_show_suspend_reinstate(admin_data: Path) -> None:
    shown = show(admin_data, PHARMACIST_ID)
    assert {k: shown[k] for k in ("practitioner", "profession", "insurers", "status")} == {
        "practitioner": PHARMACIST_ID,
        "profession": "pharmacist",
        "insurers": ", ".join(sorted((PHARMACY_AMC, OTHER_AMC))),
        "status": "active",
    }
    assert shown["domains"] == "PHAR"
    assert shown["quota"].startswith("60/min (burst 40), 3000/day, 1500 distinct/day")
    assert shown["today"] == "0 lookups, 0 distinct beneficiaries"
    token = new_token(admin_data, PHARMACIST_ID)
    out = cli(
        "practitioner",
        "suspend",
        PHARMACIST_ID,
        "--reason",
        "harvest suspected",
        data_dir=admin_data,
    ).stdout
    assert "status        suspended (harvest suspected)" in out
    assert show(admin_data, PHARMACIST_ID)["status"] == "suspended (harvest suspected)"
    refused = authenticate(admin_data, token)
    assert isinstance(refused, AuthFailure) and refused.status == SUSPENDED.status
    assert refused.practitioner is not None  # who, for the refused attempt's trace
    assert refused.practitioner.practitioner_id == PHARMACIST_ID
    out = cli("practitioner", "reinstate", PHARMACIST_ID, data_dir=admin_data).stdout
    assert "status        active" in out.splitlines()
    assert getattr(authenticate(admin_data, token), "practitioner_id", None) == PHARMACIST_ID


def test_suspend_without_reason(admin_data: Path) -> None:
    out = cli("practitioner", "suspend", HOSPITAL_ID, data_dir=admin_data).stdout
    assert "status        suspended (" in out


@pytest.mark.parametrize("action", ["show", "suspend", "reinstate"])
def test_unknown_practitioner(admin_data: Path, action: str) -> None:
    proc = cli("practitioner", action, "10000000099", data_dir=admin_data, check=False)
    assert proc.returncode == 1
    assert "no practitioner 10000000099" in proc.stderr
    no_traceback(proc)


@pytest.mark.parametrize("merge", [False, True], ids=["replace", "merge"])
def test_practitioner_import_keeps_a_suspension_until_reinstated(
    admin_data: Path, tmp_path: Path, merge: bool
) -> None:
    cli("practitioner", "suspend", PHARMACIST_ID, "--reason", "guard fired", data_dir=admin_data)
    again = practitioners_file(tmp_path)  # lists PHARMACIST_ID as active
    cli("import", "practitioners", str(again), *(["--merge"] if merge else []), data_dir=admin_data)
    assert show(admin_data, PHARMACIST_ID)["status"] == "suspended (guard fired)"
    assert show(admin_data, HOSPITAL_ID)["status"] == "active"
    cli("practitioner", "reinstate", PHARMACIST_ID, data_dir=admin_data)
    cli("import", "practitioners", str(again), data_dir=admin_data)
    assert show(admin_data, PHARMACIST_ID)["status"] == "active"


def test_replace_import_drops_unlisted_practitioners(admin_data: Path, tmp_path: Path) -> None:
    token = new_token(admin_data, HOSPITAL_ID)
    only = practitioners_file(
        tmp_path, PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,))
    )
    cli("import", "practitioners", str(only), data_dir=admin_data)
    assert (
        cli("practitioner", "show", HOSPITAL_ID, data_dir=admin_data, check=False).returncode == 1
    )
    assert authenticate(admin_data, token) is INVALID
    assert show(admin_data, PHARMACIST_ID)["insurers"] == PHARMACY_AMC


def test_import_missing_file(tmp_path: Path) -> None:
    proc = cli(
        "import", "rights", str(tmp_path / "absent.csv"), data_dir=tmp_path / "data", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr == f"covergate: cannot read {tmp_path / 'absent.csv'}: it does not exist\n"
    assert not (tmp_path / "data").exists()


def test_check_without_token(tmp_path: Path) -> None:
    proc = cli(
        "check",
        "--insecure",
        "--nir",
        "1850775123456",
        "--nir-key",
        "08",
        "--birth-date",
        "19850701",
        "--birth-rank",
        "1",
        "--amc",
        "1",
        "--domain",
        "PHAR",
        check=False,
    )
    assert proc.returncode == 2
    assert "--token" in proc.stderr and "--client-cert" in proc.stderr


# -- demo ------------------------------------------------------------------------------------------

DEMO_BENEFICIARIES = 2000


class Demo:
    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.examples_file = root / "examples.txt"
        self.today = datetime.datetime.now(zoneinfo.ZoneInfo("Europe/Paris")).date()
        self.proc = cli(
            "demo",
            "--data",
            str(self.data),
            "--beneficiaries",
            str(DEMO_BENEFICIARIES),
            "--examples",
            str(self.examples_file),
            env={"TZ": "Europe/Paris"},
        )
        self.tokens: dict[str, str] = {}
        self.examples: list[tuple[str, str, list[str]]] = []  # label, expected, argv
        label = expected = ""
        for line in self.examples_file.read_text().splitlines():
            if m := re.fullmatch(r"TOKEN_([A-Z]+)=(\S+)\s+#.*", line):
                self.tokens[m.group(1).lower()] = m.group(2)
            elif m := re.fullmatch(r"# (.+): (COVERED|NOT_COVERED|NO_MATCH)", line):
                label, expected = m.groups()
            elif line.startswith("covergate check "):
                self.examples.append((label, expected, shlex.split(line)))

    def token_profession(self, argv: list[str]) -> str:
        token = argv[argv.index("--token") + 1]
        return next(p for p, t in self.tokens.items() if t == token)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return Demo(tmp_path_factory.mktemp("demo"))


@pytest.mark.slow
def test_demo_writes_tokens_and_examples_once(demo: Demo) -> None:
    # With --examples the tokens go to the file only; stdout says where they are.
    assert TOKEN_RE.search(demo.proc.stdout + demo.proc.stderr) is None
    assert str(demo.examples_file) in demo.proc.stdout
    assert f"{DEMO_BENEFICIARIES:,} synthetic beneficiaries" in demo.examples_file.read_text()
    # It says what it is doing while it works (on stderr).
    for step in ("generating", "importing", "creating", "ready"):
        assert step in demo.proc.stderr
    assert stat.S_IMODE(demo.examples_file.stat().st_mode) == 0o600
    assert {"pharmacist", "hospital", "claims"} <= set(demo.tokens)
    assert all(TOKEN_RE.fullmatch(t) for t in demo.tokens.values())
    assert len(demo.examples) >= 5
    assert {e for _, e, _ in demo.examples} == {"COVERED", "NOT_COVERED", "NO_MATCH"}
    assert f"{DEMO_BENEFICIARIES:,} synthetic beneficiaries" in demo.proc.stdout
    assert len(TOKEN_RE.findall(demo.examples_file.read_text())) == len(demo.tokens) + len(
        demo.examples
    )
    assert stat.S_IMODE((demo.data / "pepper").stat().st_mode) == 0o600
    with Store(demo.data) as store:
        assert store.counts()["beneficiaries"] == DEMO_BENEFICIARIES


@pytest.mark.slow
def test_demo_without_examples_file_prints_everything(tmp_path: Path) -> None:
    proc = cli("demo", "--data", str(tmp_path / "d"), "--beneficiaries", "50", "--no-progress")
    assert "TOKEN_PHARMACIST=" in proc.stdout
    assert "covergate check --insecure" in proc.stdout
    again = cli("demo", "--data", str(tmp_path / "d"), check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    kept = cli("demo", "--data", str(tmp_path / "d"), "--if-missing")
    assert kept.stdout == "" and "keeping it" in kept.stderr


@pytest.mark.slow
def test_demo_example_checks_give_the_expected_decision(demo: Demo) -> None:
    # One example per decision, each with a token whose profession may check its domain.
    chosen: dict[str, tuple[str, list[str]]] = {}
    for label, expected, argv in demo.examples:
        domain = argv[argv.index("--domain") + 1]
        if (
            expected not in chosen
            and domain in DEFAULT_PROFESSION_DOMAINS[demo.token_profession(argv)]
        ):
            chosen[expected] = (label, argv)
    assert set(chosen) == {"COVERED", "NOT_COVERED", "NO_MATCH"}
    with serving(demo.data) as server:
        for expected, (label, argv) in chosen.items():
            assert argv[:2] == ["covergate", "check"]
            proc = subprocess.run(
                [COVERGATE, *argv[1:], "--target", server.target],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, proc.stderr
            assert proc.stdout.splitlines()[0] == f"decision      {expected}", label


@pytest.mark.slow
def test_demo_examples_use_tokens_allowed_for_their_domain(demo: Demo) -> None:
    """Printed examples must keep working once profession scope is enforced."""
    out_of_scope = [
        (label, argv[argv.index("--domain") + 1], demo.token_profession(argv))
        for label, _, argv in demo.examples
        if argv[argv.index("--domain") + 1]
        not in DEFAULT_PROFESSION_DOMAINS[demo.token_profession(argv)]
    ]
    assert not out_of_scope, (
        f"examples whose token's profession may not check the domain: {out_of_scope}"
    )


@pytest.mark.slow
def test_demo_data_dir_holds_no_identity(demo: Demo) -> None:
    from service import demo as demo_module

    example_nirs = {argv[argv.index("--nir") + 1] for _, _, argv in demo.examples}
    assert example_nirs
    # The demo's rights file lived in a temp dir that is gone; regenerate it (deterministic).
    with tempfile.TemporaryDirectory() as tmp:
        files = demo_module.generate(Path(tmp), beneficiaries=DEMO_BENEFICIARIES, today=demo.today)
        assert {e.nir for e in files.examples} == example_nirs, "regenerated data differs"
        all_nirs = {line.split(",", 1)[0] for line in files.rights_csv.read_text().splitlines()[1:]}
    covered_nirs = {argv[argv.index("--nir") + 1] for _, e, argv in demo.examples if e == "COVERED"}
    assert covered_nirs <= all_nirs
    row_shape = re.compile(rb"[0-9]{5}[0-9AB][0-9]{7},[0-9]{2},[0-9]{8},")
    for path, raw in raw_data_files(demo.data).items():
        for nir in example_nirs:
            for encoded in (nir.encode(), nir.encode("utf-16-le")):
                assert encoded not in raw, f"an example NIR is in {path.name}"
        leaked = sum(n.encode() in raw for n in all_nirs)
        assert leaked == 0, f"{leaked} demo NIRs are in {path.name}"
        assert row_shape.search(raw) is None, f"rights rows in clear in {path.name}"

"""Operator experience, through the real `covergate` command: every ordinary mistake is one line
and a documented exit status, a certificate alone can call, field errors carry their rule, read-only
commands create nothing, admin actions say what they changed and keep a history, help teaches.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from harness import (
    HOSPITAL_ID,
    OTHER_AMC,
    PHARMACIST_ID,
    PHARMACY_AMC,
    Dataset,
    PractitionerRow,
    RunningServer,
    build_dataset,
    cli,
    write_practitioners_csv,
)
from test_mtls import Pki

from service import cli as cli_module
from service.client import CoverageClient, CoverageError
from service.store import Store

pytestmark = pytest.mark.slow  # real servers and many processes


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("COVERGATE_PEPPER_FILE", "COVERGATE_DATA", "COVERGATE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("operator"))


@pytest.fixture(scope="module")
def plain(ds: Dataset) -> Iterator[RunningServer]:
    with RunningServer(ds.data_dir) as server:
        yield server


@pytest.fixture(scope="module")
def pki(ds: Dataset) -> Pki:
    return Pki(ds.data_dir.parent)


@pytest.fixture(scope="module")
def tls(ds: Dataset, pki: Pki) -> Iterator[RunningServer]:
    """TLS without client certificates required: a token, a certificate, or both."""
    args = ["--tls-cert", str(pki.dir / "server.pem"), "--tls-key", str(pki.dir / "server.key")]
    creds = grpc.ssl_channel_credentials(root_certificates=(pki.dir / "ca.pem").read_bytes())
    with RunningServer(ds.data_dir, args=args, credentials=creds) as server:
        yield server


@pytest.fixture(scope="module")
def mtls(ds: Dataset, pki: Pki) -> Iterator[RunningServer]:
    """TLS requiring a client certificate signed by the test CA."""
    with RunningServer(
        ds.data_dir, args=pki.server_args(), credentials=pki.health_credentials()
    ) as server:
        yield server


def run(*args: str, data: Path | None = None, env: dict[str, str] | None = None) -> Result:
    return Result(cli(*args, data_dir=data, check=False, env=env))


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.proc = proc
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def one_line(self) -> str:
        """The error: one line on stderr, nothing on stdout, no traceback."""
        assert "Traceback" not in self.err + self.out, self.err
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        assert self.out == "", self.out
        return lines[0]


def check_args(ds: Dataset, **over: str) -> list[str]:
    c = ds.covered
    values = {
        "--nir": c.nir,
        "--nir-key": c.nir_key,
        "--birth-date": c.birth_date,
        "--birth-rank": str(c.birth_rank),
        "--amc": PHARMACY_AMC,
        "--domain": "PHAR",
    }
    values.update({f"--{k.replace('_', '-')}": v for k, v in over.items()})
    return ["check", *[x for kv in values.items() for x in kv if x != ""]]


# -- 1. one line and a documented status for every ordinary mistake -------------------------------


def test_mistakes_on_the_command_line(ds: Dataset, tmp_path: Path) -> None:
    """A table of mistakes through the real CLI: status, one line, and what it must say."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    pki = Pki(tmp_path)
    cert, key = str(pki.dir / "server.pem"), str(pki.dir / "server.key")
    missing = str(tmp_path / "missing.pem")
    token = ["--token", ds.tokens["pharmacist"]]
    nodata = tmp_path / "nodata"
    table: list[tuple[list[str], int, str]] = [
        # serve
        (["serve", "--data", str(nodata)], 2, "choose --insecure"),
        (["serve", "--tls-cert", cert, "--tls-key", missing], 2, "no such file"),
        (["serve", "--tls-cert", str(junk), "--tls-key", key], 2, "not a PEM certificate"),
        (["serve", "--tls-cert", cert, "--tls-key", str(junk)], 2, "not a PEM private key"),
        (["serve", "--tls-cert", cert, "--tls-key", key, "--client-ca", missing], 2, "no such"),
        (["serve", "--tls-cert", cert], 2, "--tls-cert needs --tls-key"),
        (["serve", "--insecure", "--tls-cert", cert, "--tls-key", key], 2, "exclude each other"),
        (["serve", "--insecure", "--listen", "localhost"], 2, "--listen must be HOST:PORT"),
        (["serve", "--insecure", "--workers", "many"], 2, "not a whole number"),
        # check: credentials and files
        ([*check_args(ds), "--insecure"], 2, "--token"),
        ([*check_args(ds), *token, "--client-cert", cert], 2, "--client-cert needs --client-key"),
        ([*check_args(ds), *token, "--client-key", key], 2, "--client-key needs --client-cert"),
        ([*check_args(ds), *token, "--ca-cert", missing], 2, "no such file"),
        ([*check_args(ds), *token, "--ca-cert", str(junk)], 2, "not a PEM certificate"),
        ([*check_args(ds), *token, "--insecure", "--ca-cert", cert], 2, "drop --insecure"),
        ([*check_args(ds, domain="dentistry"), *token], 2, "unknown care domain"),
        ([*check_args(ds, birth_rank="first"), *token], 2, "invalid int value"),
        (["check", "--nir", "1"], 2, "required"),
        ([*check_args(ds), *token, "--timeout", "0"], 2, "--timeout"),
        # admin
        (["practitioner", "show", PHARMACIST_ID, "--data", str(nodata)], 1, "no covergate data"),
        (["practitioner", "show", "10000000099", "--data", str(ds.data_dir)], 1, "no practitioner"),
        (["practitioner", "frobnicate", PHARMACIST_ID], 2, "invalid choice"),
        (["practitioner", "pin", PHARMACIST_ID, "--fingerprint", "zz", "--data", str(nodata)],
         2, "SHA-256"),
        (["token", "create", "10000000099", "--data", str(ds.data_dir)], 1, "no practitioner"),
        (["import", "rights", missing, "--data", str(nodata)], 2, "does not exist"),
        (["import", "rights", str(tmp_path), "--data", str(nodata)], 2, "is a directory"),
        (["import", "frobs", "x.csv"], 2, "invalid choice"),
        (["status", "--data", str(nodata), "--config", missing], 1, "cannot read config"),
        (["frobnicate"], 2, "invalid choice"),
        ([], 2, "required"),
    ]  # fmt: skip
    for argv, status, says in table:
        result = run(*argv)
        line = result.one_line()
        assert result.code == status, (argv, result.code, line)
        assert says in line, (argv, line)
    assert not nodata.exists()


def test_check_against_nothing_listening(ds: Dataset) -> None:
    with socket_port() as port:  # bound, not listening: connection refused
        result = run(*check_args(ds, target=f"127.0.0.1:{port}"), "--insecure", "--token", "x")
    assert result.code == 3
    line = result.one_line()
    assert "nothing answers" in line and "running" in line


def test_tls_client_against_a_plaintext_server_suggests_insecure(
    ds: Dataset, plain: RunningServer
) -> None:
    result = run(*check_args(ds, target=plain.target), "--token", ds.tokens["pharmacist"])
    assert result.code == 3
    line = result.one_line()
    assert "add --insecure" in line
    assert "ssl_transport_security" not in result.err and "TSI_" not in result.err


def test_plaintext_client_against_a_tls_server_suggests_tls(
    ds: Dataset, tls: RunningServer
) -> None:
    token = ["--token", ds.tokens["pharmacist"]]
    result = run(*check_args(ds, target=tls.target), *token, "--insecure")
    assert result.code == 3
    assert "drop --insecure" in result.one_line()
    # TLS, but the server's CA not given: say how to trust it.
    result = run(*check_args(ds, target=tls.target), *token)
    assert result.code == 3
    assert "--ca-cert" in result.one_line()


def test_refusal_by_the_server_is_status_4(ds: Dataset, plain: RunningServer) -> None:
    token = "cg1.0123456789abcdef." + "A" * 43
    result = run(*check_args(ds, target=plain.target), "--insecure", "--token", token)
    assert result.code == 4
    line = result.one_line()
    assert "UNAUTHENTICATED" in line and "CREDENTIAL_INVALID" in line


def test_bench_outside_the_venv_says_how_to_run_it(tmp_path: Path) -> None:
    """`python3 -m bench` with a Python lacking the dependencies: one line, not a traceback."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "bench", "--help"],  # -S: no site-packages
        capture_output=True,
        text=True,
        cwd=root,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ""},
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert ".venv/bin/python -m bench" in proc.stderr and "make bench" in proc.stderr


# -- 2. a certificate alone ------------------------------------------------------------------------


def test_certificate_alone_from_the_cli(ds: Dataset, pki: Pki, mtls: RunningServer) -> None:
    cert, key, _ = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
    (pki.dir / "me.pem").write_bytes(cert)
    (pki.dir / "me.key").write_bytes(key)
    result = run(
        *check_args(ds, target=mtls.target),
        "--ca-cert", str(pki.dir / "ca.pem"),
        "--client-cert", str(pki.dir / "me.pem"),
        "--client-key", str(pki.dir / "me.key"),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == "decision      COVERED"
    # Without a client certificate the mTLS server ends the handshake: say what it wants.
    result = run(
        *check_args(ds, target=mtls.target),
        "--ca-cert", str(pki.dir / "ca.pem"), "--token", ds.tokens["pharmacist"],
    )  # fmt: skip
    assert result.code == 3
    assert "client certificate" in result.one_line()


def test_certificate_alone_from_the_python_client(
    ds: Dataset, pki: Pki, tls: RunningServer, mtls: RunningServer
) -> None:
    cert, key, _ = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
    fields = dict(ds.covered.fields(), amc_number=PHARMACY_AMC, domain="phar")
    ca = (pki.dir / "ca.pem").read_bytes()
    # token=None sends no authorization header: "Bearer None" would be an unknown credential.
    with CoverageClient(mtls.target, None, root_certificates=ca, client_cert=(cert, key)) as client:
        assert client.check(**fields).decision == "COVERED"
    # Neither a token nor a certificate: the server says a credential is missing.
    with (
        CoverageClient(tls.target, root_certificates=ca) as client,
        pytest.raises(CoverageError) as err,
    ):
        client.check(**fields)
    assert (err.value.code, err.value.reason) == ("UNAUTHENTICATED", "CREDENTIAL_MISSING")
    assert err.value.from_server
    with pytest.raises(ValueError, match="needs TLS"):
        CoverageClient(tls.target, None, insecure=True, client_cert=(cert, key))


def test_readme_error_table_lists_the_credential_reasons() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| situation | code | details |") :].split("\n\n")[0]
    for reason in (
        "CREDENTIAL_MISSING",
        "CREDENTIAL_INVALID",
        "CREDENTIAL_MISMATCH",
        "CERTIFICATE_NOT_REGISTERED",
        "CREDENTIAL_METHOD_NOT_ACCEPTED",
        "ROLE_NOT_ALLOWED",
        "PRACTITIONER_SUSPENDED",
        "DOMAIN_OUT_OF_SCOPE",
        "AMC_OUT_OF_SCOPE",
    ):
        assert reason in table, reason


# -- 3. field errors with their rule ---------------------------------------------------------------


def test_invalid_fields_are_shown_with_their_rule(ds: Dataset, plain: RunningServer) -> None:
    bad_birth = "18000230"
    result = run(
        *check_args(ds, target=plain.target, birth_date=bad_birth, nir_key="99"),
        "--insecure", "--token", ds.tokens["pharmacist"],
    )  # fmt: skip
    assert result.code == 4
    line = result.one_line()
    assert "birth_date (YYYYMMDD from 1850 on; day and/or month may be 00)" in line
    assert "nir_key (2 digits equal to 97 - (nir mod 97)" in line
    assert line.count("birth_date") == 1
    assert bad_birth not in line and ds.covered.nir not in line
    # The same from the Python client.
    bad = dict(ds.covered.fields(), birth_date=bad_birth, amc_number="1", domain="PHAR")
    with (
        CoverageClient(plain.target, ds.tokens["pharmacist"], insecure=True) as client,
        pytest.raises(CoverageError) as err,
    ):
        client.check(**bad)
    assert err.value.fields == ("birth_date",)
    assert err.value.rules == ("YYYYMMDD from 1850 on; day and/or month may be 00",)
    assert str(err.value) == (
        "INVALID_ARGUMENT: invalid field(s): "
        "birth_date (YYYYMMDD from 1850 on; day and/or month may be 00)"
    )


def test_domain_in_any_case(ds: Dataset, plain: RunningServer) -> None:
    for domain in ("phar", "Phar", "CARE_DOMAIN_PHARMACY", "care_domain_pharmacy"):
        result = run(
            *check_args(ds, target=plain.target, domain=domain),
            "--insecure", "--token", ds.tokens["pharmacist"],
        )  # fmt: skip
        assert result.code == 0, result.err
        assert result.out.startswith("decision      COVERED")


# -- 4. the data dir: found, never created by a read ----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["practitioner", "show", PHARMACIST_ID],
        ["practitioner", "history", PHARMACIST_ID],
        ["practitioner", "suspend", PHARMACIST_ID],
        ["practitioner", "reinstate", PHARMACIST_ID],
        ["practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=5"],
        ["practitioner", "unpin", PHARMACIST_ID],
        ["token", "create", PHARMACIST_ID],
        ["token", "revoke", PHARMACIST_ID],
        ["status"],
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_commands_on_a_missing_data_dir_create_nothing(tmp_path: Path, argv: list[str]) -> None:
    for where in (tmp_path / "absent", tmp_path / "empty"):
        if where.name == "empty":
            where.mkdir()
        result = run(*argv, data=where)
        assert result.code == 1
        line = result.one_line()
        assert f"no covergate data in {where}" in line and "COVERGATE_DATA" in line
        assert not (tmp_path / "absent").exists()
        assert list((tmp_path / "empty").glob("*")) == [] if where.name == "empty" else True
    assert not (tmp_path / "covergate-data").exists()


def test_a_failed_first_import_creates_no_pepper_and_no_store(tmp_path: Path) -> None:
    bad = tmp_path / "rights.csv"
    bad.write_text(
        "nir,nir_key,birth_date,birth_rank,amc_number,member_number,domain,rate_percent,"
        "convention_type,start_date,end_date\n1850775123456,08,19851301,1,1,,PHAR,100,TP01,"
        "20240101,20991231\n"
    )
    data = tmp_path / "data"
    result = run("import", "rights", str(bad), data=data)
    assert result.code == 2
    assert "line 2: birth_date" in result.err
    assert not data.exists()
    bad_practitioners = write_practitioners_csv(
        tmp_path / "p.csv", [PractitionerRow("12", "pharmacist", ("1",))]
    )
    assert run("import", "practitioners", str(bad_practitioners), data=data).code == 2
    assert not data.exists()


def test_the_make_run_demo_data_is_found(tmp_path: Path, ds: Dataset) -> None:
    demo = tmp_path / ".demo"
    demo.mkdir()
    os.symlink(ds.data_dir, demo / "data")
    result = run("practitioner", "show", PHARMACIST_ID)
    assert result.code == 0, result.err
    assert f"practitioner  {PHARMACIST_ID}" in result.out
    assert "using the `make run` demo data in .demo/data" in result.err
    # An explicit choice wins, and a ./covergate-data too.
    assert run("practitioner", "show", PHARMACIST_ID, "--data", str(tmp_path / "x")).code == 1
    (tmp_path / "covergate-data").mkdir()
    assert "no covergate data in covergate-data" in run("status").one_line()


# -- 5. admin actions say what they changed, and keep a history -----------------------------------


@pytest.fixture
def admin(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    rows = [
        PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC, OTHER_AMC)),
        PractitionerRow(HOSPITAL_ID, "hospital", (PHARMACY_AMC,)),
    ]
    csv = write_practitioners_csv(tmp_path / "p.csv", rows)
    result = run("import", "practitioners", str(csv), "--by", "alice", data=data)
    assert result.code == 0, result.err
    assert "practitioners: 2 added, 0 removed, 0 changed, 0 unchanged" in result.out
    return data


def test_suspension_history_keeps_who_when_why(admin: Path) -> None:
    first = run(
        "practitioner", "suspend", PHARMACIST_ID, "--reason", "stolen laptop, ticket 42",
        "--by", "alice", data=admin,
    )  # fmt: skip
    assert first.code == 0
    assert first.out.startswith(f"suspended {PHARMACIST_ID}: stolen laptop, ticket 42")
    again = run("practitioner", "suspend", PHARMACIST_ID, "--by", "bob", data=admin)
    assert "was already suspended (stolen laptop, ticket 42)" in again.out
    back = run(
        "practitioner", "reinstate", PHARMACIST_ID, "--reason", "new laptop", "--by", "carol",
        data=admin,
    )  # fmt: skip
    assert back.out.startswith(f"reinstated {PHARMACIST_ID}")
    history = run("practitioner", "history", PHARMACIST_ID, data=admin)
    assert history.code == 0
    lines = history.out.splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+"
    assert re.match(rf"{stamp}  added  \[active\]  by alice  - practitioners import", lines[0])
    assert re.match(rf"{stamp}  suspended  by alice  - stolen laptop, ticket 42$", lines[1])
    assert re.match(rf"{stamp}  suspended  by bob  - suspended by an administrator$", lines[2])
    assert re.match(
        rf"{stamp}  reinstated  \[was: suspended by an administrator\]  by carol  - new laptop$",
        lines[3],
    )
    assert len(lines) == 4
    shown = run("practitioner", "show", PHARMACIST_ID, data=admin).out
    assert "last change" in shown and "reinstated" in shown
    # Without --by, the OS user.
    run("practitioner", "suspend", HOSPITAL_ID, data=admin)
    last = run("practitioner", "history", HOSPITAL_ID, data=admin).out.splitlines()[-1]
    assert last.split("  by ")[1].startswith(cli_module._who(argparse.Namespace(by=None)))


def test_admin_actions_that_change_nothing_say_so(admin: Path) -> None:
    result = run("practitioner", "reinstate", PHARMACIST_ID, data=admin)
    assert (result.code, result.out) == (
        0,
        f"{PHARMACIST_ID} is active, not suspended: nothing to reinstate\n",
    )
    result = run("practitioner", "unpin", PHARMACIST_ID, data=admin)
    assert result.out == f"{PHARMACIST_ID} has no pinned certificate: nothing changed\n"
    result = run("practitioner", "quota", PHARMACIST_ID, "--unset", "daily_limit", data=admin)
    assert f"daily_limit had no override for {PHARMACIST_ID}: nothing to unset" in result.out
    assert "quota of 10001234567 unchanged" in result.out
    result = run("token", "revoke", "10000000099", data=admin)
    assert result.code == 1
    assert "no practitioner 10000000099 and no token of it: nothing revoked" in result.one_line()
    result = run("token", "revoke", PHARMACIST_ID, data=admin)
    assert result.out == f"revoked 0 token(s) of {PHARMACIST_ID}: it had none\n"
    # Nothing of the above went into the history: nothing happened.
    assert "no recorded change" not in run("practitioner", "history", PHARMACIST_ID, data=admin).out
    assert len(run("practitioner", "history", PHARMACIST_ID, data=admin).out.splitlines()) == 1


def test_quota_names_are_checked_and_listed(admin: Path) -> None:
    result = run("practitioner", "quota", PHARMACIST_ID, "--set", "daily_limt=5", data=admin)
    assert result.code == 2
    line = result.one_line()
    assert "no quota setting 'daily_limt'" in line
    for name in ("rate_per_minute", "daily_limit", "distinct_limit", "guard_window", "shadow"):
        assert name in line
    assert run("practitioner", "quota", PHARMACIST_ID, "--unset", "nothere", data=admin).code == 2
    assert run("practitioner", "quota", PHARMACIST_ID, data=admin).code == 2
    result = run("practitioner", "quota", PHARMACIST_ID, "--set", "shadow=guard,bogus", data=admin)
    assert result.code == 2 and "bogus" in result.one_line()
    result = run("practitioner", "quota", PHARMACIST_ID, "--set", "daily_limit=500", data=admin)
    assert f"quota of {PHARMACIST_ID}: daily_limit=500" in result.out
    assert "[overrides: daily_limit]" in result.out
    history = run("practitioner", "history", PHARMACIST_ID, data=admin).out
    assert "quota  [daily_limit=500]" in history


def test_pin_and_unpin_say_what_they_did(admin: Path) -> None:
    fingerprint = "ab" * 32
    pinned = run("practitioner", "pin", PHARMACIST_ID, "--fingerprint", fingerprint, data=admin)
    assert pinned.out.startswith(f"pinned {fingerprint} for {PHARMACIST_ID}")
    again = run("practitioner", "pin", PHARMACIST_ID, "--fingerprint", fingerprint, data=admin)
    assert "already pinned" in again.out
    other = run("practitioner", "unpin", PHARMACIST_ID, "--fingerprint", "cd" * 32, data=admin)
    assert other.code == 1 and "is not pinned" in other.one_line()
    gone = run("practitioner", "unpin", PHARMACIST_ID, data=admin)
    assert gone.out.startswith(f"unpinned 1 certificate(s) of {PHARMACIST_ID}: {fingerprint}")


def test_replace_import_reports_added_removed_changed(admin: Path, tmp_path: Path) -> None:
    rows = [
        PractitionerRow(PHARMACIST_ID, "pharmacist", (PHARMACY_AMC,)),  # insurers changed
        PractitionerRow("10009999999", "dentist", (PHARMACY_AMC,)),  # added
    ]  # HOSPITAL_ID removed
    csv = write_practitioners_csv(tmp_path / "p2.csv", rows)
    result = run("import", "practitioners", str(csv), data=admin)
    assert "practitioners: 1 added, 1 removed, 1 changed, 0 unchanged" in result.out
    history = run("practitioner", "history", HOSPITAL_ID, data=admin)
    assert "is no longer in the store" in history.out and "removed" in history.out
    assert "changed  [amc_numbers" in run("practitioner", "history", PHARMACIST_ID, data=admin).out


def test_rights_import_reports_added_removed_changed(tmp_path: Path) -> None:
    import random

    from harness import Right, make_identity, write_rights_csv

    rng = random.Random(5)
    people = [make_identity(rng) for _ in range(4)]
    first = [Right(p, PHARMACY_AMC, "PHAR") for p in people[:3]]
    data = tmp_path / "data"
    result = run("import", "rights", str(write_rights_csv(tmp_path / "a.csv", first)), data=data)
    assert "beneficiaries: 3 added, 0 removed, 0 changed, 0 unchanged" in result.out
    second = [
        Right(people[0], PHARMACY_AMC, "PHAR"),  # unchanged
        Right(people[1], PHARMACY_AMC, "PHAR", rate_percent=50),  # changed
        Right(people[3], PHARMACY_AMC, "PHAR"),  # added; people[2] removed
    ]
    result = run("import", "rights", str(write_rights_csv(tmp_path / "b.csv", second)), data=data)
    assert "beneficiaries: 1 added, 1 removed, 1 changed, 1 unchanged" in result.out


# -- 6. help that teaches --------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                yield from _subparsers(sub)


def test_every_option_has_help_and_every_command_examples_and_exit_statuses() -> None:
    parser = cli_module.build_parser()
    names = set()
    for p in _subparsers(parser):
        names.add(p.prog)
        for action in p._actions:
            documented = bool(action.help) and action.help != argparse.SUPPRESS
            assert documented or isinstance(action, argparse._SubParsersAction), (
                p.prog,
                action.option_strings or action.dest,
            )
        assert p.epilog and "examples:" in p.epilog and "exit status:" in p.epilog, p.prog
        assert p.description, p.prog
    for verb in ("show", "history", "suspend", "reinstate", "pin", "unpin", "quota"):
        assert f"covergate practitioner {verb}" in names
    assert {"covergate import rights", "covergate token create", "covergate status"} <= names


def test_help_shows_defaults_and_check_lists_only_client_flags() -> None:
    check = run("check", "--help").out
    assert "(default: 127.0.0.1:50051)" in check
    for server_flag in ("--data", "--config", "--pepper-file", "--listen", "--workers"):
        assert server_flag not in check, server_flag
    assert "exit status:" in check and "3    check: the server could not be reached" in check
    demo = run("demo", "--help").out
    assert "(default: 100000)" in demo
    assert run("--version").out == f"covergate {cli_module._version()}\n"


def test_readme_documents_the_exit_statuses() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for status, name in ((0, "EXIT_OK"), (1, "EXIT_FAILED"), (2, "EXIT_USAGE"),
                         (3, "EXIT_UNREACHABLE"), (4, "EXIT_REFUSED")):  # fmt: skip
        assert getattr(cli_module, name) == status
        assert re.search(rf"^\| `{status}` \|", readme, re.MULTILINE), status


# -- helpers ---------------------------------------------------------------------------------------


class socket_port:
    """A loopback port bound but not listening: connections to it are refused."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_store_history_is_additive(tmp_path: Path) -> None:
    """Events of one practitioner come back in order, and not another's."""
    with Store(tmp_path / "d") as store:
        store.add_history("1000000001", {"action": "a"})
        store.add_history("10000000011", {"action": "other"})  # a longer id, same prefix
        store.add_history("1000000001", {"action": "b"})
        assert [e["action"] for e in store.history("1000000001")] == ["a", "b"]
        assert store.history("999") == []


def test_pinned_certificate_fingerprint_matches_what_the_server_reads(pki: Pki) -> None:
    _, _, cert = pki.client(cn=PHARMACIST_ID)
    hexed = cert.fingerprint(hashes.SHA256()).hex()
    assert cli_module._fingerprint(":".join(hexed[i : i + 2] for i in range(0, 64, 2))) == hexed


# -- 7. telemetry at start and stop ----------------------------------------------------------------


def test_startup_says_whether_tracing_is_on_and_a_dead_receiver_does_not_spoil_shutdown(
    ds: Dataset,
) -> None:
    with socket_port() as port:  # nothing listens: the OTLP receiver is down
        endpoint = f"http://127.0.0.1:{port}"
        server = RunningServer(ds.data_dir, env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
        try:
            with CoverageClient(server.target, ds.tokens["pharmacist"], insecure=True) as client:
                fields = dict(ds.covered.fields(), amc_number=PHARMACY_AMC, domain="PHAR")
                assert client.check(**fields).covered
        finally:
            code = server.stop()
    log = server.log()
    assert code == 0, log
    assert f"tracing is on: spans exported over OTLP/gRPC to {endpoint}" in log
    assert "the first after 60s (OTEL_METRIC_EXPORT_INTERVAL)" in log
    # One line of ours instead of the SDK's retries (which held SIGTERM ~7 s) and its ERROR.
    assert "the last metrics were not exported: the OTLP receiver at" in log
    for sdk_noise in ("Failed to export", "Transient error", "opentelemetry.exporter", " ERROR "):
        assert sdk_noise not in log, log


def test_startup_says_tracing_is_off(plain: RunningServer) -> None:
    assert "tracing is off (set OTEL_EXPORTER_OTLP_ENDPOINT" in plain.log()


# -- 8. reflection v1 beside v1alpha ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_v1_and_v1alpha(plain: RunningServer, version: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2

    with plain.channel() as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="covergate.v1.CoverageService"
            ),
        ]
        listed, described = list(call(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "covergate.v1.CoverageService",
        "covergate.v1.AttestationService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert described.file_descriptor_response.file_descriptor_proto

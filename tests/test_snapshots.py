"""Rights snapshots (service.snapshots): built once, signed, fetched and checked by every host,
activated together, rolled back; a tampered, mis-signed, foreign or truncated copy never serves.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from harness import PHARMACY_AMC, Dataset, RunningServer, build_dataset, cli

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from service import snapshots as sn

pytestmark = pytest.mark.slow


def _keys(tmp: Path) -> tuple[Path, str]:
    key = tmp / "keys" / "signing.pem"
    key.parent.mkdir()
    out = cli("snapshot", "keygen", str(key)).stdout
    public = next(line.split('"')[1] for line in out.splitlines() if "public_key" in line)
    return key, public


def _config(tmp: Path, public: str, extra: str = "") -> Path:
    path = tmp / f"config-{len(list(tmp.glob('config-*')))}.toml"
    path.write_text(f'[snapshots]\npublic_key = "{public}"\n' + extra)
    return path


@pytest.fixture
def made(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "ds").mkdir()
    ds = build_dataset(tmp_path / "ds", extra_beneficiaries=30)
    key, public = _keys(tmp_path)
    out = tmp_path / "snapshots"
    created = cli("snapshot", "create", str(out), "--signing-key", str(key), data_dir=ds.data_dir)
    assert "generation 1" in created.stdout
    return {"ds": ds, "key": key, "public": public, "out": out, "tmp": tmp_path}


def _fetch(made: dict[str, Any], host: Path, source: Path, *more: str) -> Any:
    config = _config(made["tmp"], made["public"])
    return cli("snapshot", "fetch", str(source), "--config", str(config), *more, data_dir=host,
               check=False)  # fmt: skip


def test_a_fetched_generation_is_checked_and_installed_read_only(made: dict[str, Any]) -> None:
    host = made["tmp"] / "host"
    shutil.copytree(made["ds"].data_dir, host)
    proc = _fetch(made, host, made["out"])
    assert proc.returncode == 0, proc.stderr
    assert "generation 1 ready" in proc.stdout
    manifest = sn.Manifest.from_json((host / "snapshots" / "1" / "manifest.json").read_text())
    assert manifest.beneficiaries > 30 and manifest.pepper_fingerprint
    assert sn.installed(host) == [1] and sn.active(host) == 0
    # Nothing personal, and no practitioner, credential or history in the snapshot.
    data = (made["out"] / "1" / "data.mdb").read_bytes()
    for right in made["ds"].rights:
        assert right.identity.nir.encode() not in data
    assert b"practitioners" not in data and b"credentials" not in data
    assert not (made["out"] / "1" / "lock.mdb").exists()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "bad signature", "wrong pepper"])
def test_a_damaged_or_foreign_copy_is_refused_and_the_old_one_keeps_serving(
    made: dict[str, Any], damage: str
) -> None:
    source = made["tmp"] / "copy"
    shutil.copytree(made["out"], source)
    data = source / "1" / "data.mdb"
    host = made["tmp"] / "host"
    shutil.copytree(made["ds"].data_dir, host)
    if damage == "flipped byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-4096])
    elif damage == "bad signature":
        other = made["tmp"] / "other.pem"
        cli("snapshot", "keygen", str(other))
        shutil.rmtree(source / "1")
        cli("snapshot", "create", str(source), "--signing-key", str(other), "--generation", "1",
            data_dir=made["ds"].data_dir)  # fmt: skip
    else:
        (host / "pepper").write_text("ab" * 32 + "\n")
    proc = _fetch(made, host, source)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in line
    assert "keeps serving generation 0" in line
    expected = {"flipped byte": "hash", "truncated": "truncated", "bad signature": "signature",
                "wrong pepper": "pepper"}[damage]  # fmt: skip
    assert expected in line, line
    assert sn.installed(host) == [] and not list((host / "snapshots").glob(".1.*"))


def _request(who: Any) -> pb.CheckCoverageRequest:
    return pb.CheckCoverageRequest(
        **who.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
    )


def _decision(server: RunningServer, ds: Dataset, who: Any) -> str:
    with server.channel() as channel:
        response = pb_grpc.CoverageServiceStub(channel).CheckCoverage(
            _request(who), metadata=(("authorization", f"Bearer {ds.tokens['pharmacist']}"),),
            timeout=10,
        )  # fmt: skip
    return str(pb.Decision.Name(response.decision))


def test_one_host_activates_and_rolls_back_and_serves_a_read_only_copy(
    made: dict[str, Any],
) -> None:
    """One host without [cluster]: activation and rollback switch its workers between calls;
    a generation whose files are read-only serves."""
    ds, tmp = made["ds"], made["tmp"]
    # Generation 2: the not-covered person now has open rights.
    rights = [r for r in ds.rights if r.identity != ds.not_covered]
    from harness import Right, write_rights_csv

    rights.append(Right(ds.not_covered, PHARMACY_AMC, "PHAR"))
    write_rights_csv(tmp / "rights2.csv", rights)
    admin = tmp / "admin"
    shutil.copytree(ds.data_dir, admin)
    cli("import", "rights", str(tmp / "rights2.csv"), data_dir=admin)
    cli("snapshot", "create", str(made["out"]), "--signing-key", str(made["key"]),
        data_dir=admin)  # fmt: skip
    host = ds.data_dir
    assert _fetch(made, host, made["out"], "--generation", "1").returncode == 0
    assert _fetch(made, host, made["out"]).returncode == 0  # the latest: 2
    for n in (1, 2):  # read-only files, as on a read-only mount
        for f in (host / "snapshots" / str(n)).iterdir():
            f.chmod(0o444)
        (host / "snapshots" / str(n)).chmod(0o555)
    with RunningServer(host, workers=2) as server:
        assert _decision(server, ds, ds.not_covered) == "DECISION_NOT_COVERED"
        cli("snapshot", "activate", "2", data_dir=host)
        _until(lambda: _decision(server, ds, ds.not_covered) == "DECISION_COVERED")
        cli("snapshot", "activate", "1", data_dir=host)
        _until(lambda: _decision(server, ds, ds.not_covered) == "DECISION_NOT_COVERED")
        cli("snapshot", "activate", "2", data_dir=host)
        _until(lambda: _decision(server, ds, ds.not_covered) == "DECISION_COVERED")
        out = cli("snapshot", "rollback", data_dir=host).stdout
        assert "generation 1" in out
        _until(lambda: _decision(server, ds, ds.not_covered) == "DECISION_NOT_COVERED")
        assert "serving rights generation 1" in server.log()


def _until(predicate: Any, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")

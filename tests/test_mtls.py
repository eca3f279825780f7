"""mTLS: client certificates identify practitioners (SAN URI, else CN), from our CA only, optionally
pinned; a token and a certificate naming different callers are refused. Real TLS server on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import (
    HOSPITAL_ID,
    PHARMACIST_ID,
    PHARMACY_AMC,
    RunningServer,
    build_dataset,
    cli,
)

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject_cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca_key = _key()
        self.ca = _cert("covergate test CA", self.ca_key, None, ca=True)
        other_key = _key()
        self.other_ca = (_cert("someone else's CA", other_key, None, ca=True), other_key)
        server_key = _key()
        server = _cert(
            "localhost",
            server_key,
            (self.ca, self.ca_key),
            san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        self.dir = tmp
        (tmp / "ca.pem").write_bytes(_pem(self.ca))
        (tmp / "server.pem").write_bytes(_pem(server))
        (tmp / "server.key").write_bytes(_pem_key(server_key))

    def client(
        self, *, uri: str | None = None, cn: str = "client", other_ca: bool = False
    ) -> tuple[bytes, bytes, x509.Certificate]:
        key = _key()
        issuer = self.other_ca if other_ca else (self.ca, self.ca_key)
        san = [x509.UniformResourceIdentifier(uri)] if uri else None
        cert = _cert(cn, key, issuer, san=san)
        return _pem(cert), _pem_key(key), cert

    def health_credentials(self) -> grpc.ChannelCredentials:
        cert, key, _ = self.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca), private_key=key, certificate_chain=cert
        )

    def server_args(self) -> list[str]:
        return [
            "--tls-cert", str(self.dir / "server.pem"),
            "--tls-key", str(self.dir / "server.key"),
            "--client-ca", str(self.dir / "ca.pem"),
        ]  # fmt: skip


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("mtls")
    ds = build_dataset(tmp)
    pki = Pki(tmp)
    server = RunningServer(
        ds.data_dir, args=pki.server_args(), credentials=pki.health_credentials()
    )
    yield ds, pki, server
    server.stop()


def _check(
    server: RunningServer,
    pki: Pki,
    ds,  # type: ignore[no-untyped-def]
    client: tuple[bytes, bytes, x509.Certificate] | None,
    token: str | None = None,
) -> pb.CheckCoverageResponse:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki.dir / "ca.pem").read_bytes(),
        private_key=client[1] if client else None,
        certificate_chain=client[0] if client else None,
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.secure_channel(server.target, creds) as channel:
        return pb_grpc.CoverageServiceStub(channel).CheckCoverage(
            pb.CheckCoverageRequest(
                **ds.covered.fields(), amc_number=PHARMACY_AMC, domain=pb.CARE_DOMAIN_PHARMACY
            ),
            metadata=metadata,
            timeout=10,
        )


def _reason(exc: grpc.RpcError) -> str:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo")


def test_certificate_with_san_uri_identifies_the_practitioner(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    client = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
    resp = _check(server, pki, ds, client)
    assert resp.decision == pb.DECISION_COVERED


def test_certificate_cn_is_used_without_san(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    resp = _check(server, pki, ds, pki.client(cn=PHARMACIST_ID))
    assert resp.decision == pb.DECISION_COVERED


def test_no_client_certificate_is_refused(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    with pytest.raises(grpc.RpcError) as err:
        _check(server, pki, ds, None, token=ds.tokens["pharmacist"])
    # The TLS handshake itself fails: the server requires a client certificate.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    client = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}", other_ca=True)
    with pytest.raises(grpc.RpcError) as err:
        _check(server, pki, ds, client)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_token_and_certificate_naming_different_practitioners_are_refused(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    client = pki.client(uri=f"urn:covergate:practitioner:{HOSPITAL_ID}")
    with pytest.raises(grpc.RpcError) as err:
        _check(server, pki, ds, client, token=ds.tokens["pharmacist"])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(err.value) == "CREDENTIAL_MISMATCH"
    # The same token with its own practitioner's certificate is fine.
    client = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
    assert _check(server, pki, ds, client, token=ds.tokens["pharmacist"]).decision == (
        pb.DECISION_COVERED
    )


def test_unknown_practitioner_certificate_is_refused(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    with pytest.raises(grpc.RpcError) as err:
        _check(server, pki, ds, pki.client(uri="urn:covergate:practitioner:10000000000"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_pinned_fingerprints(mtls) -> None:  # type: ignore[no-untyped-def]
    ds, pki, server = mtls
    registered = pki.client(uri=f"urn:covergate:practitioner:{HOSPITAL_ID}")
    unregistered = pki.client(uri=f"urn:covergate:practitioner:{HOSPITAL_ID}")
    fingerprint = registered[2].fingerprint(hashes.SHA256()).hex()
    cli("practitioner", "pin", HOSPITAL_ID, "--fingerprint", fingerprint, data_dir=ds.data_dir)
    try:
        assert _check(server, pki, ds, registered).decision == pb.DECISION_COVERED
        with pytest.raises(grpc.RpcError) as err:
            _check(server, pki, ds, unregistered)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert _reason(err.value) == "CERTIFICATE_NOT_REGISTERED"
    finally:
        cli("practitioner", "unpin", HOSPITAL_ID, data_dir=ds.data_dir)
    assert _check(server, pki, ds, unregistered).decision == pb.DECISION_COVERED


def test_global_pinning_refuses_unregistered_certificates(tmp_path: Path) -> None:
    ds = build_dataset(tmp_path)
    pki = Pki(tmp_path)
    config = tmp_path / "pin.toml"
    config.write_text('[auth]\nmethods = ["certificate"]\npin_certificates = true\n')
    with RunningServer(
        ds.data_dir,
        args=[*pki.server_args(), "--config", str(config)],
        credentials=pki.health_credentials(),
    ) as server:
        client = pki.client(uri=f"urn:covergate:practitioner:{PHARMACIST_ID}")
        with pytest.raises(grpc.RpcError) as err:
            _check(server, pki, ds, client)
        assert _reason(err.value) == "CERTIFICATE_NOT_REGISTERED"
        # Tokens are not accepted at all by this configuration.
        pinned = client[2].fingerprint(hashes.SHA256()).hex()
        cli("practitioner", "pin", PHARMACIST_ID, "--fingerprint", pinned, data_dir=ds.data_dir)
        assert _check(server, pki, ds, client).decision == pb.DECISION_COVERED
        with pytest.raises(grpc.RpcError) as err:
            _check(server, pki, ds, client, token=ds.tokens["pharmacist"])
        assert _reason(err.value) == "CREDENTIAL_METHOD_NOT_ACCEPTED"

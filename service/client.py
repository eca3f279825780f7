"""A small client for practitioner software: check coverage over gRPC with a bearer token and/or
a client certificate, and get back plain Python values, or a CoverageError with google.rpc details.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from fastpath.rules import DOMAIN_CODES

DECISIONS = {v.number: v.name.removeprefix("DECISION_") for v in pb.Decision.DESCRIPTOR.values}


# Not frozen: Python sets __traceback__ on an exception as it travels (contextlib does it with
# setattr), which a frozen dataclass refuses.
@dataclass(eq=False)
class CoverageError(Exception):
    """A refused check: gRPC code name, message, ErrorInfo reason, and for INVALID_ARGUMENT the
    invalid field names (`fields`) with the rule each one breaks (`rules`, in the same order)."""

    code: str
    message: str
    reason: str = ""
    fields: tuple[str, ...] = ()
    retry_after_seconds: float | None = None
    rules: tuple[str, ...] = ()

    @property
    def from_server(self) -> bool:
        """True when the server answered with this error; False when the call never reached it
        (connection refused, TLS handshake, deadline): then `message` is gRPC's own."""
        return bool(self.reason or self.fields) or self.code not in (
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
            "UNKNOWN",
            "CANCELLED",
        )

    def __str__(self) -> str:
        extra = f" [{self.reason}]" if self.reason else ""
        if self.fields:
            rules = self.rules or ("",) * len(self.fields)
            listed = ", ".join(
                f"{name} ({rule})" if rule else name
                for name, rule in zip(self.fields, rules, strict=True)
            )
            return f"{self.code}{extra}: invalid field(s): {listed}"
        return f"{self.code}{extra}: {self.message}"


@dataclass(frozen=True)
class CoverageResult:
    request_id: str
    decision: str  # COVERED, NOT_COVERED, NO_MATCH; UNSPECIFIED when `error` is set
    rate_percent: int = 0
    convention_type: str = ""
    rights_end_date: str = ""
    attestation: str = ""
    error: CoverageError | None = field(default=None)

    @property
    def covered(self) -> bool:
        return self.decision == "COVERED"


def _error_from_status(status: status_pb2.Status) -> CoverageError:
    reason, fields, rules, retry = "", [], [], None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = [v.field for v in bad.field_violations]
            rules = [v.description for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.ToTimedelta().total_seconds()
    code = grpc.StatusCode(next(c.value for c in grpc.StatusCode if c.value[0] == status.code))
    return CoverageError(code.name, status.message, reason, tuple(fields), retry, tuple(rules))


def error_from_rpc(exc: grpc.RpcError) -> CoverageError:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        return _error_from_status(status)
    return CoverageError(exc.code().name, exc.details() or "")  # type: ignore[attr-defined]


def _result(resp: pb.CheckCoverageResponse) -> CoverageResult:
    return CoverageResult(
        request_id=resp.request_id,
        decision=DECISIONS[resp.decision],
        rate_percent=resp.rate_percent,
        convention_type=resp.convention_type,
        rights_end_date=resp.rights_end_date,
        attestation=resp.attestation,
        error=_error_from_status(resp.error) if resp.HasField("error") else None,
    )


def domain_number(domain: str) -> int:
    """A care domain's CareDomain number from its CSV code or enum name, in any case."""
    name = domain.strip().upper()
    if name in DOMAIN_CODES:
        return DOMAIN_CODES[name]
    try:
        return pb.CareDomain.Value(name)
    except ValueError:
        raise ValueError(
            f"unknown care domain {domain!r}: one of {', '.join(DOMAIN_CODES)}"
        ) from None


def request(
    *,
    nir: str,
    nir_key: str,
    birth_date: str,
    birth_rank: int,
    amc_number: str,
    domain: str | int,
    member_number: str = "",
    care_date: str = "",
    request_id: str = "",
) -> pb.CheckCoverageRequest:
    """Build a request; `domain` is a CSV code (PHAR, MEDE, ..., any case), a CareDomain name
    (CARE_DOMAIN_PHARMACY) or a CareDomain number."""
    domain_value = domain_number(domain) if isinstance(domain, str) else domain
    return pb.CheckCoverageRequest(
        request_id=request_id,
        nir=nir,
        nir_key=nir_key,
        birth_date=birth_date,
        birth_rank=birth_rank,
        amc_number=amc_number,
        member_number=member_number,
        domain=domain_value,  # type: ignore[arg-type]
        care_date=care_date,
    )


class CoverageClient:
    """Blocking client. `target` is HOST:PORT; TLS unless `insecure` (development only).

    The caller is identified by `token` (sent as `authorization: Bearer`), by `client_cert`
    (certificate chain PEM, private key PEM: mTLS), or both; with `token=None` no authorization
    header is sent, so a client certificate alone identifies the caller.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        insecure: bool = False,
        root_certificates: bytes | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        timeout: float = 5.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if insecure and client_cert:
            raise ValueError("a client certificate needs TLS: do not pass insecure=True with it")
        if insecure:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=client_cert[1] if client_cert else None,
                certificate_chain=client_cert[0] if client_cert else None,
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._timeout = timeout
        self._coverage = pb_grpc.CoverageServiceStub(self._channel)
        self._attestation = pb_grpc.AttestationServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CoverageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, **fields: Any) -> CoverageResult:
        """One check (keyword arguments as for `request`); raises CoverageError when refused."""
        try:
            resp = self._coverage.CheckCoverage(
                request(**fields), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return _result(resp)

    def check_batch(self, items: Iterable[dict[str, Any]]) -> list[CoverageResult]:
        """Many checks in one call; refused items come back with `error` set, in order."""
        batch = pb.CheckCoverageBatchRequest(items=[request(**i) for i in items])
        try:
            resp = self._coverage.CheckCoverageBatch(
                batch, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return [_result(r) for r in resp.items]

    def check_stream(self, items: Iterable[dict[str, Any]]) -> Iterator[CoverageResult]:
        try:
            for resp in self._coverage.CheckCoverageStream(
                (request(**i) for i in items), metadata=self._metadata
            ):
                yield _result(resp)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def verify_attestation(
        self,
        *,
        attestation: str,
        practitioner_id: str,
        nir: str,
        nir_key: str,
        birth_date: str,
        birth_rank: int,
    ) -> pb.VerifyAttestationResponse:
        """For claims systems (a token with role claims)."""
        try:
            return self._attestation.VerifyAttestation(  # type: ignore[no-any-return]
                pb.VerifyAttestationRequest(
                    attestation=attestation,
                    practitioner_id=practitioner_id,
                    nir=nir,
                    nir_key=nir_key,
                    birth_date=birth_date,
                    birth_rank=birth_rank,
                ),
                metadata=self._metadata,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

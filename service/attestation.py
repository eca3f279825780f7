"""VerifyAttestation for insurers' claims systems: is this attestation genuine, unexpired, and
bound to the practitioner who billed and the beneficiary the claim is for?
"""

from __future__ import annotations

import hmac
from functools import lru_cache
from typing import cast

from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2

from covergate.v1 import covergate_pb2 as pb
from fastpath import Keys, rules

_FIELDS = {
    1: ("attestation", "the attestation string returned by CheckCoverage"),
    2: ("practitioner_id", "9 to 14 digits"),
    3: ("nir", rules.FIELD_RULES[rules.F_NIR]),
    4: ("nir_key", rules.FIELD_RULES[rules.F_NIR_KEY]),
    5: ("birth_date", rules.FIELD_RULES[rules.F_BIRTH_DATE]),
    6: ("birth_rank", rules.FIELD_RULES[rules.F_BIRTH_RANK]),
}
MAX_ATTESTATION = 512


@lru_cache(maxsize=128)
def _invalid(mask: int) -> bytes:
    chosen = [(name, rule) for f, (name, rule) in _FIELDS.items() if mask & (1 << f)]
    return rules.status_bytes(
        rules.INVALID_ARGUMENT,
        "invalid field(s): " + ", ".join(name for name, _ in chosen),
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=name, description=rule)
                for name, rule in chosen
            ]
        ),
    )


class AttestationVerifier:
    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._attestation_key = keys.attestation_key

    def verify(self, request: bytes, now: int) -> tuple[int, bytes]:
        """(OK, VerifyAttestationResponse bytes) or (code, google.rpc.Status bytes)."""
        try:
            req = pb.VerifyAttestationRequest.FromString(request)
        except DecodeError:
            return rules.INVALID_ARGUMENT, rules.malformed_message_status(
                "VerifyAttestationRequest"
            )
        bad = 0
        if not req.attestation or len(req.attestation) > MAX_ATTESTATION:
            bad |= 1 << 1
        if not rules.valid_practitioner_id(req.practitioner_id):
            bad |= 1 << 2
        nir = rules.normalise_nir(req.nir)
        nir_ok = rules.valid_nir(nir)
        if not nir_ok:
            bad |= 1 << 3
        if not rules.valid_nir_key_format(req.nir_key) or (
            nir_ok and int(req.nir_key) != rules.nir_key_for(nir)
        ):
            bad |= 1 << 4
        if not rules.valid_birth_date(req.birth_date):
            bad |= 1 << 5
        if not 1 <= req.birth_rank <= 9:
            bad |= 1 << 6
        if bad:
            return rules.INVALID_ARGUMENT, _invalid(bad)

        claims = rules.decode_attestation(self._attestation_key, req.attestation)
        if isinstance(claims, str):
            return rules.OK, pb.VerifyAttestationResponse(
                valid=False, reason=claims
            ).SerializeToString()
        reason = ""
        if claims.expires < now:
            reason = "EXPIRED"
        elif claims.practitioner_id != req.practitioner_id:
            reason = "WRONG_PRACTITIONER"
        else:
            tag = self._keys.beneficiary_tag(
                rules.identity_bytes(nir, req.birth_date, req.birth_rank)
            )
            if not hmac.compare_digest(tag, claims.beneficiary_tag):
                reason = "WRONG_BENEFICIARY"
        if reason:
            return rules.OK, pb.VerifyAttestationResponse(
                valid=False, reason=reason
            ).SerializeToString()
        return rules.OK, pb.VerifyAttestationResponse(
            valid=True,
            domain=cast("pb.CareDomain", claims.domain),
            care_date=f"{claims.care_date:08d}",
            amc_number=claims.amc_number,
        ).SerializeToString()

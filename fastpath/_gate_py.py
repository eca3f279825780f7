"""Pure-Python reference of the covergate gate: one call decides one request, a batch or a stream
message, from serialized request bytes to serialized response (or google.rpc.Status) bytes.

It defines the behaviour; `_gate_c.pyx` must match it byte for byte (tests/test_fastpath_*.py).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.rules import (
    DECISION_COVERED,
    DECISION_NO_MATCH,
    DECISION_NOT_COVERED,
    INVALID_ARGUMENT,
    OK,
    Keys,
    Practitioner,
)

IMPLEMENTATION = "python"


class Gate:
    """Decides coverage requests against one LMDB rights database.

    `today` (YYYYMMDD as an int, Europe/Paris) and `now` (unix seconds) come from the caller so
    that one clock, controlled by tests, drives every decision.
    """

    def __init__(
        self,
        env: Any,
        rights_db: Any,
        keys: Keys,
        *,
        max_batch_items: int = 500,
        attestation_ttl: int = 7 * 86400,
    ) -> None:
        self._env = env
        self._rights_db = rights_db
        self._keys = keys
        self._attestation_key = keys.attestation_key
        self.max_batch_items = max_batch_items
        self.attestation_ttl = attestation_ttl
        # Store reads performed, for tests proving which refusals never touch the store.
        self.store_reads = 0

    # -- entry points ------------------------------------------------------------------------------

    def check(
        self, practitioner: Practitioner, request: bytes, today: int, now: int
    ) -> tuple[int, bytes]:
        """A unary call: (OK, CheckCoverageResponse) or (code, google.rpc.Status)."""
        try:
            req = pb.CheckCoverageRequest.FromString(request)
        except DecodeError:
            return INVALID_ARGUMENT, rules.malformed_message_status("CheckCoverageRequest")
        with self._env.begin(db=self._rights_db, buffers=False) as txn:
            code, payload = self._decide(txn, practitioner, req, today, now)
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            return OK, payload.SerializeToString()
        assert isinstance(payload, bytes)
        return code, payload

    def check_item(
        self, practitioner: Practitioner, request: bytes, today: int, now: int
    ) -> bytes:
        """A stream message: always a CheckCoverageResponse, refusals carried in `error`."""
        try:
            req = pb.CheckCoverageRequest.FromString(request)
        except DecodeError:
            return self._error_response(
                "", rules.malformed_message_status("CheckCoverageRequest")
            ).SerializeToString()
        with self._env.begin(db=self._rights_db, buffers=False) as txn:
            return self._item(txn, practitioner, req, today, now).SerializeToString()

    def check_batch(
        self, practitioner: Practitioner, request: bytes, today: int, now: int
    ) -> tuple[int, bytes]:
        """A batch: (OK, CheckCoverageBatchResponse) or (code, google.rpc.Status) for the whole."""
        try:
            batch = pb.CheckCoverageBatchRequest.FromString(request)
        except DecodeError:
            return INVALID_ARGUMENT, rules.malformed_message_status("CheckCoverageBatchRequest")
        if len(batch.items) > self.max_batch_items:
            return INVALID_ARGUMENT, rules.batch_too_large_status(self.max_batch_items)
        out = pb.CheckCoverageBatchResponse()
        with self._env.begin(db=self._rights_db, buffers=False) as txn:
            for req in batch.items:
                out.items.append(self._item(txn, practitioner, req, today, now))
        return OK, out.SerializeToString()

    # -- one decision --------------------------------------------------------------------------------

    def _item(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest,
        today: int,
        now: int,
    ) -> pb.CheckCoverageResponse:
        code, payload = self._decide(txn, practitioner, req, today, now)
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            return payload
        assert isinstance(payload, bytes)
        request_id = req.request_id if rules.valid_request_id(req.request_id) else ""
        return self._error_response(request_id, payload)

    @staticmethod
    def _error_response(request_id: str, status: bytes) -> pb.CheckCoverageResponse:
        resp = pb.CheckCoverageResponse(request_id=request_id)
        resp.error.ParseFromString(status)
        return resp

    def _decide(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest,
        today: int,
        now: int,
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        # 1. Validate every field; report all bad fields at once, by name only.
        bad = 0
        request_id = req.request_id
        if not rules.valid_request_id(request_id):
            bad |= 1 << rules.F_REQUEST_ID
        nir = rules.normalise_nir(req.nir)
        nir_ok = rules.valid_nir(nir)
        if not nir_ok:
            bad |= 1 << rules.F_NIR
        nir_key = req.nir_key
        if not rules.valid_nir_key_format(nir_key) or (
            nir_ok and int(nir_key) != rules.nir_key_for(nir)
        ):
            bad |= 1 << rules.F_NIR_KEY
        birth_date = req.birth_date
        if not rules.valid_birth_date(birth_date):
            bad |= 1 << rules.F_BIRTH_DATE
        birth_rank = req.birth_rank
        if not 1 <= birth_rank <= 9:
            bad |= 1 << rules.F_BIRTH_RANK
        amc_number = req.amc_number
        if not rules.valid_amc_number(amc_number):
            bad |= 1 << rules.F_AMC_NUMBER
        member_number = req.member_number
        if not rules.valid_member_number(member_number):
            bad |= 1 << rules.F_MEMBER_NUMBER
        domain = req.domain
        if not 1 <= domain <= rules.MAX_DOMAIN:
            bad |= 1 << rules.F_DOMAIN
        care_date = today
        if req.care_date:
            if rules.valid_calendar_date(req.care_date):
                care_date = int(req.care_date)
            else:
                bad |= 1 << rules.F_CARE_DATE
        if bad:
            return INVALID_ARGUMENT, rules.invalid_fields_status(bad)

        # 2. Pseudonymise and read the store: one keyed hash, one LMDB get.
        identity = rules.identity_bytes(nir, birth_date, birth_rank)
        storage_key = self._keys.storage_key(identity)
        self.store_reads += 1
        value = txn.get(storage_key)

        # 3. Every factor must match; any miss is the same NO_MATCH.
        matched: list[rules.RightRow] = []
        if value is not None:
            member_hash = (
                self._keys.member_hash(storage_key, member_number) if member_number else None
            )
            matched = [
                row
                for row in rules.decode_record(value)
                if row.amc_number == amc_number
                and (member_hash is None or row.member_hash == member_hash)
            ]
        if not matched:
            return OK, pb.CheckCoverageResponse(request_id=request_id, decision=DECISION_NO_MATCH)

        # 4. Rights open for the domain on the care date; the one running longest wins.
        best: rules.RightRow | None = None
        for row in matched:
            if (
                row.domain == domain
                and row.start <= care_date <= row.end
                and (best is None or row.end > best.end)
            ):
                best = row
        if best is None:
            return OK, pb.CheckCoverageResponse(
                request_id=request_id, decision=DECISION_NOT_COVERED
            )

        attestation = rules.encode_attestation(
            self._attestation_key,
            expires=now + self.attestation_ttl,
            domain=domain,
            care_date=care_date,
            amc_number=amc_number,
            practitioner_id=practitioner.practitioner_id,
            beneficiary_tag=self._keys.beneficiary_tag(identity),
        )
        return OK, pb.CheckCoverageResponse(
            request_id=request_id,
            decision=DECISION_COVERED,
            rate_percent=best.rate_percent,
            convention_type=best.convention_type,
            rights_end_date=f"{best.end:08d}",
            attestation=attestation,
        )

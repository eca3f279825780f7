"""Pure-Python reference of the covergate gate: one call decides one request, a batch or a stream
message, from serialized request bytes to serialized response (or google.rpc.Status) bytes.

It defines the behaviour; `_gate_c.pyx` must match it byte for byte (tests/test_fastpath_*.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from google.protobuf.message import DecodeError

from covergate.v1 import covergate_pb2 as pb
from fastpath import rules
from fastpath.quota import (
    FLAG_SUSPENDED,
    MAX_DISTINCT_LIMIT,
    SHADOW_DAILY,
    SHADOW_DISTINCT,
    SHADOW_GUARD,
    SHADOW_RATE,
    QuotaFile,
    QuotaProfile,
    SlotState,
    fingerprint,
)
from fastpath.rules import (
    DECISION_COVERED,
    DECISION_NO_MATCH,
    DECISION_NOT_COVERED,
    INVALID_ARGUMENT,
    OK,
    PERMISSION_DENIED,
    RESOURCE_EXHAUSTED,
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
        quota: QuotaFile | None = None,
    ) -> None:
        self._env = env
        self._quota = quota
        self._rights_db = rights_db
        self._keys = keys
        self._attestation_key = keys.attestation_key
        self.max_batch_items = max_batch_items
        self.attestation_ttl = attestation_ttl
        # Store reads performed, for tests proving which refusals never touch the store.
        self.store_reads = 0
        # Practitioner ids the harvest guard suspended since the caller last emptied this list.
        self.suspensions: list[str] = []

    def close(self) -> None:
        """Stop using the quota file (the C gate holds a view of its mapping)."""
        self._quota = None

    @contextmanager
    def _slot(self, practitioner: Practitioner, today: int) -> Iterator[SlotState | None]:
        """The practitioner's quota state, locked across processes for the whole call."""
        if self._quota is None or practitioner.slot < 0 or practitioner.quota is None:
            yield None
            return
        quota, slot = self._quota, practitioner.slot
        quota.lock(slot)
        try:
            state = quota.read(slot)
            quota.roll_day(slot, state, today)
            yield state
            quota.write(slot, state)
        finally:
            quota.unlock(slot)

    # -- entry points ------------------------------------------------------------------------------

    def check(
        self, practitioner: Practitioner, request: bytes, today: int, now: float
    ) -> tuple[int, bytes]:
        """A unary call: (OK, CheckCoverageResponse) or (code, google.rpc.Status)."""
        try:
            req = pb.CheckCoverageRequest.FromString(request)
        except DecodeError:
            return INVALID_ARGUMENT, rules.malformed_message_status("CheckCoverageRequest")
        with self._env.begin(db=self._rights_db, buffers=False) as txn, self._slot(
            practitioner, today
        ) as state:
            code, payload = self._decide(txn, practitioner, req, today, now, state)
        if code == OK:
            assert isinstance(payload, pb.CheckCoverageResponse)
            return OK, payload.SerializeToString()
        assert isinstance(payload, bytes)
        return code, payload

    def check_item(
        self, practitioner: Practitioner, request: bytes, today: int, now: float
    ) -> bytes:
        """A stream message: always a CheckCoverageResponse, refusals carried in `error`."""
        try:
            req = pb.CheckCoverageRequest.FromString(request)
        except DecodeError:
            return self._error_response(
                "", rules.malformed_message_status("CheckCoverageRequest")
            ).SerializeToString()
        with self._env.begin(db=self._rights_db, buffers=False) as txn, self._slot(
            practitioner, today
        ) as state:
            return self._item(txn, practitioner, req, today, now, state).SerializeToString()

    def check_batch(
        self, practitioner: Practitioner, request: bytes, today: int, now: float
    ) -> tuple[int, bytes]:
        """A batch: (OK, CheckCoverageBatchResponse) or (code, google.rpc.Status) for the whole."""
        try:
            batch = pb.CheckCoverageBatchRequest.FromString(request)
        except DecodeError:
            return INVALID_ARGUMENT, rules.malformed_message_status("CheckCoverageBatchRequest")
        if len(batch.items) > self.max_batch_items:
            return INVALID_ARGUMENT, rules.batch_too_large_status(self.max_batch_items)
        out = pb.CheckCoverageBatchResponse()
        with self._env.begin(db=self._rights_db, buffers=False) as txn, self._slot(
            practitioner, today
        ) as state:
            for req in batch.items:
                out.items.append(self._item(txn, practitioner, req, today, now, state))
        return OK, out.SerializeToString()

    # -- one decision --------------------------------------------------------------------------------

    def _item(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest,
        today: int,
        now: float,
        state: SlotState | None,
    ) -> pb.CheckCoverageResponse:
        code, payload = self._decide(txn, practitioner, req, today, now, state)
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
        now: float,
        state: SlotState | None,
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        profile = practitioner.quota
        now_ms = int(now * 1000) if state is not None else 0
        # 0. A suspended practitioner gets nothing, and its refusals count nowhere.
        if state is not None and state.flags & FLAG_SUSPENDED:
            return PERMISSION_DENIED, rules.PRACTITIONER_SUSPENDED

        # 1. Rate (GCRA) counts every attempt, valid or not, so floods of garbage are throttled.
        if state is not None:
            assert profile is not None
            tat = max(state.tat_ms, now_ms)
            if tat - now_ms > profile.tolerance_ms:
                if not profile.shadow & SHADOW_RATE:
                    wait = tat - profile.tolerance_ms - now_ms
                    return RESOURCE_EXHAUSTED, rules.quota_status(
                        rules.REASON_RATE, rules.rate_retry_seconds(wait)
                    )
            else:
                state.tat_ms = tat + profile.interval_ms

        code, payload = self._evaluate(txn, practitioner, req, today, now, state, profile)

        # 7. The harvest guard watches the share of NO_MATCH and invalid answers.
        if state is not None and (code == OK or code == INVALID_ARGUMENT):
            assert profile is not None
            bad = code == INVALID_ARGUMENT or (
                isinstance(payload, pb.CheckCoverageResponse)
                and payload.decision == DECISION_NO_MATCH
            )
            self._guard(practitioner, state, profile, bad, now_ms)
        return code, payload

    def _guard(
        self,
        practitioner: Practitioner,
        state: SlotState,
        profile: QuotaProfile,
        bad: bool,
        now_ms: int,
    ) -> None:
        state.window_bits = ((state.window_bits << 1) | int(bad)) & 0xFFFFFFFFFFFFFFFF
        state.window_len = min(state.window_len + 1, 64)
        n = min(state.window_len, profile.guard_window)
        if n < profile.guard_min_lookups:
            return
        bad_count = (state.window_bits & ((1 << n) - 1)).bit_count()
        if bad_count * 100 >= profile.guard_bad_percent * n and not profile.shadow & SHADOW_GUARD:
            state.flags |= FLAG_SUSPENDED
            state.suspended_at_ms = now_ms
            state.guard_fired += 1
            self.suspensions.append(practitioner.practitioner_id)

    def _evaluate(
        self,
        txn: Any,
        practitioner: Practitioner,
        req: pb.CheckCoverageRequest,
        today: int,
        now: float,
        state: SlotState | None,
        profile: QuotaProfile | None,
    ) -> tuple[int, pb.CheckCoverageResponse | bytes]:
        # 2. Validate every field; report all bad fields at once, by name only.
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

        # 3. Scope, before anything is counted or read: the profession's domains, the agreements.
        if not practitioner.domains & (1 << domain):
            return PERMISSION_DENIED, rules.DOMAIN_OUT_OF_SCOPE
        if practitioner.amc_numbers is not None and amc_number not in practitioner.amc_numbers:
            return PERMISSION_DENIED, rules.AMC_OUT_OF_SCOPE

        identity = rules.identity_bytes(nir, birth_date, birth_rank)

        # 4. Daily lookups and distinct beneficiaries: check both, then count both.
        if state is not None:
            assert profile is not None and self._quota is not None
            if state.daily_count >= profile.daily_limit and not profile.shadow & SHADOW_DAILY:
                return RESOURCE_EXHAUSTED, rules.quota_status(
                    rules.REASON_DAILY, rules.day_retry_seconds(today, now)
                )
            fp = fingerprint(self._keys.pseudonym(identity))
            full = state.distinct_count >= profile.distinct_limit
            seen, added = self._quota.seen_or_add(
                practitioner.slot,
                fp,
                may_add=(not full or bool(profile.shadow & SHADOW_DISTINCT))
                and state.distinct_count < MAX_DISTINCT_LIMIT,
            )
            if not seen and full and not profile.shadow & SHADOW_DISTINCT:
                return RESOURCE_EXHAUSTED, rules.quota_status(
                    rules.REASON_DISTINCT, rules.day_retry_seconds(today, now)
                )
            state.daily_count = min(state.daily_count + 1, 0xFFFFFFFF)
            if added:
                state.distinct_count += 1

        # 5. Pseudonymise and read the store: one keyed hash, one LMDB get.
        storage_key = self._keys.storage_key(identity)
        self.store_reads += 1
        value = txn.get(storage_key)

        # 6. Every factor must match; any miss is the same NO_MATCH.
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

        # Rights open for the domain on the care date; the one running longest wins.
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
            expires=int(now) + self.attestation_ttl,
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

"""The conventional stack: the coverage service as a user would build it without covergate, on the
same LMDB store, to show what covergate's fast path, batching and in-process quotas buy.

A grpc.aio servicer from the generated classes; per lookup: the field checks, a hashlib keyed hash,
a py-lmdb get, protobuf objects, a Redis INCR+EXPIRE rate-limit counter (the envoy-ratelimit way,
pipelined in one round trip) and one OpenTelemetry span (SDK, BatchSpanProcessor, an exporter that
drops the spans in-process). A batch pipelines its items' counters in one Redis round trip.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import lmdb
import redis.asyncio as redis
from google.rpc import status_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench import workers
from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from fastpath import rules

RATE_LIMIT_PER_MINUTE = 1_000_000_000  # counted on every lookup, never reached by the bench
INVALID_ARGUMENT = 3


class DroppingExporter(SpanExporter):
    """Accepts every batch of spans and throws it away: the SDK's cost without a collector."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class ConventionalCoverage(pb_grpc.CoverageServiceServicer):
    def __init__(self, data_dir: Path, redis_url: str) -> None:
        self.pepper = bytes.fromhex((data_dir / "pepper").read_text().strip())
        self.env = lmdb.open(
            str(data_dir / "store"), readonly=True, max_dbs=8, readahead=False, lock=True
        )
        self.rights = self.env.open_db(b"rights", create=False)
        self.credentials = self.env.open_db(b"credentials", create=False)
        self.practitioners = self.env.open_db(b"practitioners", create=False)
        self.attestation_key = hashlib.blake2b(
            b"", digest_size=32, key=self.pepper, person=rules.PERSON_ATTEST_KEY
        ).digest()
        self.callers: dict[str, dict[str, Any]] = {}
        self.redis = redis.Redis.from_url(redis_url)
        provider = TracerProvider(resource=Resource.create({"service.name": "conventional"}))
        provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
        self.tracer = provider.get_tracer("conventional")

    # -- authentication --------------------------------------------------------------------------

    def _caller(self, context: grpc.aio.ServicerContext) -> dict[str, Any] | None:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[7:].strip()
        caller = self.callers.get(token)
        if caller is not None:
            return caller
        _, _, rest = token.partition(".")
        token_id, _, secret = rest.partition(".")
        with self.env.begin() as txn:
            raw = txn.get(token_id.encode(), db=self.credentials)
            if raw is None:
                return None
            credential = json.loads(raw)
            digest = hashlib.sha256(secret.encode()).hexdigest()
            if not hmac.compare_digest(digest, credential["secret_sha256"]):
                return None
            record = txn.get(credential["practitioner_id"].encode(), db=self.practitioners)
        if record is None:
            return None
        caller = json.loads(record)
        self.callers[token] = caller
        return caller

    # -- one lookup ------------------------------------------------------------------------------

    def _invalid_fields(self, req: pb.CheckCoverageRequest) -> list[str]:
        bad = []
        if not rules.valid_request_id(req.request_id):
            bad.append("request_id")
        nir = rules.normalise_nir(req.nir)
        nir_ok = rules.valid_nir(nir)
        if not nir_ok:
            bad.append("nir")
        if not rules.valid_nir_key_format(req.nir_key) or (
            nir_ok and int(req.nir_key) != rules.nir_key_for(nir)
        ):
            bad.append("nir_key")
        if not rules.valid_birth_date(req.birth_date):
            bad.append("birth_date")
        if not 1 <= req.birth_rank <= 9:
            bad.append("birth_rank")
        if not rules.valid_amc_number(req.amc_number):
            bad.append("amc_number")
        if not rules.valid_member_number(req.member_number):
            bad.append("member_number")
        if not 1 <= req.domain <= rules.MAX_DOMAIN:
            bad.append("domain")
        if req.care_date and not rules.valid_calendar_date(req.care_date):
            bad.append("care_date")
        return bad

    def _lookup(
        self, txn: Any, caller: dict[str, Any], req: pb.CheckCoverageRequest
    ) -> pb.CheckCoverageResponse:
        with self.tracer.start_as_current_span("coverage.check") as span:
            span.set_attribute("practitioner.id", caller["practitioner_id"])
            span.set_attribute("practitioner.profession", caller["profession"])
            span.set_attribute("coverage.domain", int(req.domain))
            span.set_attribute("coverage.amc", req.amc_number)
            bad = self._invalid_fields(req)
            if bad:
                span.set_attribute("coverage.refusal", "INVALID_ARGUMENT")
                return pb.CheckCoverageResponse(
                    request_id=req.request_id if "request_id" not in bad else "",
                    error=status_pb2.Status(
                        code=INVALID_ARGUMENT, message="invalid field(s): " + ", ".join(bad)
                    ),
                )
            identity = f"{rules.normalise_nir(req.nir)}{req.birth_date}{req.birth_rank}".encode()
            key = hashlib.blake2b(
                identity, digest_size=16, key=self.pepper, person=rules.PERSON_STORE
            ).digest()
            pseudonym = hashlib.blake2b(
                identity, digest_size=8, key=self.pepper, person=rules.PERSON_PSEUDONYM
            ).hexdigest()
            span.set_attribute("beneficiary.pseudonym", pseudonym)
            value = txn.get(key)
            matched = []
            if value is not None:
                member_hash = None
                if req.member_number:
                    member_hash = hashlib.blake2b(
                        req.member_number.encode(),
                        digest_size=16,
                        key=self.pepper,
                        salt=key,
                        person=rules.PERSON_MEMBER,
                    ).digest()
                matched = [
                    r
                    for r in rules.decode_record(value)
                    if r.amc_number == req.amc_number
                    and (member_hash is None or r.member_hash == member_hash)
                ]
            if not matched:
                span.set_attribute("coverage.decision", "NO_MATCH")
                return pb.CheckCoverageResponse(
                    request_id=req.request_id, decision=pb.DECISION_NO_MATCH
                )
            care_date = int(req.care_date or time.strftime("%Y%m%d"))
            open_rights = [
                r for r in matched if r.domain == req.domain and r.start <= care_date <= r.end
            ]
            if not open_rights:
                span.set_attribute("coverage.decision", "NOT_COVERED")
                return pb.CheckCoverageResponse(
                    request_id=req.request_id, decision=pb.DECISION_NOT_COVERED
                )
            best = max(open_rights, key=lambda r: r.end)
            tag = hashlib.blake2b(
                identity, digest_size=8, key=self.pepper, person=rules.PERSON_ATTEST
            ).digest()
            attestation = rules.encode_attestation(
                self.attestation_key,
                expires=int(time.time()) + 7 * 86400,
                domain=req.domain,
                care_date=care_date,
                amc_number=req.amc_number,
                practitioner_id=caller["practitioner_id"],
                beneficiary_tag=tag,
            )
            span.set_attribute("coverage.decision", "COVERED")
            return pb.CheckCoverageResponse(
                request_id=req.request_id,
                decision=pb.DECISION_COVERED,
                rate_percent=best.rate_percent,
                convention_type=best.convention_type,
                rights_end_date=f"{best.end:08d}",
                attestation=attestation,
            )

    async def _count(self, caller: dict[str, Any], lookups: int) -> bool:
        """INCR+EXPIRE per lookup, all of a call's in one pipelined round trip."""
        key = f"rl:{caller['practitioner_id']}:{int(time.time()) // 60}"
        pipe = self.redis.pipeline(transaction=False)
        for _ in range(lookups):
            pipe.incr(key)
            pipe.expire(key, 60)
        replies = await pipe.execute()
        return int(replies[-2]) <= RATE_LIMIT_PER_MINUTE

    # -- RPCs ------------------------------------------------------------------------------------

    async def _authenticated(self, context: grpc.aio.ServicerContext) -> dict[str, Any]:
        caller = self._caller(context)
        if caller is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown credential")
        assert caller is not None
        return caller

    async def CheckCoverage(
        self, request: pb.CheckCoverageRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageResponse:
        caller = await self._authenticated(context)
        if not await self._count(caller, 1):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited")
        with self.env.begin(db=self.rights) as txn:
            answer = self._lookup(txn, caller, request)
        if answer.HasField("error"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, answer.error.message)
        return answer

    async def CheckCoverageBatch(
        self, request: pb.CheckCoverageBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckCoverageBatchResponse:
        caller = await self._authenticated(context)
        if len(request.items) > 500:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "at most 500 items")
        if not await self._count(caller, len(request.items)):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limited")
        with self.env.begin(db=self.rights) as txn:
            items = [self._lookup(txn, caller, item) for item in request.items]
        return pb.CheckCoverageBatchResponse(items=items)

    async def CheckCoverageStream(
        self,
        request_iterator: AsyncIterator[pb.CheckCoverageRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.CheckCoverageResponse]:
        caller = await self._authenticated(context)
        async for request in request_iterator:
            if not await self._count(caller, 1):
                yield pb.CheckCoverageResponse(
                    request_id=request.request_id,
                    error=status_pb2.Status(code=8, message="rate limited"),
                )
                continue
            with self.env.begin(db=self.rights) as txn:
                yield self._lookup(txn, caller, request)


async def setup(server: grpc.aio.Server, options: dict[str, Any]) -> None:
    servicer = ConventionalCoverage(Path(options["data"]), options["redis"])
    pb_grpc.add_CoverageServiceServicer_to_server(servicer, server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--redis", required=True, help="redis://HOST:PORT/DB")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    return workers.serve(
        "bench-conventional", setup, args.workers, {"data": args.data, "redis": args.redis}
    )


if __name__ == "__main__":
    raise SystemExit(main())

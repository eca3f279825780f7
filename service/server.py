"""The gRPC server: CoverageService and AttestationService handlers over the fast path, health and
reflection, one asyncio worker per process sharing the port, graceful drain on SIGTERM.

Handlers receive and return raw bytes: the fast path parses requests and encodes responses itself,
so a malformed message is an INVALID_ARGUMENT from covergate, never an INTERNAL from grpcio's
deserialisation. covergate itself never answers INTERNAL. grpc-core, which checks the HTTP/2 and
gRPC framing before any handler runs, does, for exactly these client-sendable violations (grpcio
1.85; tests/test_server_limits.py checks each, the README lists them too):

- the compressed flag set with no grpc-encoding, or with grpc-encoding: identity;
- an unknown grpc-encoding (e.g. snappy);
- a gzip/deflate message that does not inflate, only with accept_compressed_requests = true (by
  default every compressed request is UNIMPLEMENTED, before any decompression);
- an unparsable te (not "trailers"), grpc-timeout, grpc-status, grpc-previous-rpc-attempts,
  grpc-retry-pushback-ms, grpc-internal-encoding-request or lb-cost-bin header, an unknown :method
  or :scheme, or a -bin header that is not base64;
- an illegal header name (uppercase, a space, an unknown pseudo-header) or an empty one;
- a header block that does not decode (HPACK); the connection is then closed;
- RST_STREAM INTERNAL_ERROR, which clients report as INTERNAL: :method other than POST, or no
  :method, :scheme, :path, :authority or te.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import lmdb
from google.rpc import status_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fastpath
from covergate.v1 import covergate_pb2
from fastpath import Keys, Practitioner, rules
from fastpath import trace as tr
from fastpath.baselines import BaselineFile
from fastpath.quota import CreditFile, QuotaFile
from service import snapshots
from service import telemetry as otel
from service.attestation import AttestationVerifier
from service.auth import Authenticator, AuthFailure, peer_certificate
from service.clock import ParisClock
from service.cluster import BackendUnavailable
from service.config import Config, PepperError, ServerSettings, load_pepper
from service.credit import GUARD_FIRED, GUARD_UNAVAILABLE, CreditAgent
from service.quotas import (
    PractitionerFactory,
    baseline_reason,
    open_baseline_file,
    open_credit_file,
    open_quota_file,
)
from service.reflection import enable_reflection
from service.shipper import run as shipper_main
from service.spool import SpoolFull
from service.store import DB_RIGHTS, Store, prefault, read_through

log = logging.getLogger("covergate.server")

COVERAGE_SERVICE = "covergate.v1.CoverageService"
# With [cluster]: a health service of its own, NOT_SERVING while the host runs degraded.
CLUSTER_SERVICE = "covergate.cluster"
ATTESTATION_SERVICE = "covergate.v1.AttestationService"
_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"

NOT_LOADED = rules.DATA_NOT_LOADED
GUARD_REASON = "harvest guard: too many NO_MATCH or invalid lookups"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path
    config: Config
    listen: str
    workers: int
    tls: TlsFiles | None
    pepper_file: str | None = None


class Refusal(Exception):
    """Ends the call with a google.rpc.Status (code, bytes) made by the fast path or auth;
    `practitioner` when a known practitioner was refused (suspended), for its trace."""

    def __init__(self, code: int, status: bytes, practitioner: Practitioner | None = None) -> None:
        self.code = code
        self.status = status
        self.practitioner = practitioner


_messages: dict[bytes, str] = {}


async def _abort(context: grpc.aio.ServicerContext, code: int, status: bytes) -> None:
    # The status message must equal the call's details or grpcio-status clients reject the pair.
    message = _messages.get(status)
    if message is None:
        message = status_pb2.Status.FromString(status).message
        if len(_messages) < 4096:
            _messages[status] = message
    await context.abort(_STATUS_CODES[code], message, trailing_metadata=((_DETAILS_KEY, status),))


class CovergateHandlers:
    """The RPC handlers of one worker. All of them run on the worker's event loop thread."""

    def __init__(
        self, store: Store, options: ServeOptions, telemetry: otel.Telemetry | None = None
    ) -> None:
        self._store = store
        self._options = options
        # Tracing on: the gate records every lookup's span, exported by `telemetry`.
        self.telemetry = telemetry
        self._settings = options.config.server
        # Opened after fork, like LMDB: every worker maps the same file and locks slots in it.
        self.quota = open_quota_file(options.data_dir, options.config, store.quota_slots_used())
        # With [cluster]: this host's credit per slot, and the worker's agent for Redis.
        self.credit_file: CreditFile | None = None
        self.credit: CreditAgent | None = None
        if options.config.cluster.enabled and options.config.quota.enabled:
            self.credit_file = open_credit_file(options.data_dir, self.quota.slots)
            self.credit = CreditAgent(options.config.cluster, self._credit_files)
        # Each practitioner's own past (fastpath.baselines), beside the quota state.
        self.baseline_file: BaselineFile | None = None
        if options.config.baselines.enabled and options.config.quota.enabled:
            self.baseline_file = open_baseline_file(options.data_dir, self.quota.slots)
        self._auth = Authenticator(store, options.config.auth, PractitionerFactory(options.config))
        # Client certificates exist only with --client-ca; otherwise skip the auth context.
        self._mtls = options.tls is not None and options.tls.client_ca is not None
        self._clock = ParisClock()
        self.gate: Any = None
        # The rights the gate reads: the store's own, or the active snapshot generation's.
        self.generation = 0
        self._rights_env: Any = store.env
        self._rights_db: Any = store.rights_db
        self._stale = False  # the cluster activated a generation this host does not have yet
        self._started = time.time()
        self._keys: Keys | None = None
        self._verifier: AttestationVerifier | None = None
        self.health = grpc_health.aio.HealthServicer()
        self.last_call_started = 0.0
        self._background: set[asyncio.Task[None]] = set()

    # -- readiness --------------------------------------------------------------------------------

    def _credit_files(self) -> tuple[QuotaFile, CreditFile]:
        assert self.credit_file is not None
        return self.quota, self.credit_file

    def _grow_quota(self) -> None:
        """Practitioners imported since start need more slots: map the grown file again."""
        if self.telemetry is not None:
            self.telemetry.retire(self.gate)
        self.gate.close()
        self.quota.close()
        self.quota = open_quota_file(
            self._options.data_dir, self._options.config, self._store.quota_slots_used()
        )
        if self.credit_file is not None:
            self.credit_file.close()
            self.credit_file = open_credit_file(self._options.data_dir, self.quota.slots)
        if self.baseline_file is not None:
            self.baseline_file.close()
            self.baseline_file = open_baseline_file(self._options.data_dir, self.quota.slots)
        assert self._keys is not None  # a gate exists, so the keys were loaded
        self.gate = self._new_gate(self._keys)

    def _new_gate(self, keys: Keys) -> Any:
        gate = fastpath.Gate(
            self._rights_env,
            self._rights_db,
            keys,
            max_batch_items=self._settings.max_batch_items,
            attestation_ttl=self._settings.attestation_ttl_seconds,
            quota=self.quota if self._options.config.quota.enabled else None,
            trace=self.telemetry is not None,
            credit=self.credit_file,
            generation=self.generation,
            baseline=self.baseline_file,  # (None without quotas: it lives in their slots)
        )
        if self.telemetry is not None:
            self.telemetry.watch(gate)
        return gate

    def _open_rights(self, generation: int) -> tuple[Any, Any, str | None, dict[str, Any] | None]:
        """(env, rights db, pepper fingerprint, dataset) of `generation` (0: the store's own)."""
        if not generation:
            return (self._store.env, self._store.rights_db, self._store.pepper_fingerprint(),
                    self._store.dataset())  # fmt: skip
        directory = snapshots.root_of(self._options.data_dir) / str(generation)
        manifest = snapshots.Manifest.from_json((directory / snapshots.MANIFEST_FILE).read_text())
        env = snapshots.open_readonly(directory)
        # Opened outside any transaction: a handle opened in a read-only one dies with it.
        db = env.open_db(DB_RIGHTS, create=False)
        dataset = {"dataset_id": manifest.dataset_id, "generation": generation}
        return env, db, manifest.pepper_fingerprint, dataset

    def try_open_data(self) -> bool:
        """Open the gate once rights are loaded (the store's, or the active snapshot
        generation's) and the pepper matches them."""
        if self.gate is not None:
            return True
        config = self._options.config
        if (
            config.cluster.enabled
            and config.snapshots.public_key
            and time.time() - self._started < snapshots.STARTUP_WAIT_SECONDS
            and not snapshots.checked_since(self._options.data_dir, self._started - 1)
        ):
            return False  # a host coming back serves nothing before it knows the active one
        if snapshots.wanted(self._options.data_dir):
            return False
        generation = snapshots.active(self._options.data_dir)
        try:
            env, db, fingerprint, dataset = self._open_rights(generation)
        except (OSError, snapshots.SnapshotError, lmdb.Error) as exc:
            log.error("cannot serve generation %d: %s", generation, exc)
            return False
        if dataset is None:
            return False
        try:
            keys = Keys(load_pepper(self._options.data_dir, self._options.pepper_file))
        except PepperError as exc:
            log.error("cannot serve: %s", exc)
            return False
        if fingerprint != keys.fingerprint:
            log.error("cannot serve: the pepper is not the one the data was imported with")
            if generation:
                env.close()
            return False
        self._keys = keys
        if config.store.prefault:  # before SERVING: no page fault in the first lookups
            prefault(env)
        self.generation, self._rights_env, self._rights_db = generation, env, db
        self.gate = self._new_gate(keys)
        if not self._options.config.quota.enabled:
            log.warning("QUOTAS AND THE HARVEST GUARD ARE DISABLED ([quota] enabled = false)")
        self._verifier = AttestationVerifier(keys)
        return True

    async def watch_readiness(self) -> None:
        for service in ("", COVERAGE_SERVICE, ATTESTATION_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        while not self.try_open_data():
            await asyncio.sleep(self._settings.readiness_poll_seconds)
        for service in ("", COVERAGE_SERVICE, ATTESTATION_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        dataset = self._open_rights(0)[3] if not self.generation else {}
        log.info(
            "serving dataset %s with the %s fast path",
            (dataset or {}).get("dataset_id", f"generation {self.generation}"),
            fastpath.IMPLEMENTATION,
        )
        await self.watch_generation()

    async def watch_generation(self) -> None:
        """Between calls, switch to the generation DIR/snapshots/active names; serve nothing
        while the cluster's active generation is one this host does not have yet."""
        serving = health_pb2.HealthCheckResponse.SERVING
        while True:
            await asyncio.sleep(0.25)
            directory = self._options.data_dir
            stale = snapshots.wanted(directory) > self.generation
            if stale != self._stale:
                self._stale = stale
                status = health_pb2.HealthCheckResponse.NOT_SERVING if stale else serving
                for service in ("", COVERAGE_SERVICE):
                    await self.health.set(service, status)
            generation = snapshots.active(directory)
            if generation != self.generation:
                prefaulting = self._options.config.store.prefault
                if prefaulting and generation:
                    # The new file into the page cache off the event loop; swap_rights then maps
                    # it (MADV_POPULATE_READ of cached pages: tens of ms for 200 MB).
                    data_file = snapshots.root_of(directory) / str(generation) / "data.mdb"
                    with contextlib.suppress(OSError):
                        await asyncio.to_thread(read_through, data_file)
                self.swap_rights(generation, prefaulted=prefaulting and bool(generation))

    def swap_rights(self, generation: int, *, prefaulted: bool = False) -> None:
        """Serve `generation` from the next call on; the old environment is closed at once (a
        gate call never spans an await, so none is using it). `prefaulted`: its file was read
        through already; fault it into the map before the first call."""
        try:
            env, db, fingerprint, _ = self._open_rights(generation)
        except (OSError, snapshots.SnapshotError, lmdb.Error) as exc:
            log.error("cannot switch to generation %d: %s", generation, exc)
            return
        assert self._keys is not None
        if fingerprint != self._keys.fingerprint:
            log.error("not switching to generation %d: made with another pepper", generation)
            if generation:
                env.close()
            return
        if prefaulted:
            prefault(env, read=False)
        old_env, old_gate = self._rights_env, self.gate
        self.generation, self._rights_env, self._rights_db = generation, env, db
        if self.telemetry is not None:
            self.telemetry.retire(old_gate)
        self.gate = self._new_gate(self._keys)
        old_gate.close()
        if old_env is not self._store.env:
            old_env.close()
        log.info("serving rights generation %d", generation)

    # -- the common prologue ----------------------------------------------------------------------

    def _caller(
        self,
        context: grpc.aio.ServicerContext,
        role: str,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
        certificate: bytes | None = None,
    ) -> Practitioner:
        """Who is calling, with everything a fresh call checks: the credential, its role, the
        data being loaded, and a quota slot mapped for it (the gate replaced if one is not)."""
        self.last_call_started = time.monotonic()
        if certificate is None and self._mtls:
            certificate = peer_certificate(context.auth_context())
        if metadata is None:
            metadata = context.invocation_metadata()
        caller = self._auth.authenticate(metadata, role, certificate)
        if isinstance(caller, AuthFailure):
            raise Refusal(caller.code, caller.status, caller.practitioner)
        if self.gate is None or self._stale:
            raise Refusal(rules.UNAVAILABLE, NOT_LOADED, caller)
        if caller.slot >= self.quota.slots:
            self._grow_quota()
        return caller

    # -- CoverageService --------------------------------------------------------------------------

    async def check_coverage(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._decide("CheckCoverage", request, context)

    async def check_coverage_batch(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        return await self._decide("CheckCoverageBatch", request, context)

    async def _decide(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        """CheckCoverage and CheckCoverageBatch: one gate call, its refusal or its answer; with
        tracing on, never an answer whose spans are not in the audit spool."""
        telemetry = self.telemetry
        started = time.perf_counter()
        metadata = context.invocation_metadata()
        index = tr.METHODS.index(method)
        try:
            caller = self._caller(context, "practitioner", metadata)
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise Refusal(rules.DEADLINE_EXCEEDED, rules.DEADLINE_PASSED, caller)
            if telemetry is not None and not telemetry.has_room():
                raise Refusal(rules.UNAVAILABLE, rules.AUDIT_BACKLOG)
        except Refusal as r:
            if telemetry is not None:
                parent = otel.trace_context(metadata) if metadata else None
                self._refused(index, r, parent or (b"", b""), started, child=False)
            await _abort(context, r.code, r.status)
        gate = self.gate
        today, now = self._clock.now()
        if self.credit is not None:
            if index == tr.METHOD_BATCH:
                # Credit for the whole batch first, rather than set part of it aside.
                need = fastpath.batch_items(request, gate.max_batch_items)
                if 0 < need <= gate.max_batch_items and not self.credit.holds(caller, need):
                    await self.credit.refill(caller, today, need)
                    gate = self.gate
            gate.cluster_degraded = self.credit.degraded
        decide = gate.check if index == tr.METHOD_UNARY else gate.check_batch
        trace = None
        if telemetry is not None and metadata:
            trace = otel.trace_context(metadata)
        if telemetry is None:
            code, payload = decide(caller, request, today, now)
        else:
            code, payload = decide(caller, request, today, now, trace=trace)
        if self.credit is not None:
            code, payload = await self._with_credit(index, caller, request, today, now, trace,
                                                    code, payload)  # fmt: skip
            gate = self.gate
        if telemetry is not None:
            telemetry.record_rpc(method, time.perf_counter() - started)
            try:
                telemetry.record(gate)
            except SpoolFull:
                await _abort(context, rules.UNAVAILABLE, rules.AUDIT_BACKLOG)
        if gate.suspensions:
            self.persist_suspensions()
        if code:
            await _abort(context, code, payload)
        return payload  # type: ignore[no-any-return]

    async def check_coverage_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Every message is authorised and metered as if it were its own unary call: the
        credential is checked again (a suspension, a revocation, a scope or quota change made
        while the stream is open applies from its next message, which is then refused with the
        code a new call would get), and the worker's current gate decides it (a gate replaced
        since the stream opened is never used again)."""
        method = tr.METHOD_STREAM
        started, started_ns = time.perf_counter(), time.time_ns()
        metadata = context.invocation_metadata()
        # A connection's client certificate cannot change while it is open: read it once.
        certificate = peer_certificate(context.auth_context()) if self._mtls else None
        telemetry = self.telemetry
        trace_id = stream_span = caller_span = b""
        if telemetry is not None:
            parent = otel.trace_context(metadata) if metadata else None
            trace_id, caller_span = parent if parent is not None else (self._new_trace_id(), b"")
            stream_span = self._new_span_id()
        try:
            caller = self._caller(context, "practitioner", metadata, certificate)
        except Refusal as r:
            self._refused(method, r, (trace_id, caller_span), started, child=False)
            await _abort(context, r.code, r.status)
        clock = self._clock
        messages = 0
        code = rules.OK
        try:
            async for request in requests:
                try:
                    caller = self._caller(context, "practitioner", metadata, certificate)
                    if telemetry is not None and not telemetry.has_room():
                        raise Refusal(rules.UNAVAILABLE, rules.AUDIT_BACKLOG)
                except Refusal as r:
                    self._refused(method, r, (trace_id, stream_span), time.perf_counter())
                    messages += 1
                    code = r.code
                    await _abort(context, r.code, r.status)
                gate = self.gate
                today, now = clock.now()
                if self.credit is not None:
                    gate.cluster_degraded = self.credit.degraded
                if telemetry is None:
                    response = gate.check_item(caller, request, today, now)
                else:
                    response = gate.check_item(
                        caller, request, today, now, trace=(trace_id, stream_span)
                    )
                if self.credit is not None:
                    item_code, response = await self._with_credit(
                        tr.METHOD_STREAM, caller, request, today, now,
                        (trace_id, stream_span) if telemetry is not None else None, rules.OK,
                        response,
                    )  # fmt: skip
                    gate = self.gate
                    if item_code != rules.OK:
                        # The global guard fired, or cannot be asked: the stream ends here.
                        code = item_code
                        await _abort(context, item_code, response)
                if telemetry is not None:
                    try:
                        telemetry.record(gate)
                    except SpoolFull:
                        code = rules.UNAVAILABLE
                        await _abort(context, rules.UNAVAILABLE, rules.AUDIT_BACKLOG)
                messages += 1
                suspended = bool(gate.suspensions) and self.persist_suspensions(
                    caller.practitioner_id
                )
                yield response
                if suspended:
                    # The guard fired on this item: it is answered, then the stream ends.
                    code = rules.PERMISSION_DENIED
                    await _abort(context, rules.PERMISSION_DENIED, rules.PRACTITIONER_SUSPENDED)
        finally:
            if telemetry is not None:
                elapsed = time.perf_counter() - started
                who, _ = tr.practitioner_attributes(caller.practitioner_id, caller.profession)
                who += tr.generation_attr(self.generation)
                self._add_span(
                    tr.rpc_span(
                        trace_id,
                        stream_span,
                        caller_span,
                        method,
                        code,
                        who,
                        messages,
                        started_ns,
                        started_ns + int(elapsed * 1e9),
                    )
                )
                telemetry.record_rpc("CheckCoverageStream", elapsed)

    # -- several hosts ([cluster]) ---------------------------------------------------------------

    async def watch_cluster(self) -> None:
        """Health service CLUSTER_SERVICE: NOT_SERVING while this host cannot reach Redis (it
        answers on the credit it holds, then refuses QUOTA_BACKEND_UNAVAILABLE)."""
        assert self.credit is not None
        shown = None
        while True:
            degraded = self.credit.degraded
            if degraded != shown:
                shown = degraded
                status = (health_pb2.HealthCheckResponse.NOT_SERVING if degraded
                          else health_pb2.HealthCheckResponse.SERVING)  # fmt: skip
                await self.health.set(CLUSTER_SERVICE, status)
            await asyncio.sleep(0.2)

    async def _with_credit(
        self,
        method: int,
        caller: Practitioner,
        request: bytes,
        today: int,
        now: float,
        trace: tuple[bytes, bytes] | None,
        code: int,
        payload: bytes,
    ) -> tuple[int, bytes]:
        """After a gate call with cluster credit: the lookups it set aside asked again once
        credit is fetched, and the global harvest guard asked before a bad answer leaves."""
        agent = self.credit
        assert agent is not None
        gate = self.gate
        short, bad = list(gate.short), gate.last_bad
        if short:
            mode = await agent.refill(caller, today, len(short))
            gate = self.gate  # (replaced while waiting, if practitioners were added)
            kw: dict[str, Any] = {"credit_mode": mode}
            if trace is not None:
                kw["trace"] = trace
            if method == tr.METHOD_STREAM:
                code, payload = rules.OK, gate.check_item(caller, request, today, now, **kw)
            elif method == tr.METHOD_UNARY:
                code, payload = gate.check(caller, request, today, now, **kw)
            elif code == rules.SHORT:  # a batch refused whole, set aside whole
                code, payload = gate.check_batch(caller, request, today, now, **kw)
            else:
                code, payload = self._retry_items(gate, caller, request, payload, short, today,
                                                  now, kw)  # fmt: skip
            bad += gate.last_bad
        agent.seen(caller, today)
        await agent.share_new(caller, today)
        if bad:
            verdict = await agent.guard(caller, today)
            if verdict == GUARD_FIRED:
                self.gate.suspensions.append(caller.practitioner_id)
                self.persist_suspensions()
                return rules.PERMISSION_DENIED, rules.PRACTITIONER_SUSPENDED
            if verdict == GUARD_UNAVAILABLE:
                return rules.UNAVAILABLE, rules.QUOTA_BACKEND_UNAVAILABLE
        return code, payload

    @staticmethod
    def _retry_items(
        gate: Any,
        caller: Practitioner,
        request: bytes,
        payload: bytes,
        short: list[int],
        today: int,
        now: float,
        kw: dict[str, Any],
    ) -> tuple[int, bytes]:
        """A batch's items set aside, asked again as a batch of their own, answers put back in
        place."""
        asked = covergate_pb2.CheckCoverageBatchRequest.FromString(request)
        retry = covergate_pb2.CheckCoverageBatchRequest(items=[asked.items[i] for i in short])
        code, retried = gate.check_batch(caller, retry.SerializeToString(), today, now, **kw)
        if code != rules.OK:
            return code, retried
        answers = covergate_pb2.CheckCoverageBatchResponse.FromString(payload)
        again = covergate_pb2.CheckCoverageBatchResponse.FromString(retried)
        for i, answer in zip(short, again.items, strict=True):
            answers.items[i].CopyFrom(answer)
        return rules.OK, answers.SerializeToString()

    # -- refusals before any gate, still traced ----------------------------------------------------

    def _new_trace_id(self) -> bytes:
        return self.gate.new_trace_id() if self.gate is not None else os.urandom(16)

    def _new_span_id(self) -> bytes:
        return self.gate.new_span_id() if self.gate is not None else os.urandom(8)

    def _add_span(self, span: bytes) -> None:
        """A span encoded here (a stream's, a refusal's), straight into the audit spool."""
        if self.telemetry is not None:
            with contextlib.suppress(SpoolFull):  # the call is refused or over either way
                self.telemetry.add_span(span)

    def _refused(
        self,
        method: int,
        refusal: Refusal,
        context: tuple[bytes, bytes],
        started: float,
        *,
        child: bool = True,
    ) -> None:
        """A known caller refused before any gate decided (suspended, wrong role, data not
        loaded, deadline passed): its attempt is still one traced lookup with the refusal's
        reason, and counted in the metrics, so a credential that keeps trying stays visible.
        `context`: (trace id, parent span); a stream message's span is a child of the stream's.
        A refusal for a full audit spool cannot be recorded there: it is counted instead."""
        telemetry, who = self.telemetry, refusal.practitioner
        if telemetry is None or who is None:
            return
        outcome = tr.refusal_outcome(refusal.code, refusal.status)
        trace_id, parent = context
        if not trace_id:
            trace_id = self._new_trace_id()
        attributes, profession = tr.practitioner_attributes(who.practitioner_id, who.profession)
        attributes += tr.generation_attr(self.generation)
        elapsed = time.perf_counter() - started
        end_ns = time.time_ns()
        self._add_span(
            tr.refusal_span(
                trace_id,
                self._new_span_id(),
                parent,
                method,
                refusal.code,
                attributes,
                outcome,
                end_ns - int(elapsed * 1e9),
                end_ns,
                child=child,
            )
        )
        telemetry.refused(profession, outcome)
        if not child:
            telemetry.record_rpc(tr.METHODS[method], elapsed)

    async def _share_suspension(self, practitioner_id: str, reason: str = GUARD_REASON) -> None:
        assert self.credit is not None
        for _ in range(20):  # Redis may be away for a while: the local suspension holds anyway
            try:
                await self.credit.backend.admin(
                    "suspend", practitioner_id, reason=reason, by=reason.split(":", 1)[0],
                    origin=self.credit.backend.host,
                )  # fmt: skip
                return
            except BackendUnavailable:
                await asyncio.sleep(0.5)

    def _suspension_reason(self, practitioner_id: str) -> str:
        """The harvest guard's reason, or the baseline policy's when its record says it
        suspended the practitioner (`practitioner reinstate` clears that)."""
        record = self._store.practitioner(practitioner_id)
        base = self.baseline_file
        if record is not None and base is not None and 0 <= record.slot < base.slots:
            signals = base.read(record.slot).suspended_by
            if signals:
                return baseline_reason(signals)
        return GUARD_REASON

    def persist_suspensions(self, practitioner_id: str | None = None) -> bool:
        """Record the guard's suspensions in the store (shown by `practitioner show`, lifted only
        by `practitioner reinstate`); True if `practitioner_id` is among them."""
        suspended = set(self.gate.suspensions)
        self.gate.suspensions.clear()
        if self.telemetry is not None:
            self.telemetry.suspended(len(suspended))
        for pid in sorted(suspended):
            reason = self._suspension_reason(pid)
            log.warning("%s suspended practitioner %s", reason.split(":", 1)[0], pid)
            if self.credit is not None:
                # Every host: the flag credit replies carry, and each store's record.
                task = asyncio.get_running_loop().create_task(self._share_suspension(pid, reason))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            with contextlib.suppress(KeyError):  # removed from the store since
                self._store.update_practitioner(
                    pid,
                    status="suspended",
                    suspension_reason=reason,
                )
        return practitioner_id in suspended

    # -- AttestationService -----------------------------------------------------------------------

    async def verify_attestation(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            self._caller(context, "claims")
        except Refusal as r:
            await _abort(context, r.code, r.status)
        assert self._verifier is not None
        code, payload = self._verifier.verify(request, int(time.time()))
        if code:
            await _abort(context, code, payload)
        return payload

    def register(self, server: grpc.aio.Server) -> None:
        coverage = {
            "CheckCoverage": grpc.unary_unary_rpc_method_handler(self.check_coverage),
            "CheckCoverageBatch": grpc.unary_unary_rpc_method_handler(self.check_coverage_batch),
            "CheckCoverageStream": grpc.stream_stream_rpc_method_handler(
                self.check_coverage_stream
            ),
        }
        attestation = {
            "VerifyAttestation": grpc.unary_unary_rpc_method_handler(self.verify_attestation),
        }
        for name, handlers in ((COVERAGE_SERVICE, coverage), (ATTESTATION_SERVICE, attestation)):
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
            server.add_registered_method_handlers(name, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(  # v1 and v1alpha
            (
                COVERAGE_SERVICE,
                ATTESTATION_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            ),
            server,
        )


# -- one worker ------------------------------------------------------------------------------------


def _server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """A worker's grpc options: message sizes and the bounds on every connection (the defaults
    and their reasons are in config.ServerSettings)."""
    return [
        # Joins the supervisor's hold on the address (see _hold_address): only our workers can.
        ("grpc.so_reuseport", 1),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes * 4),
        ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_seconds)),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            _ms(settings.keepalive_min_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.handshake_timeout_seconds)),
        # Bit per algorithm (identity, deflate, gzip). Identity alone: a compressed request is
        # UNIMPLEMENTED before any decompression, never an INTERNAL from a corrupt one.
        (
            "grpc.compression_enabled_algorithms_bitset",
            0b111 if settings.accept_compressed_requests else 0b001,
        ),
    ]


async def run_worker(
    options: ServeOptions, index: int, on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then stop taking calls and drain the ones in flight."""
    settings = options.config.server
    # Opened here, after fork/spawn: LMDB handles don't survive it.
    store = Store(options.data_dir, options.config.store)
    # After fork too: its spool directory, metric thread and channels are this worker's.
    telemetry = otel.setup(index, options.data_dir, options.config)
    handlers = CovergateHandlers(store, options, telemetry)
    server = grpc.aio.server(options=grpc_server_options(settings))
    handlers.register(server)
    if options.tls is None:
        port = server.add_insecure_port(options.listen)
    else:
        port = server.add_secure_port(options.listen, _server_credentials(options.tls))
    if port == 0:
        raise OSError(f"cannot listen on {options.listen}")
    await server.start()
    if telemetry is not None:
        telemetry.start()
        if index == 0:  # one host's count, not one per worker
            telemetry.watch_snapshots(options.data_dir)
    cluster_watch = None
    if handlers.credit is not None:
        with contextlib.suppress(Exception):
            await handlers.credit.backend.init_epoch()
        handlers.credit.start()
        cluster_watch = asyncio.create_task(handlers.watch_cluster())
        if telemetry is not None:
            telemetry.watch_cluster(handlers.credit)
        if options.config.cluster.fail_open and index == 0:
            log.warning(
                "[cluster] fail_open = true: while Redis is unreachable, hosts admit lookups "
                "they hold no credit for; each still enforces every limit on its own, so a "
                "practitioner may get up to (number of hosts) x each limit until Redis is back"
            )
    readiness = asyncio.create_task(handlers.watch_readiness())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("worker %d listening on port %d", index, port)
    if on_ready is not None:
        on_ready(port)
    await stopping.wait()
    log.info("worker %d draining (grace %.0fs)", index, settings.shutdown_grace_seconds)
    readiness.cancel()
    if cluster_watch is not None:
        cluster_watch.cancel()
    await handlers.health.enter_graceful_shutdown()
    # grpc.aio hands calls to the loop one at a time; calls it has received but not yet started
    # would be CANCELLED by stop(), and a client cannot tell whether they ran. Keep serving until
    # no call has started for a moment (load balancers have seen NOT_SERVING by then), then stop.
    deadline = time.monotonic() + settings.shutdown_grace_seconds
    while time.monotonic() < deadline and time.monotonic() - handlers.last_call_started < 0.25:
        await asyncio.sleep(0.05)
    await server.stop(max(0.0, deadline - time.monotonic()))
    if telemetry is not None:
        await telemetry.shutdown()  # the last spans and metrics, before the gate goes
    if handlers.credit is not None:
        await handlers.credit.close()  # what was spent reported, the rest given back
    if handlers.gate is not None:
        handlers.gate.close()
    if handlers.credit_file is not None:
        handlers.credit_file.close()
    if handlers.baseline_file is not None:
        handlers.baseline_file.close()
    handlers.quota.flush()
    handlers.quota.close()
    store.close()
    log.info("worker %d stopped", index)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_supervisor(supervisor_pid: int) -> None:
    """Have the kernel send this worker SIGTERM (drain, then exit) when its supervisor dies,
    however it dies, SIGKILL included: a worker never goes on serving the port on its own."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # A supervisor that died before the prctl above signals nobody: we were re-parented.
    if os.getppid() != supervisor_pid:
        log.error("the supervisor (pid %d) is gone; worker not starting", supervisor_pid)
        raise SystemExit(1)


def _worker_process(options: ServeOptions, index: int, ready: Any, supervisor_pid: int) -> None:
    configure_logging()
    _die_with_supervisor(supervisor_pid)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(options, index, on_ready=lambda port: ready.send(port)))


# -- the supervisor --------------------------------------------------------------------------------


class _AbandonedWrite(logging.Filter):
    """grpc.aio logs an ERROR with a traceback when a stream's answer is written to a call that
    has just ended (its deadline passed or the client cancelled between our check and the
    write): `ExecuteBatchError raised in core by servicer method`. Nothing failed on our side,
    and the call already ended with the client's status; the record becomes one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno >= logging.ERROR and type(exc).__name__ == "ExecuteBatchError":
            method = record.getMessage().rpartition(" ")[2]
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg = "an answer was not written: the call %s had already ended"
            record.args = (method,)
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("COVERGATE_LOG_LEVEL", "INFO"),
        format="%(asctime)s covergate[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    grpc_core = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _AbandonedWrite) for f in grpc_core.filters):
        grpc_core.addFilter(_AbandonedWrite())


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError("--listen must be HOST:PORT")
    return host.strip("[]"), int(port)


class ListenError(Exception):
    """The listen address cannot be served; the message is one line for the operator."""


_WILDCARDS = ("", "0.0.0.0", "::")


def _listen_sockaddrs(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    """The addresses grpc will listen on for HOST: each address a name resolves to; for a
    wildcard, every address of both families (grpc opens one dual-stack socket for 0.0.0.0 and
    :: alike), so the first of these that this host supports."""
    if host in _WILDCARDS:
        return [(socket.AF_INET6, ("::", port, 0, 0)), (socket.AF_INET, ("0.0.0.0", port))]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve {host!r}: {exc.strerror}") from None
    seen: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in seen:
            seen.append((family, sockaddr))
    return seen


@contextlib.contextmanager
def _bind_lock(port: int) -> Iterator[None]:
    """Serialise the bind-and-share step of covergates starting on the same port at the same
    moment (an abstract Unix socket: per network namespace like the port, freed on exit)."""
    if port == 0 or not sys.platform.startswith("linux"):
        yield
        return
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                lock.bind(f"\0covergate-bind-{port}")
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise ListenError(f"cannot take the bind lock of port {port}: {exc}") from None
                time.sleep(0.01)
        yield
    finally:
        lock.close()


def _hold_one(
    family: socket.AddressFamily, sockaddr: tuple[Any, ...], wildcard: bool
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            # A wildcard covers IPv4 too, like grpc's dual-stack socket: an IPv4 server on the
            # port is then found as well.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if wildcard else 1)
        if sockaddr[1] != 0:
            # Connections of a previous run lingering in TIME_WAIT must not block a restart;
            # SO_REUSEADDR still fails against a socket that is listening.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        # Bound: from now on nobody may bind beside us (no SO_REUSEADDR) except sockets with
        # SO_REUSEPORT of the same user: our workers. Linux reads both flags at every bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except BaseException:
        sock.close()
        raise
    return sock


def _hold_address(host: str, port: int) -> list[socket.socket]:
    """Bind the listen address (not listening: connections go to the workers only) so that the
    workers can share it and nothing else can. Fails if anything already holds the address —
    another covergate, or any other program — instead of joining its SO_REUSEPORT group.

    Port 0 picks a free port (the same one for every address of HOST)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    wildcard = host in _WILDCARDS
    sockaddrs = _listen_sockaddrs(host, port)
    for _ in range(10):
        held: list[socket.socket] = []
        chosen = port
        failure: OSError | None = None
        try:
            with _bind_lock(port):
                for family, sockaddr in sockaddrs:
                    try:
                        held.append(
                            _hold_one(family, (sockaddr[0], chosen, *sockaddr[2:]), wildcard)
                        )
                    except OSError as exc:
                        if exc.errno == errno.EADDRINUSE:
                            raise
                        failure = exc  # e.g. an address this host does not have: grpc skips it
                        continue
                    if wildcard:
                        break  # the dual-stack socket covers both families
                    chosen = held[-1].getsockname()[1]
        except OSError as exc:
            for sock in held:
                sock.close()
            if exc.errno == errno.EADDRINUSE and port == 0:
                continue  # the port picked for the first address is taken on another: again
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"cannot serve on {shown}: the address is already in use "
                    "(another covergate or another program is listening there)"
                ) from None
            raise ListenError(f"cannot serve on {shown}: {exc.strerror or exc}") from None
        if held:
            return held
        reason = failure.strerror if failure is not None else "no address"
        raise ListenError(f"cannot serve on {shown}: {reason}")
    raise ListenError(f"cannot serve on {shown}: no free port for every address of {host!r}")


def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> int:
    """Run `options.workers` worker processes (0: one per core) until SIGTERM or SIGINT."""
    workers = options.workers or os.cpu_count() or 1
    try:
        host, port = split_listen(options.listen)
        held = _hold_address(host, port)
    except (ValueError, ListenError) as exc:
        print(f"covergate: {exc}", file=sys.stderr, flush=True)
        return 1
    port = held[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    listen = f"{shown_host}:{port}"
    options = ServeOptions(
        options.data_dir, options.config, listen, workers, options.tls, options.pepper_file
    )
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def start(index: int) -> tuple[Any, Any]:
        receiver, sender = ctx.Pipe(duplex=False)
        # Started from this (the main) thread: a worker's PR_SET_PDEATHSIG fires when the
        # thread that started it ends, and this one lives as long as the supervisor.
        proc = ctx.Process(
            target=_worker_process, args=(options, index, sender, os.getpid()), daemon=False
        )
        proc.start()
        sender.close()
        return proc, receiver

    # The audit shipper (tracing on): exports what every worker writes to the spool.
    shipper = _start_shipper(ctx, options)
    # With [cluster]: applies every host's admin changes to this host's store.
    sync = _start_cluster_sync(ctx, options)
    procs: dict[int, Any] = {}
    pipes = {}
    for i in range(workers):
        procs[i], pipes[i] = start(i)
    for i, pipe in pipes.items():
        try:
            started = pipe.poll(60) and isinstance(pipe.recv(), int)
        except (EOFError, OSError):  # the worker died before it was ready
            started = False
        if not started:
            log.error("worker %d did not start", i)
            stopping = True
    if not stopping:
        announce(f"covergate: serving on {listen} with {workers} worker(s)")
    sys.stdout.flush()
    restarts: list[float] = []
    while not stopping:
        sentinels = {p.sentinel: i for i, p in procs.items()}
        if shipper is not None:
            sentinels[shipper.sentinel] = -1
        if sync is not None:
            sentinels[sync.sentinel] = -2
        for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
            i = sentinels[sentinel]  # type: ignore[index]
            if stopping:
                break
            if i == -1:
                assert shipper is not None
                log.error("the audit shipper exited with code %s; restarting it",
                          shipper.exitcode)  # fmt: skip
                shipper = _start_shipper(ctx, options)
                continue
            if i == -2:
                assert sync is not None
                log.error("the cluster sync exited with code %s; restarting it", sync.exitcode)
                time.sleep(0.5)
                sync = _start_cluster_sync(ctx, options)
                continue
            log.error("worker %d exited with code %s; restarting it", i, procs[i].exitcode)
            restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
            if len(restarts) > 5 * workers:
                log.error("workers keep dying; giving up")
                stopping = True
                break
            # Its pipe is kept until its next restart: a read end dropped here is closed as soon
            # as another worker restarts, and the replacement then dies of EPIPE reporting ready.
            procs[i], pipes[i] = start(i)
    for proc in procs.values():
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    grace = options.config.server.shutdown_grace_seconds + 5
    for proc in procs.values():
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
    if sync is not None and sync.is_alive() and sync.pid is not None:
        os.kill(sync.pid, signal.SIGTERM)
        sync.join(5)
        if sync.is_alive():
            sync.kill()
    if shipper is not None:
        # After the workers: their last spans are in the spool; it sends what it can in time.
        if shipper.is_alive() and shipper.pid is not None:
            os.kill(shipper.pid, signal.SIGTERM)
        shipper.join(SHIPPER_DRAIN_SECONDS + 5)
        if shipper.is_alive():
            shipper.kill()
    for sock in held:
        sock.close()
    return 0 if all(p.exitcode == 0 for p in procs.values()) else 1


SHIPPER_DRAIN_SECONDS = 5.0


def _start_shipper(ctx: Any, options: ServeOptions) -> Any:
    """The host's audit shipper process, when tracing is on (service.shipper)."""
    if not otel.enabled():
        return None
    root = otel.spool_settings(options.data_dir, options.config).root
    proc = ctx.Process(
        target=_shipper_process,
        args=(str(root), SHIPPER_DRAIN_SECONDS, os.getpid()),
        name="covergate-shipper",
    )
    proc.start()
    return proc


def _start_cluster_sync(ctx: Any, options: ServeOptions) -> Any:
    """The host's cluster sync process, with [cluster] (service.cluster.run_sync)."""
    if not options.config.cluster.enabled:
        return None
    proc = ctx.Process(
        target=_cluster_sync_process,
        args=(
            str(options.data_dir),
            options.config.cluster,
            options.config.store,
            options.config.snapshots,
            options.pepper_file,
            os.getpid(),
            options.config.baselines.enabled and options.config.quota.enabled,
        ),
        name="covergate-cluster-sync",
    )
    proc.start()
    return proc


def _cluster_sync_process(
    data_dir: str, settings: Any, store_settings: Any, snapshot_settings: Any,
    pepper_file: str | None, supervisor_pid: int, baselines: bool,
) -> None:  # fmt: skip
    from service.cluster import run_sync

    _die_with_supervisor(supervisor_pid)
    run_sync(data_dir, settings, store_settings, snapshot_settings, pepper_file, baselines)


def _shipper_process(root: str, drain_seconds: float, supervisor_pid: int) -> None:
    _die_with_supervisor(supervisor_pid)
    shipper_main(root, drain_seconds)


__all__ = ["ServeOptions", "TlsFiles", "covergate_pb2", "run_worker", "serve"]

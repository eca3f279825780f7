"""The gRPC server: CoverageService and AttestationService handlers over the fast path, health and
reflection, one asyncio worker per process sharing the port, graceful drain on SIGTERM.

Handlers receive and return raw bytes: the fast path parses requests and encodes responses itself,
so a malformed message is an INVALID_ARGUMENT from covergate, never an INTERNAL from grpcio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fastpath
from covergate.v1 import covergate_pb2
from fastpath import Keys, Practitioner, rules
from fastpath import trace as tr
from service import telemetry as otel
from service.attestation import AttestationVerifier
from service.auth import Authenticator, AuthFailure, peer_certificate
from service.clock import ParisClock
from service.config import Config, PepperError, load_pepper
from service.quotas import PractitionerFactory, open_quota_file
from service.reflection import enable_reflection
from service.store import Store

log = logging.getLogger("covergate.server")

COVERAGE_SERVICE = "covergate.v1.CoverageService"
ATTESTATION_SERVICE = "covergate.v1.AttestationService"
_STATUS_CODES = {c.value[0]: c for c in grpc.StatusCode}
_DETAILS_KEY = "grpc-status-details-bin"

NOT_LOADED = rules.error_info_status(
    rules.UNAVAILABLE, "DATA_NOT_LOADED", "coverage data is not loaded yet; retry later"
)


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
        self._auth = Authenticator(store, options.config.auth, PractitionerFactory(options.config))
        # Client certificates exist only with --client-ca; otherwise skip the auth context.
        self._mtls = options.tls is not None and options.tls.client_ca is not None
        self._clock = ParisClock()
        self.gate: Any = None
        self._keys: Keys | None = None
        self._verifier: AttestationVerifier | None = None
        self.health = grpc_health.aio.HealthServicer()
        self.last_call_started = 0.0

    # -- readiness --------------------------------------------------------------------------------

    def _grow_quota(self) -> None:
        """Practitioners imported since start need more slots: map the grown file again."""
        if self.telemetry is not None:
            self.telemetry.retire(self.gate)
        self.gate.close()
        self.quota.close()
        self.quota = open_quota_file(
            self._options.data_dir, self._options.config, self._store.quota_slots_used()
        )
        assert self._keys is not None  # a gate exists, so the keys were loaded
        self.gate = self._new_gate(self._keys)

    def _new_gate(self, keys: Keys) -> Any:
        gate = fastpath.Gate(
            self._store.env,
            self._store.rights_db,
            keys,
            max_batch_items=self._settings.max_batch_items,
            attestation_ttl=self._settings.attestation_ttl_seconds,
            quota=self.quota if self._options.config.quota.enabled else None,
            trace=self.telemetry is not None,
        )
        if self.telemetry is not None:
            self.telemetry.watch(gate)
        return gate

    def try_open_data(self) -> bool:
        """Open the gate once rights are loaded and the pepper matches them."""
        if self.gate is not None:
            return True
        if self._store.dataset() is None:
            return False
        try:
            keys = Keys(load_pepper(self._options.data_dir, self._options.pepper_file))
        except PepperError as exc:
            log.error("cannot serve: %s", exc)
            return False
        if self._store.pepper_fingerprint() != keys.fingerprint:
            log.error("cannot serve: the pepper is not the one the data was imported with")
            return False
        self._keys = keys
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
        dataset = self._store.dataset() or {}
        log.info(
            "serving dataset %s with the %s fast path",
            dataset.get("dataset_id", "?"),
            fastpath.IMPLEMENTATION,
        )

    # -- the common prologue ----------------------------------------------------------------------

    def _caller(
        self,
        context: grpc.aio.ServicerContext,
        role: str,
        metadata: Sequence[tuple[str, str | bytes]] | None = None,
    ) -> Practitioner:
        self.last_call_started = time.monotonic()
        certificate = peer_certificate(context.auth_context()) if self._mtls else None
        if metadata is None:
            metadata = context.invocation_metadata()
        caller = self._auth.authenticate(metadata, role, certificate)
        if isinstance(caller, AuthFailure):
            raise Refusal(caller.code, caller.status, caller.practitioner)
        if self.gate is None:
            raise Refusal(rules.UNAVAILABLE, NOT_LOADED)
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
        """CheckCoverage and CheckCoverageBatch: one gate call, its refusal or its answer."""
        telemetry = self.telemetry
        if telemetry is not None:
            started = time.perf_counter()
        metadata = context.invocation_metadata()
        try:
            caller = self._caller(context, "practitioner", metadata)
        except Refusal as r:
            if telemetry is not None and r.practitioner is not None:
                self._refused_span(method, r, metadata, time.perf_counter() - started)
            await _abort(context, r.code, r.status)
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        decide = self.gate.check if method == "CheckCoverage" else self.gate.check_batch
        today, now = self._clock.now()
        if telemetry is None:
            code, payload = decide(caller, request, today, now)
        else:
            trace = otel.trace_context(metadata) if metadata else None
            code, payload = decide(caller, request, today, now, trace=trace)
            telemetry.record_rpc(method, time.perf_counter() - started)
        if self.gate.suspensions:
            self.persist_suspensions()
        if code:
            await _abort(context, code, payload)
        return payload  # type: ignore[no-any-return]

    async def check_coverage_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        metadata = context.invocation_metadata()
        try:
            caller = self._caller(context, "practitioner", metadata)
        except Refusal as r:
            if self.telemetry is not None and r.practitioner is not None:
                self._refused_span(
                    "CheckCoverageStream", r, metadata, time.perf_counter() - started
                )
            await _abort(context, r.code, r.status)
        if self.telemetry is not None:
            async for response in self._traced_stream(caller, requests, context):
                yield response
            return
        gate = self.gate
        clock = self._clock
        async for request in requests:
            today, now = clock.now()
            response = gate.check_item(caller, request, today, now)
            suspended = bool(gate.suspensions) and self.persist_suspensions(caller.practitioner_id)
            yield response
            if suspended:
                # The guard fired on this item: it is answered, then the stream ends.
                await _abort(context, rules.PERMISSION_DENIED, rules.PRACTITIONER_SUSPENDED)

    async def _traced_stream(
        self,
        caller: Practitioner,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[bytes]:
        """The stream, with one lookup span per message under one SERVER span for the stream
        (the caller's traceparent honoured), written when the stream ends."""
        gate = self.gate
        clock = self._clock
        telemetry = self.telemetry
        assert telemetry is not None
        parent = otel.trace_context(context.invocation_metadata())
        trace_id, caller_span = parent if parent is not None else (gate.new_trace_id(), b"")
        stream_span = gate.new_span_id()
        items_context = (trace_id, stream_span)
        started_ns, started = time.time_ns(), time.perf_counter()
        messages = 0
        code = rules.OK
        try:
            async for request in requests:
                today, now = clock.now()
                response = gate.check_item(caller, request, today, now, trace=items_context)
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
            elapsed = time.perf_counter() - started
            who, _ = tr.practitioner_attributes(caller.practitioner_id, caller.profession)
            attributes = b"".join(
                (
                    tr.RPC_ATTRS[tr.METHOD_STREAM],
                    tr.attr_int(tr.K_STATUS_CODE, code),
                    who,
                    tr.attr_int(tr.K_STREAM_MESSAGES, messages),
                )
            )
            gate.add_span(
                tr.encode_span(
                    trace_id,
                    stream_span,
                    caller_span,
                    tr.RPC_SPAN_NAMES[tr.METHOD_STREAM],
                    tr.KIND_SERVER,
                    started_ns,
                    started_ns + int(elapsed * 1e9),
                    attributes,
                )
            )
            telemetry.record_rpc("CheckCoverageStream", elapsed)

    def _refused_span(
        self,
        method: str,
        refusal: Refusal,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        elapsed: float,
    ) -> None:
        """A known practitioner refused before the gate (suspended): its attempt is still one
        traced lookup, a SERVER span with the refusal's reason, and counted in the metrics, so a
        suspended credential that keeps trying stays visible."""
        telemetry, gate, who = self.telemetry, self.gate, refusal.practitioner
        if telemetry is None or gate is None or who is None:
            return
        index = tr.METHODS.index(method)
        parent = otel.trace_context(metadata) if metadata else None
        trace_id, parent_span = parent if parent is not None else (gate.new_trace_id(), b"")
        attributes, profession = tr.practitioner_attributes(who.practitioner_id, who.profession)
        end_ns = time.time_ns()
        gate.add_span(
            tr.encode_span(
                trace_id,
                gate.new_span_id(),
                parent_span,
                tr.RPC_SPAN_NAMES[index],
                tr.KIND_SERVER,
                end_ns - int(elapsed * 1e9),
                end_ns,
                b"".join(
                    (
                        tr.RPC_ATTRS[index],
                        tr.attr_int(tr.K_STATUS_CODE, refusal.code),
                        attributes,
                        tr.OUTCOME_ATTRS[tr.O_SUSPENDED],
                    )
                ),
            )
        )
        telemetry.refused(profession, tr.O_SUSPENDED)
        telemetry.record_rpc(method, elapsed)

    def persist_suspensions(self, practitioner_id: str | None = None) -> bool:
        """Record the guard's suspensions in the store (shown by `practitioner show`, lifted only
        by `practitioner reinstate`); True if `practitioner_id` is among them."""
        suspended = set(self.gate.suspensions)
        self.gate.suspensions.clear()
        if self.telemetry is not None:
            self.telemetry.suspended(len(suspended))
        for pid in sorted(suspended):
            log.warning("harvest guard suspended practitioner %s", pid)
            with contextlib.suppress(KeyError):  # removed from the store since
                self._store.update_practitioner(
                    pid,
                    status="suspended",
                    suspension_reason="harvest guard: too many NO_MATCH or invalid lookups",
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


async def run_worker(
    options: ServeOptions, index: int, on_ready: Callable[[int], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then stop taking calls and drain the ones in flight."""
    settings = options.config.server
    # Opened here, after fork/spawn: LMDB handles don't survive it.
    store = Store(options.data_dir, options.config.store)
    telemetry = otel.setup(index)  # after fork too: its exporter thread and channels are ours
    handlers = CovergateHandlers(store, options, telemetry)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes * 4),
            ("grpc.max_concurrent_streams", settings.max_concurrent_streams),
        ],
    )
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
    if handlers.gate is not None:
        handlers.gate.close()
    handlers.quota.flush()
    handlers.quota.close()
    store.close()
    log.info("worker %d stopped", index)


def _worker_process(options: ServeOptions, index: int, ready: Any) -> None:
    configure_logging()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(options, index, on_ready=lambda port: ready.send(port)))


# -- the supervisor --------------------------------------------------------------------------------


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("COVERGATE_LOG_LEVEL", "INFO"),
        format="%(asctime)s covergate[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("--listen must be HOST:PORT")
    return host.strip("[]"), int(port)


def _reserve_port(host: str, port: int) -> socket.socket:
    """Hold the port (bound, not listening) so every worker binds the same one with SO_REUSEPORT;
    connections are spread over the listening workers only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve(options: ServeOptions, announce: Callable[[str], None] = print) -> int:
    """Run `options.workers` worker processes (0: one per core) until SIGTERM or SIGINT."""
    workers = options.workers or os.cpu_count() or 1
    host, port = split_listen(options.listen)
    reserved = _reserve_port(host, port)
    port = reserved.getsockname()[1]
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
        proc = ctx.Process(target=_worker_process, args=(options, index, sender), daemon=False)
        proc.start()
        sender.close()
        return proc, receiver

    procs: dict[int, Any] = {}
    pipes = {}
    for i in range(workers):
        procs[i], pipes[i] = start(i)
    for i, pipe in pipes.items():
        if not pipe.poll(60) or not isinstance(pipe.recv(), int):
            log.error("worker %d did not start", i)
            stopping = True
    if not stopping:
        announce(f"covergate: serving on {listen} with {workers} worker(s)")
    sys.stdout.flush()
    restarts: list[float] = []
    while not stopping:
        sentinels = {p.sentinel: i for i, p in procs.items()}
        for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
            i = sentinels[sentinel]  # type: ignore[index]
            if stopping:
                break
            log.error("worker %d exited with code %s; restarting it", i, procs[i].exitcode)
            restarts = [t for t in restarts if t > time.monotonic() - 60] + [time.monotonic()]
            if len(restarts) > 5 * workers:
                log.error("workers keep dying; giving up")
                stopping = True
                break
            procs[i], _ = start(i)
    for proc in procs.values():
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    grace = options.config.server.shutdown_grace_seconds + 5
    for proc in procs.values():
        proc.join(grace)
        if proc.is_alive():
            proc.kill()
    reserved.close()
    return 0 if all(p.exitcode == 0 for p in procs.values()) else 1


__all__ = ["ServeOptions", "TlsFiles", "covergate_pb2", "run_worker", "serve"]

"""Integration tests of how a real `covergate serve` bounds connections ([server] settings): a
half-sent call ends at max connection age + grace, idle and silent connections are closed, a
client pinging too often gets GOAWAY, compressed requests are refused, and the transport
violations that grpc-core itself answers with INTERNAL are exactly the ones the README lists.

Raw HTTP/2 (the h2 package), for what no grpc client would send; timing only bounds the waits.
"""

from __future__ import annotations

import contextlib
import gzip
import queue
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from grpc_health.v1 import health_pb2
from harness import PHARMACY_AMC, Dataset, RunningServer, build_dataset

from covergate.v1 import covergate_pb2 as pb
from covergate.v1 import covergate_pb2_grpc as pb_grpc
from service.config import ConfigError, ServerSettings, load_config

pytestmark = pytest.mark.slow  # real servers on loopback: `make test-fast` skips them

DEADLINE = 60.0  # seconds; generous: only a bound on waiting, never what a test measures
CHECK = "/covergate.v1.CoverageService/CheckCoverage"
HEALTH = "/grpc.health.v1.Health/Check"
RST_STREAM, HEADERS, DATA = 3, 1, 0
END_STREAM = 0x1
INTERNAL, UNIMPLEMENTED, UNAUTHENTICATED = "13", "12", "16"


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return build_dataset(tmp_path_factory.mktemp("limits"))


@contextlib.contextmanager
def serving(ds: Dataset, server_toml: str = "") -> Iterator[RunningServer]:
    config = ds.data_dir.parent / f"limits-{time.monotonic_ns()}.toml"
    config.write_text("[server]\n" + server_toml)
    with RunningServer(ds.data_dir, workers=1, args=["--config", str(config)]) as server:
        yield server


@pytest.fixture(scope="module")
def default_server(ds: Dataset) -> Iterator[RunningServer]:
    with serving(ds) as server:
        yield server


@pytest.fixture(scope="module")
def aged_server(ds: Dataset) -> Iterator[RunningServer]:
    """Connections retired after 1 s, their calls given 1 s more."""
    with serving(
        ds, "max_connection_age_seconds = 1\nmax_connection_age_grace_seconds = 1\n"
    ) as server:
        yield server


def grpc_frame(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message: flag byte, 4-byte big-endian length, bytes."""
    return struct.pack(">BI", compressed, len(message) if length is None else length) + message


def check_request(ds: Dataset) -> bytes:
    c = ds.covered
    return pb.CheckCoverageRequest(
        request_id="limits",
        nir=c.nir,
        nir_key=c.nir_key,
        birth_date=c.birth_date,
        birth_rank=c.birth_rank,
        amc_number=PHARMACY_AMC,
        domain=pb.CARE_DOMAIN_PHARMACY,
        care_date="20250310",
    ).SerializeToString()


class RawConnection:
    """One raw HTTP/2 connection. h2 keeps the protocol state and is fed one frame at a time,
    since it accepts nothing after a GOAWAY; every frame's (type, flags, stream) is kept too."""

    def __init__(self, port: int, *, preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.sock.settimeout(0.2)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.buffer = b""
        self.frames: list[tuple[int, int, int]] = []
        self.events: list[h2.events.Event] = []
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.settings: dict[int, int] = {}
        self.eof = False
        if preface:
            self.h2.initiate_connection()
            self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.goaway is None and not self.eof:
            with contextlib.suppress(OSError):
                self.sock.sendall(data)

    def read(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self.buffer += chunk
        while len(self.buffer) >= 9:
            end = 9 + int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < end:
                break
            frame, self.buffer = self.buffer[:end], self.buffer[end:]
            stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
            self.frames.append((frame[3], frame[4], stream))
            if self.goaway is None:
                self._feed(frame)

    def _feed(self, frame: bytes) -> None:
        for event in self.h2.receive_data(frame):
            self.events.append(event)
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings.update({k: v.new_value for k, v in event.changed_settings.items()})
            elif isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            if self.eof or time.monotonic() > deadline:
                raise AssertionError(f"never happened: {what}; frames {self.frames}")
            self.read()

    # -- calls ---------------------------------------------------------------------------------

    def call(
        self,
        path: str,
        body: bytes | None,
        *,
        end_stream: bool = True,
        headers: Sequence[tuple[str, str]] = (),
        base: Sequence[tuple[str, str]] | None = None,
    ) -> int:
        stream = self.h2.get_next_available_stream_id()
        request_headers = [
            *(
                base
                if base is not None
                else [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "localhost"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ]
            ),
            *headers,
        ]
        self.h2.send_headers(stream, request_headers, end_stream=body is None and end_stream)
        if body is not None:
            self.h2.send_data(stream, body, end_stream=end_stream)
        self.flush()
        return stream

    def call_with_header_block(self, block: bytes) -> int:
        """A call whose HEADERS frame carries `block`, raw bytes, as its HPACK header block."""
        stream = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream, [(":method", "POST")], end_stream=True)
        self.h2.data_to_send()  # h2's own encoding of that frame is never sent
        header = struct.pack(">I", len(block))[1:] + bytes([HEADERS, 0x5])  # END_HEADERS|STREAM
        self.sock.sendall(header + struct.pack(">I", stream) + block)
        return stream

    def headers(self, stream: int) -> dict[str, str]:
        found: dict[str, str] = {}
        for event in self.events:
            answer = isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived)
            if answer and event.stream_id == stream:
                found.update(event.headers)
        return found

    def ended(self, stream: int) -> bool:
        """The call on `stream` is over: trailers, a reset, or the connection itself is gone."""
        return self.eof or any(
            s == stream and (kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM))
            for kind, flags, s in self.frames
        )

    def outcome(self, stream: int) -> str:
        """grpc-status of a finished call, or `RST <code>` when it was reset without one."""
        self.wait(lambda: self.ended(stream), f"stream {stream} ends")
        status = self.headers(stream).get("grpc-status")
        if status is not None:
            return status
        for event in self.events:
            if isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                return f"RST {h2.errors.ErrorCodes(event.error_code).name}"
        return "no status"

    def ping_until_goaway(self, count: int, pause: float = 0.0) -> int:
        """Ping up to `count` times, one at a time (each after the previous one's ack and
        `pause` seconds); the number of the ping answered with GOAWAY, 0 if none was."""
        for i in range(1, count + 1):
            if pause:
                time.sleep(pause)
            payload = struct.pack(">Q", i)
            self.h2.ping(payload)
            self.flush()
            self.wait(
                lambda p=payload: (
                    self.goaway is not None  # type: ignore[misc]
                    or any(
                        isinstance(e, h2.events.PingAckReceived) and e.ping_data == p
                        for e in self.events
                    )
                ),
                f"ping {i} acknowledged or refused",
            )
            if self.goaway is not None:
                return i
        return 0


@pytest.fixture
def connect() -> Iterator[Callable[..., RawConnection]]:
    opened: list[RawConnection] = []

    def open_connection(port: int, **kwargs: bool) -> RawConnection:
        opened.append(RawConnection(port, **kwargs))
        return opened[-1]

    yield open_connection
    for conn in opened:
        conn.close()


# -- connection lifetime ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "half_sent",
    [
        pytest.param(lambda req: (grpc_frame(req)[:12], False), id="truncated-message"),
        pytest.param(lambda req: (grpc_frame(req, length=len(req) + 64), False), id="short-body"),
        pytest.param(lambda req: (None, False), id="headers-only"),
        pytest.param(lambda req: (None, True), id="no-message-at-all"),
        pytest.param(lambda req: (grpc_frame(req)[:3], True), id="truncated-prefix-then-end"),
    ],
)
def test_a_half_sent_unary_call_is_ended_by_the_connection_age(
    ds: Dataset,
    aged_server: RunningServer,
    connect: Callable[..., RawConnection],
    half_sent: Callable[[bytes], tuple[bytes | None, bool]],
) -> None:
    """A call whose request never completes (no credential needed to open one) is held by no
    handler, so nothing in covergate can end it: the connection's age and grace do."""
    conn = connect(aged_server.port)
    body, end_stream = half_sent(check_request(ds))
    stream = conn.call(
        CHECK,
        body,
        end_stream=end_stream,
        headers=[("authorization", f"Bearer {ds.tokens['pharmacist']}")],
    )
    conn.wait(lambda: conn.goaway is not None, "GOAWAY at max connection age")
    assert conn.goaway is not None
    assert conn.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert conn.goaway.additional_data == b"max_age"
    assert conn.goaway.last_stream_id >= stream  # the call may still finish, in the grace
    conn.wait(lambda: conn.ended(stream), "the half-sent call is ended after the grace")
    conn.wait(lambda: conn.eof, "the connection is closed")
    aged_server.wait_health(health_pb2.HealthCheckResponse.SERVING)  # the server goes on


def test_a_stream_outliving_the_connection_age_ends_unavailable(
    ds: Dataset, aged_server: RunningServer
) -> None:
    """A real client's stream left open: ended at age + grace with UNAVAILABLE, the code a
    client retries on (with a new connection)."""
    requests: queue.Queue[pb.CheckCoverageRequest | None] = queue.Queue()

    def messages() -> Iterator[pb.CheckCoverageRequest]:
        while (request := requests.get()) is not None:
            yield request

    channel = grpc.insecure_channel(aged_server.target)
    try:
        responses = pb_grpc.CoverageServiceStub(channel).CheckCoverageStream(
            messages(),
            metadata=(("authorization", f"Bearer {ds.tokens['pharmacist']}"),),
            timeout=DEADLINE,
        )
        requests.put(pb.CheckCoverageRequest.FromString(check_request(ds)))
        with pytest.raises(grpc.RpcError) as ended:
            for _ in responses:
                pass  # the one answer, then the stream stays open: no more requests, no end
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        requests.put(None)
        channel.close()


def test_an_idle_connection_is_closed(ds: Dataset, connect: Callable[..., RawConnection]) -> None:
    with serving(ds, "max_connection_idle_seconds = 1\nmax_connection_age_seconds = 3600\n") as s:
        conn = connect(s.port)
        stream = conn.call(HEALTH, grpc_frame(b""))
        assert conn.outcome(stream) == "0"  # one whole call; then nothing
        conn.wait(lambda: conn.goaway is not None, "GOAWAY once idle")
        assert conn.goaway is not None
        assert b"idle" in conn.goaway.additional_data
        conn.wait(lambda: conn.eof, "the idle connection is closed")


def test_a_silent_connection_is_closed_after_the_handshake_timeout(
    ds: Dataset, connect: Callable[..., RawConnection]
) -> None:
    with serving(ds, "handshake_timeout_seconds = 1\n") as s:
        conn = connect(s.port, preface=False)  # TCP only: no HTTP/2 preface, no SETTINGS
        conn.wait(lambda: conn.eof, "the connection that never spoke HTTP/2 is closed")


def test_the_stream_limit_is_announced(ds: Dataset, connect: Callable[..., RawConnection]) -> None:
    with serving(ds, "max_concurrent_streams = 7\n") as s:
        conn = connect(s.port)
        key = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        conn.wait(lambda: key in conn.settings, "the server's SETTINGS")
        assert conn.settings[key] == 7


# -- keepalive enforcement -------------------------------------------------------------------------


def test_a_client_pinging_too_often_gets_goaway(
    ds: Dataset, default_server: RunningServer, connect: Callable[..., RawConnection]
) -> None:
    """With the defaults (at most one ping per 30 s without data, 2 strikes allowed): the first
    ping is fine, the 2nd and 3rd are strikes, the 4th is one too many."""
    conn = connect(default_server.port)
    assert conn.ping_until_goaway(10) == 4
    assert conn.goaway is not None
    assert conn.goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert conn.goaway.additional_data == b"too_many_pings"
    conn.wait(lambda: conn.eof, "the connection is closed")


@pytest.mark.parametrize("permit", [True, False], ids=["permit-without-calls", "calls-only"])
def test_pings_without_calls(
    ds: Dataset, connect: Callable[..., RawConnection], permit: bool
) -> None:
    """Pings 20 ms apart against a 1 ms minimum: fine when pings without calls are permitted;
    when they are not, each after the first is a strike, and the 5th ping is the 4th strike
    (of 3 allowed)."""
    toml = (
        "keepalive_min_ping_interval_seconds = 0.001\nkeepalive_max_ping_strikes = 3\n"
        f"keepalive_permit_without_calls = {str(permit).lower()}\n"
    )
    with serving(ds, toml) as s:
        conn = connect(s.port)
        refused = conn.ping_until_goaway(8, pause=0.02)
        if permit:
            assert (refused, conn.goaway) == (0, None)
        else:
            assert refused == 5
            assert conn.goaway is not None
            assert conn.goaway.additional_data == b"too_many_pings"


# -- compressed requests ---------------------------------------------------------------------------


def test_compressed_requests_are_unimplemented_by_default(
    ds: Dataset, default_server: RunningServer, connect: Callable[..., RawConnection]
) -> None:
    """No decompression before the credential is checked; a corrupt compressed message is
    refused like a sound one, never an INTERNAL."""
    token = ("authorization", f"Bearer {ds.tokens['pharmacist']}")
    conn = connect(default_server.port)
    for body, encoding in (
        (grpc_frame(gzip.compress(check_request(ds)), compressed=True), "gzip"),
        (grpc_frame(b"not gzip at all", compressed=True), "gzip"),
        (grpc_frame(b"not deflate", compressed=True), "deflate"),
        (grpc_frame(check_request(ds)), "gzip"),  # announced, not used
    ):
        stream = conn.call(CHECK, body, headers=[token, ("grpc-encoding", encoding)])
        assert conn.outcome(stream) == UNIMPLEMENTED
    stream = conn.call(CHECK, grpc_frame(check_request(ds)), headers=[token])
    assert conn.outcome(stream) == "0"
    # What a well-behaved client reads before it would compress: identity only.
    assert conn.headers(stream).get("grpc-accept-encoding") == "identity"


def test_compressed_requests_when_accepted(
    ds: Dataset, connect: Callable[..., RawConnection]
) -> None:
    token = ("authorization", f"Bearer {ds.tokens['pharmacist']}")
    with serving(ds, "accept_compressed_requests = true\n") as s:
        with grpc.insecure_channel(s.target) as channel:
            call = channel.unary_unary(CHECK)
            for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
                answer = call(check_request(ds), metadata=[token], compression=compression)
                assert pb.CheckCoverageResponse.FromString(answer).decision == pb.DECISION_COVERED
                # 10 MiB that compress to a few kB: refused once inflated past the limit.
                bomb = b"\x12" + b"\x80\x80\x80\x05" + b"0" * (10 << 20)  # field 2, 10 MiB
                with pytest.raises(grpc.RpcError) as info:
                    call(bomb, metadata=[token], timeout=DEADLINE, compression=compression)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        conn = connect(s.port)
        # Then grpc-core inflates before covergate sees the call, and a corrupt message is its
        # INTERNAL (listed in the README).
        body = grpc_frame(b"not gzip at all", compressed=True)
        stream = conn.call(CHECK, body, headers=[token, ("grpc-encoding", "gzip")])
        assert conn.outcome(stream) == INTERNAL


# -- what grpc-core answers with INTERNAL ----------------------------------------------------------

_BASE = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", CHECK),
    (":authority", "localhost"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


def _without(name: str) -> list[tuple[str, str]]:
    return [h for h in _BASE if h[0] != name]


def _with(name: str, value: str) -> list[tuple[str, str]]:
    return [(k, value if k == name else v) for k, v in _BASE]


# The README's list, case by case: (body, extra headers, base headers or None, outcome). If one
# of these changes with a new grpcio, the README and server.py's docstring must change with it.
GRPC_CORE_INTERNAL = {
    "compressed-flag-without-grpc-encoding": (True, [], None, INTERNAL),
    "compressed-flag-with-grpc-encoding-identity": (
        True,
        [("grpc-encoding", "identity")],
        None,
        INTERNAL,
    ),
    "unknown-grpc-encoding": (False, [("grpc-encoding", "snappy")], None, INTERNAL),
    "te-not-trailers": (False, [], _with("te", "gzip"), INTERNAL),
    "malformed-grpc-timeout": (False, [("grpc-timeout", "soon")], None, INTERNAL),
    "malformed-grpc-status": (False, [("grpc-status", "x")], None, INTERNAL),
    "malformed-grpc-previous-rpc-attempts": (
        False,
        [("grpc-previous-rpc-attempts", "x")],
        None,
        INTERNAL,
    ),
    "malformed-grpc-retry-pushback-ms": (False, [("grpc-retry-pushback-ms", "x")], None, INTERNAL),
    "malformed-grpc-internal-encoding-request": (
        False,
        [("grpc-internal-encoding-request", "x")],
        None,
        INTERNAL,
    ),
    "malformed-lb-cost-bin": (False, [("lb-cost-bin", "AAAA")], None, INTERNAL),
    "bin-header-not-base64": (False, [("x-anything-bin", "!!!")], None, INTERNAL),
    "unknown-method": (False, [], _with(":method", "FETCH"), INTERNAL),
    "unknown-scheme": (False, [], _with(":scheme", "ftp"), INTERNAL),
    "uppercase-header-name": (False, [("X-Anything", "1")], None, INTERNAL),
    "illegal-header-name": (False, [("x anything", "1")], None, INTERNAL),
    "unknown-pseudo-header": (False, [(":anything", "1")], None, INTERNAL),
    "empty-header-name": (False, [("", "1")], None, INTERNAL),
    # Reset with HTTP/2 INTERNAL_ERROR, no grpc-status: a grpc client reports INTERNAL.
    "method-not-post": (False, [], _with(":method", "GET"), "RST INTERNAL_ERROR"),
    "no-te": (False, [], _without("te"), "RST INTERNAL_ERROR"),
    "no-path": (False, [], _without(":path"), "RST INTERNAL_ERROR"),
    "no-scheme": (False, [], _without(":scheme"), "RST INTERNAL_ERROR"),
    "no-authority": (False, [], _without(":authority"), "RST INTERNAL_ERROR"),
    "no-method": (False, [], _without(":method"), "RST INTERNAL_ERROR"),
}


def test_what_grpc_core_answers_with_internal(
    ds: Dataset, default_server: RunningServer, connect: Callable[..., RawConnection]
) -> None:
    """The exact list of client-sendable violations that grpc-core itself ends with INTERNAL,
    before covergate's handler runs (nothing covergate can configure changes these)."""
    token = ("authorization", f"Bearer {ds.tokens['pharmacist']}")
    outcomes = {}
    for name, (compressed, headers, base, _) in GRPC_CORE_INTERNAL.items():
        conn = connect(default_server.port)
        body = grpc_frame(check_request(ds), compressed=compressed)
        stream = conn.call(CHECK, body, headers=[token, *headers], base=base)
        outcomes[name] = conn.outcome(stream)
        conn.close()
    # A header block that does not decode: INTERNAL, then grpc-core closes the connection.
    conn = connect(default_server.port)
    assert conn.outcome(conn.call_with_header_block(b"\xff\xff\xff\xff")) == INTERNAL
    conn.wait(lambda: conn.eof, "the connection is closed")
    # The same connection shape, with nothing wrong: answered by covergate.
    conn = connect(default_server.port)
    assert conn.outcome(conn.call(CHECK, grpc_frame(check_request(ds)), headers=[token])) == "0"
    assert outcomes == {name: case[3] for name, case in GRPC_CORE_INTERNAL.items()}


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("max_connection_idle_seconds = 0", "max_connection_idle_seconds must be above 0"),
        ("max_connection_age_seconds = -5", "max_connection_age_seconds must be above 0"),
        ("max_connection_age_grace_seconds = inf", "max_connection_age_grace_seconds must be"),
        ("max_connection_age_seconds = nan", "max_connection_age_seconds must be"),
        ("max_connection_age_seconds = 3e6", "max_connection_age_seconds must be"),
        ("keepalive_min_ping_interval_seconds = '30'", "must be a float"),
        ("keepalive_max_ping_strikes = 0", "keepalive_max_ping_strikes must be a positive"),
        ("keepalive_max_ping_strikes = 2.5", "keepalive_max_ping_strikes must be a int"),
        ("keepalive_permit_without_calls = 1", "keepalive_permit_without_calls must be a bool"),
        ("max_concurrent_streams = 0", "max_concurrent_streams must be a positive"),
        ("handshake_timeout_seconds = 0", "handshake_timeout_seconds must be above 0"),
        ("accept_compressed_requests = 'no'", "accept_compressed_requests must be a bool"),
        ("max_message_bytes = 4294967296", "max_message_bytes must be at most"),
        ("workers = -1", "workers must be 0"),
        ("max_conection_age_seconds = 60", "has no setting 'max_conection_age_seconds'"),
    ],
)
def test_server_settings_are_checked(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "covergate.toml"
    path.write_text(f"[server]\n{toml}\n")
    with pytest.raises(ConfigError, match=r"\[server\] ") as caught:
        load_config(path)
    assert message in str(caught.value)


def test_the_defaults_are_the_documented_ones(tmp_path: Path) -> None:
    """The README's [server] example is the defaults; the example loads and equals them."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```toml\n[server]") + len("```toml\n")
    example = readme[start : readme.index("[store]", start)]
    path = tmp_path / "covergate.toml"
    path.write_text(example)
    assert load_config(path).server == ServerSettings()

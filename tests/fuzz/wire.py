"""Protobuf wire format, written by hand, and structure-aware mutations of serialized requests.

Every mutation draws its decisions from a `Choices`: a seeded `random.Random` (the atheris custom
mutator, the corpus generator) or hypothesis (`HypothesisChoices`, which shrinks), so the same
code serves every engine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
U64 = (1 << 64) - 1

# CheckCoverageRequest: field number -> wire type (covergate.proto); the batch holds them in 1.
STRING_FIELDS = (1, 2, 3, 4, 6, 7, 9)
VARINT_FIELDS = (5, 8)  # birth_rank (uint32), domain (CareDomain, an open enum: int32)
REQUEST_FIELDS = (*STRING_FIELDS, *VARINT_FIELDS)
F_ITEMS = 1


class Choices(Protocol):
    """Where a mutation's decisions come from."""

    def integer(self, lo: int, hi: int) -> int: ...
    def raw(self, max_size: int) -> bytes: ...


class RandomChoices:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def raw(self, max_size: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(0, max_size))


class HypothesisChoices:
    """Choices drawn from hypothesis's `st.data()`, so failures shrink."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return int(self.data.draw(self.st.integers(lo, hi)))

    def raw(self, max_size: int) -> bytes:
        return bytes(self.data.draw(self.st.binary(max_size=max_size)))


def pick(ch: Choices, options: Sequence[T]) -> T:
    return options[ch.integer(0, len(options) - 1)]


# -- encoding --------------------------------------------------------------------------------------


def varint(value: int, padding: int = 0) -> bytes:
    """`value` (negative: two's complement on 64 bits, as int32 enums are sent) as a varint,
    `padding` bytes longer than needed; a varint of more than 10 bytes is invalid on the wire."""
    if value < 0:
        value &= U64
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    if padding:
        out[-1] |= 0x80
        out += b"\x80" * (padding - 1) + b"\x00"
    return bytes(out)


def tag(number: int, wire_type: int, padding: int = 0) -> bytes:
    return varint(number << 3 | wire_type, padding)


def varint_field(number: int, value: int, padding: int = 0) -> bytes:
    return tag(number, VARINT) + varint(value, padding)


def len_field(number: int, payload: bytes, length: int | None = None) -> bytes:
    return tag(number, LEN) + varint(len(payload) if length is None else length) + payload


# -- lenient splitting -----------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    return None


def _field_end(data: bytes, pos: int, depth: int = 0) -> tuple[int, int, int] | None:
    """(number, wire type, end) of the field at `pos`, or None where it cannot be read."""
    head = _read_varint(data, pos)
    if head is None:
        return None
    key, pos = head
    number, wire_type = key >> 3, key & 7
    if wire_type == VARINT:
        value = _read_varint(data, pos)
        return None if value is None else (number, wire_type, value[1])
    if wire_type in (I64, I32):
        end = pos + (8 if wire_type == I64 else 4)
        return (number, wire_type, end) if end <= len(data) else None
    if wire_type == LEN:
        size = _read_varint(data, pos)
        if size is None or size[1] + size[0] > len(data):
            return None
        return number, wire_type, size[1] + size[0]
    if wire_type == SGROUP and depth < 8:
        while pos < len(data):
            inner = _field_end(data, pos, depth + 1)
            if inner is None:
                return None
            if inner[1] == EGROUP:
                return number, wire_type, inner[2]
            pos = inner[2]
        return None
    if wire_type == EGROUP:
        return number, wire_type, pos
    return None


def split(data: bytes) -> tuple[list[bytes], bytes]:
    """The fields of a message as their raw bytes, and whatever could not be read as a field."""
    fields: list[bytes] = []
    pos = 0
    while pos < len(data):
        found = _field_end(data, pos)
        if found is None:
            break
        fields.append(data[pos : found[2]])
        pos = found[2]
    return fields, data[pos:]


def describe(raw: bytes) -> tuple[int, int, bytes] | None:
    """(number, wire type, value bytes: the varint, the fixed bytes, the LEN payload, the
    group's body) of one field from split()."""
    head = _read_varint(raw, 0)
    if head is None:
        return None
    key, pos = head
    if key & 7 == LEN:
        size = _read_varint(raw, pos)
        if size is None:
            return None
        return key >> 3, LEN, raw[size[1] :]
    if key & 7 == SGROUP:
        end_tag = len(tag(key >> 3, EGROUP))
        return key >> 3, SGROUP, raw[pos:-end_tag]
    return key >> 3, key & 7, raw[pos:]


# -- interesting values ----------------------------------------------------------------------------

INTERESTING_STRINGS: tuple[bytes, ...] = (
    b"",
    b"0",
    b"1" * 13,
    b"2850775123456",
    b"178022A004017",
    b"178022a004017",
    b"17802 2A004017",
    b"99",
    b"00",
    b"20250615",
    b"19850000",
    b"20240229",
    b"20250229",
    b"123456789",
    b"1234567890",
    b"12345678901",
    b"Q" * 64,
    b"Q" * 65,
    b"A0001234",
    b"\x00",
    b"12\x003",
    "\u00e9".encode(),  # valid non-ASCII
    "\uff11\uff12".encode(),  # fullwidth digits
    "\u0661\u0662".encode(),  # Arabic-Indic digits
    "\u00b2".encode(),  # superscript two: str.isdigit() says yes
    "\U0001f600".encode(),
    b"\x80",  # a lone continuation byte
    b"\xc0\xaf",  # over-long encoding of '/'
    b"\xc1\xbf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xf8\x88\x80\x80\x80",
    b"\xff",
    b"\xc3",  # truncated two-byte sequence
    b"1234567\xe9",
    "2850775123456\u0301".encode(),
)

INTERESTING_VARINTS: tuple[int, ...] = (
    0,
    1,
    2,
    5,
    9,
    10,
    11,
    127,
    128,
    255,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,  # truncated to 1 by a uint32/int32 field
    (1 << 32) + 5,
    1 << 35,
    (1 << 63) - 1,
    1 << 63,
    U64,
    -1,
    -2,
    -(1 << 31),
    -(1 << 31) - 1,
)

HUGE_LENGTHS: tuple[int, ...] = (
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 3,
    (1 << 63) - 1,
    1 << 63,
    U64,
)

FIELD_NUMBERS: tuple[int, ...] = (
    0,
    10,
    11,
    15,
    16,
    17,
    100,
    2047,
    2048,
    19000,
    (1 << 29) - 1,
    1 << 29,
    *REQUEST_FIELDS,
)


def any_field(ch: Choices, number: int | None = None, depth: int = 0) -> bytes:
    """One field of any wire type (valid ones, groups, and the invalid 6 and 7)."""
    if number is None:
        number = pick(ch, FIELD_NUMBERS)
    wire_type = ch.integer(0, 7)
    padding = pick(ch, (0, 0, 0, 1, 9))
    head = tag(number, wire_type, padding)
    if wire_type == VARINT:
        return head + varint(pick(ch, INTERESTING_VARINTS), pick(ch, (0, 0, 1, 5)))
    if wire_type == I64:
        return head + ch.raw(8).ljust(8, b"\0")
    if wire_type == I32:
        return head + ch.raw(4).ljust(4, b"\0")
    if wire_type == LEN:
        return head + varint(len(payload := ch.raw(12))) + payload
    if wire_type == SGROUP:
        body = b"".join(
            any_field(ch, depth=depth + 1) for _ in range(ch.integer(0, 2) * (depth < 3))
        )
        end = pick(ch, (number, number, number, number + 1))
        return head + body + (tag(end, EGROUP) if ch.integer(0, 5) else b"")
    return head + ch.raw(3)  # a lone end-group, or wire types 6 and 7


# -- mutations -------------------------------------------------------------------------------------

Mutation = Callable[[bytes, Choices, bool], bytes]


def duplicate_field(data: bytes, ch: Choices, batch: bool) -> bytes:
    fields, tail = split(data)
    if not fields:
        return data + data
    copy = pick(ch, fields)
    fields.insert(ch.integer(0, len(fields)), copy)
    return b"".join(fields) + tail


def unknown_field(data: bytes, ch: Choices, batch: bool) -> bytes:
    fields, tail = split(data)
    fields.insert(ch.integer(0, len(fields)), any_field(ch))
    return b"".join(fields) + tail


def overlong_varint(data: bytes, ch: Choices, batch: bool) -> bytes:
    """Re-encode a tag, a varint value or a length prefix with padding (10 bytes is the most a
    varint may take: one more and the message is invalid)."""
    fields, tail = split(data)
    if not fields:
        return varint_field(pick(ch, REQUEST_FIELDS), ch.integer(0, 300), ch.integer(1, 10))
    i = ch.integer(0, len(fields) - 1)
    parts = describe(fields[i])
    if parts is None:
        return data
    number, wire_type, value = parts
    padding = ch.integer(1, 10)
    where = ch.integer(0, 1)
    if wire_type == VARINT:
        decoded = _read_varint(value, 0)
        number_value = decoded[0] if decoded else 0
        fields[i] = tag(number, VARINT, padding * (where == 0)) + varint(
            number_value, padding * (where == 1)
        )
    elif wire_type == LEN:
        head = tag(number, LEN, padding * (where == 0))
        fields[i] = head + varint(len(value), padding * (where == 1)) + value
    else:
        head = _read_varint(fields[i], 0)
        assert head is not None
        fields[i] = tag(number, wire_type, padding) + fields[i][head[1] :]
    return b"".join(fields) + tail


def truncate(data: bytes, ch: Choices, batch: bool) -> bytes:
    return data[: ch.integer(0, max(len(data) - 1, 0))]


def wrong_wire_type(data: bytes, ch: Choices, batch: bool) -> bytes:
    fields, tail = split(data)
    if not fields:
        return data + any_field(ch, pick(ch, REQUEST_FIELDS))
    i = ch.integer(0, len(fields) - 1)
    parts = describe(fields[i])
    if parts is None:
        return data
    number, wire_type, value = parts
    new_type = pick(ch, [t for t in range(8) if t != wire_type])
    if new_type == VARINT:
        replacement = varint_field(number, len(value) if wire_type == LEN else ch.integer(0, 300))
    elif new_type == LEN:
        # A varint field as LEN is what a packed repeated field looks like.
        payload = value if wire_type == VARINT else varint(ch.integer(0, 300)) * ch.integer(1, 3)
        replacement = len_field(number, payload)
    elif new_type == I64:
        replacement = tag(number, I64) + value[:8].ljust(8, b"0")
    elif new_type == I32:
        replacement = tag(number, I32) + value[:4].ljust(4, b"0")
    elif new_type == SGROUP:
        replacement = (
            tag(number, SGROUP) + (value if wire_type == LEN else b"") + tag(number, EGROUP)
        )
    else:
        replacement = tag(number, new_type) + value[:3]
    fields[i] = replacement
    return b"".join(fields) + tail


def string_value(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A string field set to a non-ASCII, invalid UTF-8, boundary-length or look-alike value;
    set, appended (last one wins) or spliced into the current value."""
    if batch:
        return mutate_item(data, ch, batch)
    fields, tail = split(data)
    number = pick(ch, STRING_FIELDS)
    value = pick(ch, INTERESTING_STRINGS)
    present = [i for i, f in enumerate(fields) if (d := describe(f)) and d[:2] == (number, LEN)]
    how = ch.integer(0, 2)
    if present and how == 0:
        i = pick(ch, present)
        old = describe(fields[i])
        assert old is not None
        at = ch.integer(0, len(old[2]))
        fields[i] = len_field(number, old[2][:at] + value + old[2][at + ch.integer(0, 1) :])
    elif present and how == 1:
        fields[pick(ch, present)] = len_field(number, value)
    else:
        fields.insert(ch.integer(0, len(fields)), len_field(number, value))
    return b"".join(fields) + tail


def huge_length(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A LEN field whose length is beyond the message, by one byte or by 2**64."""
    fields, tail = split(data)
    lens = [i for i, f in enumerate(fields) if (d := describe(f)) and d[1] == LEN]
    if not lens:
        return data + tag(pick(ch, REQUEST_FIELDS), LEN) + varint(pick(ch, HUGE_LENGTHS))
    i = pick(ch, lens)
    parts = describe(fields[i])
    assert parts is not None
    number, _, value = parts
    rest = len(b"".join(fields[i + 1 :]) + tail)
    length = pick(ch, (*HUGE_LENGTHS, len(value) + rest + 1, len(value) + 1, len(value) + rest))
    fields[i] = tag(number, LEN) + varint(length, pick(ch, (0, 0, 1))) + value
    return b"".join(fields) + tail


def enum_value(data: bytes, ch: Choices, batch: bool) -> bytes:
    """birth_rank (uint32) or domain (int32 enum) set to a negative, 64-bit or boundary value."""
    if batch:
        return mutate_item(data, ch, batch)
    fields, tail = split(data)
    number = pick(ch, VARINT_FIELDS)
    field = varint_field(number, pick(ch, INTERESTING_VARINTS), pick(ch, (0, 0, 0, 1)))
    present = [i for i, f in enumerate(fields) if (d := describe(f)) and d[:2] == (number, VARINT)]
    if present and ch.integer(0, 1):
        fields[pick(ch, present)] = field
    else:
        fields.insert(ch.integer(0, len(fields)), field)
    return b"".join(fields) + tail


def many_items(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A batch with many items around the limits (4, 16), or a few hundred; empty items too."""
    fields, tail = split(data if batch else len_field(F_ITEMS, data))
    items = [f for f in fields if f[:1] == b"\x0a"] or [b"\x0a\x00"]
    count = pick(ch, (3, 4, 5, 15, 16, 17, 33, 64, 200, 301))
    if ch.integer(0, 3) == 0:
        items = [b"\x0a\x00"]
    out = [pick(ch, items) for _ in range(count)]
    if ch.integer(0, 2) == 0:
        out.append(any_field(ch))  # something only upb can judge, after the items
    return b"".join(out) + tail


def group(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A group (wire types 3 and 4), under a known field's number or an unknown one, matched or
    not, with fields inside."""
    fields, tail = split(data)
    number = pick(ch, (*REQUEST_FIELDS, 10, 15, 16, 2047))
    inner = b"".join(pick(ch, fields) for _ in range(ch.integer(0, 2))) if fields else b""
    end = pick(ch, (number, number, number + 1, 0))
    body = tag(number, SGROUP) + inner + (tag(end, EGROUP) if ch.integer(0, 4) else b"")
    fields.insert(ch.integer(0, len(fields)), body)
    return b"".join(fields) + tail


def shuffle(data: bytes, ch: Choices, batch: bool) -> bytes:
    fields, tail = split(data)
    for i in range(len(fields) - 1, 0, -1):
        j = ch.integer(0, i)
        fields[i], fields[j] = fields[j], fields[i]
    return b"".join(fields) + tail


def delete_field(data: bytes, ch: Choices, batch: bool) -> bytes:
    fields, tail = split(data)
    if fields:
        del fields[ch.integer(0, len(fields) - 1)]
    return b"".join(fields) + tail


def mutate_item(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A batch item mutated as a request; its length prefix fixed, or left to lie."""
    if not batch:
        return string_value(data, ch, batch)
    fields, tail = split(data)
    items = [i for i, f in enumerate(fields) if (d := describe(f)) and d[:2] == (F_ITEMS, LEN)]
    if not items:
        return data + len_field(F_ITEMS, b"")
    i = pick(ch, items)
    parts = describe(fields[i])
    assert parts is not None
    item = mutate(parts[2], ch, batch=False, rounds=ch.integer(1, 2))
    length = len(item) + pick(ch, (0, 0, 0, 0, 1, -1))
    fields[i] = tag(F_ITEMS, LEN) + varint(max(length, 0)) + item
    return b"".join(fields) + tail


def byte_edit(data: bytes, ch: Choices, batch: bool) -> bytes:
    """The unstructured kind: flip a bit, set, insert or delete bytes."""
    out = bytearray(data)
    kind = ch.integer(0, 3)
    at = ch.integer(0, len(out))
    if kind == 0 and out:
        out[min(at, len(out) - 1)] ^= 1 << ch.integer(0, 7)
    elif kind == 1 and out:
        out[min(at, len(out) - 1)] = ch.integer(0, 255)
    elif kind == 2 or not out:
        out[at:at] = ch.raw(4)
    else:
        del out[at : at + ch.integer(1, 4)]
    return bytes(out)


def as_other_kind(data: bytes, ch: Choices, batch: bool) -> bytes:
    """A request sent as a batch item, or a batch's first item sent alone."""
    if not batch:
        return len_field(F_ITEMS, data)
    fields, _ = split(data)
    parts = describe(fields[0]) if fields else None
    return parts[2] if parts else data


MUTATIONS: tuple[Mutation, ...] = (
    duplicate_field,
    unknown_field,
    overlong_varint,
    truncate,
    wrong_wire_type,
    string_value,
    string_value,
    huge_length,
    enum_value,
    many_items,
    group,
    shuffle,
    delete_field,
    mutate_item,
    mutate_item,
    byte_edit,
    as_other_kind,
)

MAX_REQUEST = 16 << 10


def mutate(data: bytes, ch: Choices, *, batch: bool, rounds: int | None = None) -> bytes:
    """`data` after 1-4 (or `rounds`) structure-aware mutations; at most MAX_REQUEST bytes."""
    for _ in range(ch.integer(1, 4) if rounds is None else rounds):
        data = pick(ch, MUTATIONS)(data, ch, batch)[:MAX_REQUEST]
    return data

"""In-process micro-benchmarks on one core: fast-path decisions/s of the Cython gate
(`fastpath._gate_c.Gate`) against the reference (`fastpath._gate_py.Gate`), and import rows/s.

Run as a pinned subprocess by the harness (`python -m bench.micro --dataset DIR`); prints JSON.
Gates read the benchmark store itself, with requests for sampled beneficiaries.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import dataset as bench_dataset
from bench import frames
from bench.frames import COVERED
from bench.scenarios import COUNTER_MIX
from fastpath.rules import Keys, Practitioner

IMPLEMENTATIONS = {"cython": "fastpath._gate_c", "python": "fastpath._gate_py"}


def _rate(
    call: Callable[[Any], object], inputs: list[Any], items_per_call: int, seconds: float
) -> float:
    """Items per second calling `call` over `inputs` round robin for about `seconds`."""
    calls = 0
    n = len(inputs)
    chunk = max(1, min(256, n))
    started = time.perf_counter()
    deadline = started + seconds
    i = 0
    while True:
        for _ in range(chunk):
            call(inputs[i])
            i = i + 1 if i + 1 < n else 0
        calls += chunk
        now = time.perf_counter()
        if now >= deadline:
            return calls * items_per_call / (now - started)


def _server_parts(ds: bench_dataset.Dataset, config_path: str | None) -> tuple[Any, ...]:
    """The store, keys, quota state and practitioner exactly as a server worker builds them from
    the data dir and `config_path` (quotas included); older trees without quotas get None."""
    from service.config import load_config, load_pepper
    from service.store import Store

    config = load_config(config_path)
    store = Store(ds.data_dir, config.store)
    keys = Keys(load_pepper(ds.data_dir, None))
    try:
        from service.quotas import PractitionerFactory, open_quota_file
    except ImportError:
        return store, keys, None, None
    record = store.practitioner(ds.practitioner_id)
    if record is None:
        raise RuntimeError("the bench practitioner is missing from the store")
    return store, keys, open_quota_file(ds.data_dir, config), PractitionerFactory(config)(record)


def decisions(
    ds: bench_dataset.Dataset, seconds: float, rounds: int, config_path: str | None = None
) -> dict[str, Any]:
    store, keys, quota, served_as = _server_parts(ds, config_path)
    gates = {}
    # A gate with quotas on refuses a caller without a slot (QUOTA_STATE_UNAVAILABLE): "no quota"
    # is a gate without the quota file, as a server with quotas disabled builds it.
    unmetered_gates = {}
    for name, module_name in IMPLEMENTATIONS.items():
        module = importlib.import_module(module_name)
        extra = {"quota": quota} if quota is not None else {}
        gates[name] = module.Gate(store.env, store.rights_db, keys, max_batch_items=500, **extra)
        unmetered_gates[name] = module.Gate(store.env, store.rights_db, keys, max_batch_items=500)
    # Decision-only: no quota slot, every domain and insurer in scope.
    bare = Practitioner(
        practitioner_id=ds.practitioner_id,
        profession="pharmacist",
        amc_numbers=frozenset(ds.practitioner_amcs),
    )
    practitioner = served_as or bare
    today = int(ds.care_date)
    now = int(time.time())
    covered = ds.pools[COVERED]
    singles = [frames.request_bytes(s, f"r{i:08d}") for i, s in enumerate(covered)]
    batches = frames.whole_batches(covered)
    mix_specs = frames.mixed(ds.pools, dict(COUNTER_MIX), 100 * 40)
    mixed_batches = [frames.batch_bytes(mix_specs[i : i + 100]) for i in range(0, 4000, 100)]

    # measure -> (gate method, inputs, items per call, practitioner, gates)
    measures: dict[str, tuple[str, list[bytes], int, Practitioner, dict[str, Any]]] = {
        "single": ("check", singles, 1, practitioner, gates),
        "stream_item": ("check_item", singles, 1, practitioner, gates),
        "batch_100": ("check_batch", batches, 100, practitioner, gates),
        "batch_100_mix": ("check_batch", mixed_batches, 100, practitioner, gates),
    }
    if served_as is not None:
        measures["batch_100_no_quota"] = ("check_batch", batches, 100, bare, unmetered_gates)
    # Every gate must give the right answers before its speed means anything.
    for name in gates:
        for gate, who in ((gates[name], practitioner), (unmetered_gates[name], bare)):
            code, payload = gate.check(who, singles[0], today, now)
            problem = frames.check_unary(covered[0], code, payload, decisions=True)
            code, payload = gate.check_batch(who, batches[0], today, now)
            problems = frames.check_batch(covered[:100], code, payload, decisions=True)
            if problem or problems:
                raise RuntimeError(f"{name} gate: {problem or problems[0]}")
    out: dict[str, Any] = {name: {} for name in gates}
    for r in range(rounds):
        order = list(gates) if r % 2 == 0 else list(reversed(gates))
        for measure, (method, inputs, per_call, who, measured) in measures.items():
            for name in order:
                bound = getattr(measured[name], method)

                def call(request: bytes, bound: Any = bound, who: Practitioner = who) -> object:
                    return bound(who, request, today, now)

                rate = _rate(call, inputs, per_call, seconds)
                out[name].setdefault(measure, []).append(rate)
    for gate in (*gates.values(), *unmetered_gates.values()):
        gate.close()
    if quota is not None:
        quota.close()
    store.close()
    return out


def _cycling(
    bound: Callable[..., Any],
    who: Any,
    inputs: list[bytes],
    today: int,
    now: int,
    after: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One gate call per call, on `inputs` in turn (then `after`, if any)."""
    state = [0]
    n = len(inputs)

    def call() -> None:
        i = state[0]
        bound(who, inputs[i], today, now)
        state[0] = i + 1 if i + 1 < n else 0
        if after is not None:
            after()

    return call


def _blocks(
    calls: dict[str, Callable[[], None]], seconds: float, block_seconds: float = 0.02
) -> dict[str, Any]:
    """Two ways of doing the same work (`on` and `off`), alternated in short blocks for about
    `seconds`, each block timed by this thread's CPU clock: host noise (steal, the other core's
    load, frequency drift) hits both sides alike, and time the thread is not running is not
    counted. Each call does one unit of work; returns units/s of each and the median of the
    per-pair ratios on/off."""
    off = calls["off"]
    # Calibrate: calls per block from a short trial of the `off` side.
    t0 = time.thread_time_ns()
    n = 0
    while time.thread_time_ns() - t0 < 5_000_000:
        off()
        n += 1
    per_block = max(1, int(n * block_seconds / 0.005))
    times: dict[str, list[int]] = {"on": [], "off": []}
    deadline = time.perf_counter() + seconds
    pair = 0
    while time.perf_counter() < deadline or pair < 4:
        order = ("on", "off") if pair % 2 == 0 else ("off", "on")
        for side in order:
            call = calls[side]
            t = time.thread_time_ns()
            for _ in range(per_block):
                call()
            times[side].append(time.thread_time_ns() - t)
        pair += 1
    ratios = sorted(b / a for a, b in zip(times["on"], times["off"], strict=True))
    return {
        "on_per_s": per_block * len(times["on"]) / (sum(times["on"]) / 1e9),
        "off_per_s": per_block * len(times["off"]) / (sum(times["off"]) / 1e9),
        "ratio": ratios[len(ratios) // 2],
        "pairs": len(ratios),
        "calls_per_block": per_block,
    }


def pairs(
    ds: bench_dataset.Dataset, seconds: float, rounds: int, config_path: str | None = None
) -> dict[str, Any]:
    """On/off pairs of the Cython gate, in process: quotas (a quota slot against none) and tracing
    (spans recorded, taken and wrapped into OTLP export requests, against none), for unary calls
    and batches of 100. The gRPC side of both pairs is bench.variants' covergate-noquota and
    covergate-tracing."""
    import dataclasses

    from fastpath import _gate_c
    from service import telemetry

    store, keys, quota, served_as = _server_parts(ds, config_path)
    if quota is None or served_as is None:
        return {}
    today = int(ds.care_date)
    now = int(time.time())
    covered = ds.pools[COVERED]
    singles = [frames.request_bytes(s, f"r{i:08d}") for i, s in enumerate(covered)]
    batches = frames.whole_batches(covered)
    plain = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500, quota=quota)
    # Quotas off: a gate without the quota file (one with it refuses a caller without a slot).
    free = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500)
    traced = _gate_c.Gate(
        store.env, store.rights_db, keys, max_batch_items=500, quota=quota, trace=True
    )
    resource = telemetry.encode_resource({"service.name": "covergate-bench"})
    scope = telemetry.encode_scope("covergate", "bench")
    unmetered = dataclasses.replace(served_as, slot=-1)
    exported = [0]

    def flush() -> None:
        if traced.span_bytes >= telemetry.CHUNK_BYTES:
            # What the worker's flush and exporter thread do with them, short of the send.
            for request, _count in traced.take_export_requests(
                resource, scope, telemetry.CHUNK_BYTES
            ):
                exported[0] += len(request)

    def caller(
        gate: Any, method: str, inputs: list[bytes], who: Practitioner
    ) -> Callable[[], None]:
        after = flush if gate is traced else None
        return _cycling(getattr(gate, method), who, inputs, today, now, after)

    def answers_right(gate: Any, who: Practitioner) -> None:
        """Every side must answer correctly, or its speed means nothing (a side refused by a
        quota would be measuring refusals)."""
        code, payload = gate.check(who, singles[0], today, now)
        problem = frames.check_unary(covered[0], code, payload, decisions=True)
        code, payload = gate.check_batch(who, batches[0], today, now)
        problems = frames.check_batch(covered[:100], code, payload, decisions=True)
        if problem or problems:
            raise RuntimeError(f"in-process pair: {problem or problems[0]}")

    out: dict[str, Any] = {"quotas": {}, "tracing": {}}
    shapes = {"unary": ("check", singles, 1), "batch-100": ("check_batch", batches, 100)}
    sides = ((plain, served_as), (free, unmetered), (traced, served_as))
    for gate, who in sides:
        answers_right(gate, who)
    for _ in range(rounds):
        for shape, (method, inputs, items) in shapes.items():
            quotas = _blocks(
                {
                    "on": caller(plain, method, inputs, served_as),
                    "off": caller(free, method, inputs, unmetered),
                },
                seconds,
            )
            tracing = _blocks(
                {
                    "on": caller(traced, method, inputs, served_as),
                    "off": caller(plain, method, inputs, served_as),
                },
                seconds,
            )
            for name, result in (("quotas", quotas), ("tracing", tracing)):
                result["on_per_s"] *= items  # items (lookups) per second
                result["off_per_s"] *= items
                out[name].setdefault(shape, []).append(result)
    for gate, who in sides:  # still answering right after all the rounds
        answers_right(gate, who)
    for gate in (plain, free, traced):
        gate.close()
    quota.close()
    store.close()
    return out


def baseline_pairs(
    ds: bench_dataset.Dataset, seconds: float, rounds: int, config_path: str | None = None
) -> dict[str, Any]:
    """Per-practitioner baselines on against off (fastpath.baselines), in process, Cython gate,
    quotas on both sides, for unary calls and batches of 100. The practitioner's record is
    learned (every lookup computes every signal) and held below every signal's threshold, so
    both sides answer alike and nothing is suspended. The record lives in a scratch file."""
    from fastpath import _gate_c
    from fastpath.baselines import BaselineFile

    store, keys, quota, served_as = _server_parts(ds, config_path)
    if quota is None or served_as is None or served_as.baseline is None:
        return {}
    today = int(ds.care_date)
    now = int(time.time())
    covered = ds.pools[COVERED]
    singles = [frames.request_bytes(s, f"r{i:08d}") for i, s in enumerate(covered)]
    batches = frames.whole_batches(covered)
    scratch = tempfile.TemporaryDirectory(prefix="covergate-baselines-")
    base = BaselineFile(Path(scratch.name) / "baseline", quota.slots)
    record = base.read(served_as.slot)
    record.day, record.days_active = today, 1000
    record.mean_lookups = record.mean_new = 10**7 * 256  # far above what the bench sends
    record.mean_share = 100 * 256  # its usual share of new people: all of them
    record.square_lookups = record.square_new = 10**14 * 256
    record.hours = [1000] * 24
    record.hours_total = 24_000
    record.pack_into(base.map, base.offset(served_as.slot))
    on = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500, quota=quota,
                      baseline=base)  # fmt: skip
    off = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500, quota=quota)

    def caller(gate: Any, method: str, inputs: list[bytes]) -> Callable[[], None]:
        return _cycling(getattr(gate, method), served_as, inputs, today, now)

    out: dict[str, Any] = {}
    shapes = {"unary": ("check", singles, 1), "batch-100": ("check_batch", batches, 100)}
    for _ in range(rounds):
        for shape, (method, inputs, items) in shapes.items():
            result = _blocks(
                {"on": caller(on, method, inputs), "off": caller(off, method, inputs)}, seconds
            )
            result["on_per_s"] *= items
            result["off_per_s"] *= items
            out.setdefault(shape, []).append(result)
    code, payload = on.check(served_as, singles[0], today, now)
    problem = frames.check_unary(covered[0], code, payload, decisions=True)
    if (
        problem
        or on.suspensions
        or any(on.anomaly_counts())
        or not base.read(served_as.slot).lookups
    ):
        raise RuntimeError(f"baseline pair: {problem or 'a signal was raised'}")
    for gate in (on, off):
        gate.close()
    base.close()
    scratch.cleanup()
    quota.close()
    store.close()
    return out


def baseline_pairs_table(result: dict[str, Any]) -> str:
    lines = ["| baselines | shape | on lookups/s | off lookups/s | on/off (median of rounds) |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for shape, rounds in result.items():
        ratios = sorted(r["ratio"] for r in rounds)
        lines.append(
            f"| on/off | {shape} | {sum(r['on_per_s'] for r in rounds) / len(rounds):,.0f} | "
            f"{sum(r['off_per_s'] for r in rounds) / len(rounds):,.0f} | "
            f"{ratios[len(ratios) // 2]:.3f}x |"
        )
    return "\n".join(lines)


def _interleaved(
    calls: dict[str, Callable[[], None]], seconds: float, block_seconds: float = 0.02
) -> dict[str, float]:
    """Nanoseconds per call of each of `calls`, timed in short blocks taken in turn (rotating the
    order) for about `seconds` in all, each block by this thread's CPU clock: host noise hits
    every side alike. The median block of each."""
    per_block = {}
    for name, call in calls.items():
        t0 = time.thread_time_ns()
        n = 0
        while time.thread_time_ns() - t0 < 5_000_000:
            call()
            n += 1
        per_block[name] = max(1, int(n * block_seconds / 0.005))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    deadline = time.perf_counter() + seconds
    turn = 0
    while time.perf_counter() < deadline or turn < 3:
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            call, n = calls[name], per_block[name]
            t = time.thread_time_ns()
            for _ in range(n):
                call()
            samples[name].append((time.thread_time_ns() - t) / n)
        turn += 1
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


# The ladder of stages: batches of 100 items of one shape each, every shape going one stage
# further into a decision than the one before it (quotas on as served, tracing off unless said).
# name -> (what the items are, what each adds to the one before)
STAGE_LADDER = {
    "invalid": ("a mistyped NIR key", "parse, validate, rate, guard, refusal"),
    "domain_refused": ("a care domain outside the profession", "(valid) identity, scope"),
    "amc_refused": ("an insurer the practitioner has no agreement with", "the AMC list"),
    "no_match": ("nobody in the store", "key, daily + distinct, LMDB miss, answer"),
    "not_covered": ("a beneficiary without open rights", "LMDB hit, member hash, rights"),
    "covered": ("a covered beneficiary", "attestation, COVERED fields"),
    "covered_traced": ("covered, tracing on", "pseudonym, span"),
    "covered_no_quota": ("covered, gate without quotas", "(quota file off)"),
}


def stages(
    ds: bench_dataset.Dataset, seconds: float, config_path: str | None = None
) -> dict[str, Any]:
    """The per-item cost of each stage of a decision in the C gate: the STAGE_LADDER, each
    shape's batch-100 cost per item and its step from the shape before; the keyed hashes alone
    (fastpath._hashes_for_tests, timed in C as the gate calls them) and one LMDB get (from
    Python, as the gate calls it); and from those, an estimate per stage."""
    import dataclasses

    from bench.frames import INVALID, NO_MATCH, NOT_COVERED
    from covergate.v1 import covergate_pb2 as pb
    from fastpath import _gate_c, rules

    hashes = importlib.import_module("fastpath._hashes_for_tests")
    store, keys, quota, served_as = _server_parts(ds, config_path)
    if quota is None or served_as is None:
        raise RuntimeError("the stage ladder needs a data dir with quotas")
    today = int(ds.care_date)
    now = int(time.time())
    covered = ds.pools[COVERED]
    other_domain = next(d for d in range(1, rules.MAX_DOMAIN + 1) if not served_as.domains >> d & 1)
    agreed = served_as.amc_numbers or frozenset()
    unknown_amc = next(str(a) for a in range(999999999, 0, -1) if str(a) not in agreed)
    shapes = {
        "invalid": ds.pools[INVALID],
        "domain_refused": [dataclasses.replace(s, domain=other_domain) for s in covered],
        "amc_refused": [dataclasses.replace(s, amc_number=unknown_amc) for s in covered],
        "no_match": ds.pools[NO_MATCH],
        "not_covered": ds.pools[NOT_COVERED],
        "covered": covered,
    }
    # What every item of each shape must be answered: a decision, or a refusal's code.
    expected = {
        "invalid": ("error", rules.INVALID_ARGUMENT),
        "domain_refused": ("error", rules.PERMISSION_DENIED),
        "amc_refused": ("error", rules.PERMISSION_DENIED),
        "no_match": ("decision", rules.DECISION_NO_MATCH),
        "not_covered": ("decision", rules.DECISION_NOT_COVERED),
        "covered": ("decision", rules.DECISION_COVERED),
    }
    batches = {
        name: [frames.batch_bytes(specs[i : i + 100]) for i in range(0, len(specs) - 99, 100)]
        for name, specs in shapes.items()
    }
    metered = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500, quota=quota)
    traced = _gate_c.Gate(
        store.env, store.rights_db, keys, max_batch_items=500, quota=quota, trace=True
    )
    free = _gate_c.Gate(store.env, store.rights_db, keys, max_batch_items=500)
    ladder = {name: (metered, name) for name in shapes}
    ladder["covered_traced"] = (traced, "covered")
    ladder["covered_no_quota"] = (free, "covered")

    def answers_right(name: str) -> None:
        gate, shape = ladder[name]
        code, payload = gate.check_batch(served_as, batches[shape][0], today, now)
        items = pb.CheckCoverageBatchResponse.FromString(payload).items if code == 0 else []
        field, want = expected[shape]
        got = {item.error.code if field == "error" else item.decision for item in items}
        if len(items) != 100 or got != {want}:
            raise RuntimeError(f"stage ladder, {name}: answered {code} {sorted(got)}")

    def drop_spans() -> None:
        if traced.span_bytes >= 4 << 20:
            traced.take_spans()

    def caller(name: str) -> Callable[[], None]:
        gate, shape = ladder[name]
        after = drop_spans if gate is traced else None
        return _cycling(gate.check_batch, served_as, batches[shape], today, now, after)

    for name in ladder:
        answers_right(name)
    timed = _interleaved({name: caller(name) for name in ladder}, seconds * len(ladder))
    per_item = {name: ns / 100 for name, ns in timed.items()}
    for name in ladder:  # still answering right after all the rounds
        answers_right(name)

    # The keyed hashes alone, on the inputs a covered lookup gives them.
    spec = covered[0]
    identity = rules.identity_bytes(rules.normalise_nir(spec.nir), spec.birth_date, spec.birth_rank)
    storage_key = keys.storage_key(identity)
    payload = (
        bytes([rules.ATTESTATION_VERSION])
        + (now + 7 * 86400).to_bytes(4, "big")
        + bytes([spec.domain])
        + int(spec.care_date).to_bytes(4, "big")
        + bytes([len(spec.amc_number)])
        + spec.amc_number.encode()
        + bytes([len(served_as.practitioner_id)])
        + served_as.practitioner_id.encode()
        + keys.beneficiary_tag(identity)
    )
    n = 200_000
    primitives = {
        "storage key (BLAKE2b-128, pre-keyed)": hashes.time_blake2b(
            identity, rules.STORAGE_KEY_SIZE, keys.pepper, b"", rules.PERSON_STORE, True, n
        ),
        "member hash (BLAKE2b-128, salted: keyed each time)": hashes.time_blake2b(
            spec.member_number.encode(),
            rules.MEMBER_HASH_SIZE,
            keys.pepper,
            storage_key,
            rules.PERSON_MEMBER,
            False,
            n,
        ),
        "beneficiary tag (BLAKE2b-64, pre-keyed)": hashes.time_blake2b(
            identity, rules.BENEFICIARY_TAG_SIZE, keys.pepper, b"", rules.PERSON_ATTEST, True, n
        ),
        "attestation MAC (HMAC-SHA256)": hashes.time_hmac_sha256(keys.attestation_key, payload, n),
        "pseudonym (SipHash-2-4)": hashes.time_siphash24(keys.pseudonym_key, storage_key, n),
    }
    # One LMDB get from Python (the gate calls txn.get the same way), hits and misses.
    hits = [keys.storage_key(_identity(s)) for s in covered]
    misses = [keys.storage_key(_identity(s)) for s in ds.pools[NO_MATCH]]
    with store.env.begin(db=store.rights_db, buffers=False) as txn:
        get = txn.get

        def reads(batch: list[bytes]) -> Callable[[], None]:
            state = [0]
            count = len(batch)

            def one() -> None:
                i = state[0]
                get(batch[i])
                state[0] = i + 1 if i + 1 < count else 0

            return one

        for key in hits[:3]:
            if get(key) is None:
                raise RuntimeError("stage ladder: a covered beneficiary is not in the store")
        gets = _interleaved({"hit": reads(hits), "miss": reads(misses)}, 2 * seconds)
    primitives["LMDB get, hit (from Python)"] = gets["hit"]
    primitives["LMDB get, miss (from Python)"] = gets["miss"]

    # Each step of the ladder, less what was timed alone, leaves the work around it. These rows
    # add up to a covered item; quota and span are other cuts of the same work.
    p, h = per_item, primitives
    key = h["storage key (BLAKE2b-128, pre-keyed)"]
    member = h["member hash (BLAKE2b-128, salted: keyed each time)"]
    tag_and_mac = h["beneficiary tag (BLAKE2b-64, pre-keyed)"] + h["attestation MAC (HMAC-SHA256)"]
    hit_less_miss = gets["hit"] - gets["miss"]
    estimates = [
        ("parse", "parse, validate, rate + guard, refusal", p["domain_refused"]),
        ("parse", "scope: the AMC list", p["amc_refused"] - p["domain_refused"]),
        ("key", "storage key (BLAKE2b)", key),
        ("read", "LMDB get, miss", gets["miss"]),
        ("quota+encode", "rest of no_match's step: daily + distinct, key bytes, answer",
         p["no_match"] - p["amc_refused"] - key - gets["miss"]),
        ("read", "LMDB get, hit less miss", hit_less_miss),
        ("rights", "member hash (BLAKE2b, salted)", member),
        ("rights", "rest of not_covered's step: record soundness, matching",
         p["not_covered"] - p["no_match"] - hit_less_miss - member),
        ("attestation", "beneficiary tag + HMAC-SHA256", tag_and_mac),
        ("encode", "rest of covered's step: Python values, base64, COVERED fields",
         p["covered"] - p["not_covered"] - tag_and_mac),
    ]  # fmt: skip
    across = [
        ("quota", "covered with the quota file, less without (in the rows above)",
         p["covered"] - p["covered_no_quota"]),
        ("span", "covered traced, less untraced: pseudonym, span, buffer (extra)",
         p["covered_traced"] - p["covered"]),
    ]  # fmt: skip
    for gate in (metered, traced, free):
        gate.close()
    quota.close()
    store.close()
    return {
        "per_item_ns": per_item,
        "primitives_ns": primitives,
        "estimates_ns": [{"stage": stage, "what": what, "ns": ns} for stage, what, ns in estimates],
        "across_ns": [{"stage": stage, "what": what, "ns": ns} for stage, what, ns in across],
    }


def _identity(spec: Any) -> bytes:
    from fastpath import rules

    return rules.identity_bytes(rules.normalise_nir(spec.nir), spec.birth_date, spec.birth_rank)


def stages_table(result: dict[str, Any]) -> str:
    """The stage breakdown as text tables."""
    lines = [
        "C gate, batch-100, quotas on: cost per item of each shape, one stage further each",
        "",
    ]
    lines.append(f"{'items':<20} {'ns/item':>8} {'step':>8}  what the step adds")
    before = None
    for name, (_what, adds) in STAGE_LADDER.items():
        ns = result["per_item_ns"][name]
        if name == "covered_no_quota":
            step = ns - result["per_item_ns"]["covered"]
        else:
            step = ns - before if before is not None else ns
            if name != "covered_traced":
                before = ns
        lines.append(f"{name:<20} {ns:>8.0f} {step:>+8.0f}  {adds}")
    lines += ["", f"{'alone':<52} {'ns':>8}"]
    for name, ns in result["primitives_ns"].items():
        lines.append(f"{name:<52} {ns:>8.0f}")
    lines += ["", "Where a covered item's time goes (ladder steps less what was timed alone)", ""]
    lines.append(f"{'stage':<13} {'ns/item':>8}  {'what'}")
    for row in result["estimates_ns"]:
        lines.append(f"{row['stage']:<13} {row['ns']:>8.0f}  {row['what']}")
    total = sum(row["ns"] for row in result["estimates_ns"])
    lines.append(f"{'= covered':<13} {total:>8.0f}")
    for row in result["across_ns"]:
        lines.append(f"{row['stage']:<13} {row['ns']:>8.0f}  {row['what']}")
    return "\n".join(lines)


def import_rate(ds: bench_dataset.Dataset, covergate: str) -> dict[str, Any]:
    """`covergate import rights` of the cached sample file into a fresh temporary store."""
    with tempfile.TemporaryDirectory(prefix="covergate-bench-import-") as tmp:
        done = subprocess.run(
            [
                covergate,
                "import",
                "rights",
                str(ds.import_sample_csv),
                "--data",
                tmp,
                "--no-progress",
            ],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        raise RuntimeError(f"import failed:\n{done.stderr[-2000:]}")
    m = re.search(r"imported ([\d,]+) rights rows .* in ([\d.]+)s \(([\d,]+) rows/s\)", done.stdout)
    if not m:
        raise RuntimeError(f"unexpected import output: {done.stdout!r}")
    return {
        "rows": int(m.group(1).replace(",", "")),
        "seconds": float(m.group(2)),
        "rows_per_s": float(m.group(3).replace(",", "")),
    }


# Requests crafted to make a gate work hard per byte (issue 9): framing that defeats the strict
# scan, unknown fields, and far too many items. {name: (method, bytes)}
HOSTILE = {
    "batch 0a00x400000+7800": ("check_batch", b"\x0a\x00" * 400_000 + b"\x78\x00"),
    "batch 0a022801x100000+7800": ("check_batch", b"\x0a\x02\x28\x01" * 100_000 + b"\x78\x00"),
    "batch 7800+0a00x400000": ("check_batch", b"\x78\x00" + b"\x0a\x00" * 400_000),
    "batch 500 items with an unknown field": ("check_batch", b"\x0a\x04\x28\x01\x78\x00" * 500),
    "batch 500 items, non-ASCII": (
        "check_batch",
        (b"\x0a\x0f\x12\x0d" + "é".encode() * 6 + b"x") * 500,
    ),
    "batch group first": ("check_batch", b"\x0b" + b"\x0a\x00" * 2000 + b"\x0c"),
    "unary 900 KB unknown field": ("check", b"\x7a\x80\xf7\x36" + b"a" * 900_000),
    "unary 0a00x400000": ("check", b"\x0a\x00" * 400_000),
}


def hostile(store: Any, keys: Keys, rounds: int) -> dict[str, Any]:
    """Microseconds per call and nanoseconds per byte for each HOSTILE input, C gate against the
    reference, quotas and tracing on (a scratch quota file: the rate and guard in shadow mode so
    that every call takes the same path)."""
    from fastpath.quota import SHADOW_RULES, QuotaFile, QuotaProfile

    shadow = 0
    for bit in SHADOW_RULES.values():
        shadow |= bit
    profile = QuotaProfile(rate_per_minute=10**6, burst=10**6, shadow=shadow)
    who = Practitioner(practitioner_id="10000000001", profession="pharmacist", slot=0,
                       amc_numbers=frozenset({"123456789"}), quota=profile)  # fmt: skip
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        quota = QuotaFile(Path(tmp) / "state", 64)
        gates = {
            name: importlib.import_module(module).Gate(
                store.env, store.rights_db, keys, quota=quota, trace=True, trace_seed=1
            )
            for name, module in IMPLEMENTATIONS.items()
        }
        try:
            for label, (method, data) in HOSTILE.items():
                row: dict[str, Any] = {"bytes": len(data)}
                results = []
                for name, gate in gates.items():
                    call = getattr(gate, method)
                    best = float("inf")
                    for _ in range(rounds):
                        started = time.perf_counter()
                        result = call(who, data, 20250615, 1750000000.0)
                        best = min(best, time.perf_counter() - started)
                        gate.take_spans()
                    results.append(result)
                    row[f"{name}_us"] = best * 1e6
                    row[f"{name}_ns_per_byte"] = best * 1e9 / len(data)
                row["same_answer"] = results[0] == results[1]
                row["c_over_python"] = row["cython_us"] / row["python_us"]
                out[label] = row
        finally:
            for gate in gates.values():
                gate.close()
            quota.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help="a bench dataset cache dir")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measure and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--covergate", default=str(Path(sys.executable).with_name("covergate")))
    parser.add_argument("--data", help="data dir to read (default: the dataset's own)")
    parser.add_argument("--config", help="covergate TOML config (quota limits) the servers use")
    parser.add_argument("--no-import", action="store_true")
    parser.add_argument(
        "--hostile-only", action="store_true", help="only the per-byte cost of crafted requests"
    )
    parser.add_argument(
        "--stages-only",
        action="store_true",
        help="only the per-item cost of each stage of a C-gate decision (table on stderr)",
    )
    parser.add_argument(
        "--baselines-only", action="store_true",
        help="only per-practitioner baselines on against off (table on stderr)",
    )  # fmt: skip
    args = parser.parse_args()
    ds = bench_dataset.load(Path(args.dataset))
    if ds is None:
        parser.error(f"no dataset in {args.dataset}")
    if args.data:
        ds.data_dir = Path(args.data)
    if args.baselines_only:
        paired = baseline_pairs(ds, args.seconds, args.rounds, args.config)
        print(baseline_pairs_table(paired), file=sys.stderr)
        json.dump({"baseline_pairs": paired}, sys.stdout, indent=1)
        return 0
    if args.stages_only:
        staged = stages(ds, args.seconds, args.config)
        print(stages_table(staged), file=sys.stderr)
        json.dump({"stages": staged}, sys.stdout, indent=1)
        return 0
    if args.hostile_only:
        store, keys, _, _ = _server_parts(ds, args.config)
        json.dump({"hostile": hostile(store, keys, max(args.rounds, 5))}, sys.stdout, indent=1)
        return 0
    result: dict[str, Any] = {
        "cpus": sorted(os.sched_getaffinity(0)),
        "decisions": decisions(ds, args.seconds, args.rounds, args.config),
        "pairs": pairs(ds, args.seconds, args.rounds, args.config),
    }
    store, keys, _, _ = _server_parts(ds, args.config)
    result["hostile"] = hostile(store, keys, max(args.rounds, 5))
    if not args.no_import:
        result["import"] = import_rate(ds, args.covergate)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m fuzz` (PYTHONPATH=tests): the differential fuzzer, on atheris or hypothesis.

    python -m fuzz --seconds 60 [libFuzzer flags] [corpus dirs or input files]
    python -m fuzz --engine hypothesis --seconds 60
    python -m fuzz --gate-c build/asan/fastpath/_gate_c.so ...   # the ASan build (make fuzz-asan)
    python -m fuzz --explain crash-0123...                       # what a saved input does

Without corpus arguments, atheris reads build/fuzz/corpus (where it writes what it finds) and the
seed corpus tests/fuzz/corpus (never written).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

# fastpath, and the fuzz modules that import it, are imported inside functions: atheris must
# instrument fastpath (load_gates, under instrument_imports) before anything imports it.

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "fuzz"
SEED_CORPUS = Path(__file__).resolve().parent / "corpus"


def load_gates(gate_c: str | None) -> tuple[ModuleType, ModuleType]:
    """The C gate (the in-place build, or the extension file `gate_c`) and the reference."""
    if gate_c:
        # The package must not load the in-place build first: bind it to the reference, then
        # put the given build where `fastpath._gate_c` is looked up.
        required = os.environ.pop("COVERGATE_REQUIRE_EXTENSIONS", None)
        os.environ["COVERGATE_NO_EXTENSIONS"] = "1"
        import fastpath  # noqa: F401

        del os.environ["COVERGATE_NO_EXTENSIONS"]
        if required is not None:
            os.environ["COVERGATE_REQUIRE_EXTENSIONS"] = required
        spec = importlib.util.spec_from_file_location("fastpath._gate_c", gate_c)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastpath._gate_c"] = module
        spec.loader.exec_module(module)
    from fastpath import _gate_c, _gate_py

    if gate_c and Path(_gate_c.__file__ or "").resolve() != Path(gate_c).resolve():
        raise SystemExit(f"fastpath._gate_c is {_gate_c.__file__}, not {gate_c}")
    return _gate_c, _gate_py


class Session:
    """The checker over a rights store of its own, with counts of what it ran and found."""

    def __init__(
        self, gates: tuple[ModuleType, ModuleType], *, stop_on_known: bool, seconds: int = 0
    ) -> None:
        from conftest import KNOWN_IDENTITIES, TEST_PEPPER, open_rights_store, rights_records

        from fastpath.rules import Keys
        from fuzz.differential import Checker

        self._tmp = tempfile.TemporaryDirectory(prefix="covergate-fuzz-")
        keys = Keys(TEST_PEPPER)
        self.store = open_rights_store(
            Path(self._tmp.name) / "rights", keys, rights_records(keys, KNOWN_IDENTITIES)
        )
        self.checker = Checker(self.store, gates, garbage_metered=True)
        self.stop_on_known = stop_on_known
        self.known: Counter[str] = Counter()
        self.started = time.monotonic()
        self.last_report = self.started
        # libFuzzer ends the process with exit(): past the deadline, every case may be the last.
        self.deadline = self.started + seconds - 0.5 if seconds else float("inf")
        self.final_printed = False

    def run(self, data: bytes) -> None:
        from fuzz.cases import Case
        from fuzz.differential import Divergence

        case = Case.decode(data)
        try:
            self.checker.check(case)
        except Divergence as divergence:
            issue = self.checker.known_issue(case, divergence)
            if issue is None or self.stop_on_known:
                print(f"\nDIVERGENCE {divergence}\n{case.describe()}", file=sys.stderr)
                raise
            self.known[issue] += 1
            if self.known[issue] <= 3:
                folder = OUT / "known" / issue
                folder.mkdir(parents=True, exist_ok=True)
                (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)
        now = time.monotonic()
        if now >= self.deadline:
            # The last report may be any of these: keep the file current, print once.
            if now - self.last_report > 0.2:
                self.report(quiet=self.final_printed)
                self.final_printed = True
        elif now - self.last_report > 10:
            self.report()

    def report(self, quiet: bool = False) -> None:
        self.last_report = time.monotonic()
        stats = {
            "seconds": round(self.last_report - self.started, 1),
            "cases": self.checker.cases,
            "calls": self.checker.calls,
            "known_issues": dict(self.known),
        }
        if not quiet:
            print(f"#fuzz {json.dumps(stats)}", file=sys.stderr, flush=True)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Mostly structure-aware: the request mutated as protobuf, or the case's settings and quota
    slot redrawn; sometimes libFuzzer's own byte mutation of the encoded case."""
    import atheris

    from fuzz import wire
    from fuzz.cases import Case, random_case, random_request

    rng = random.Random(seed)
    ch = wire.RandomChoices(rng)
    roll = rng.randrange(10)
    if roll < 2:
        return bytes(atheris.Mutate(data, max_size))
    case = Case.decode(data)
    if roll == 2:
        case = random_case(ch)
    elif roll == 3:
        case = random_case(ch, request=case.request)  # same bytes, other caller, clock, slot
    elif roll == 4 or not case.request:
        case = random_case(ch, request=random_request(ch, case))
    else:
        case = replace(case, request=wire.mutate(case.request, ch, batch=case.is_batch))
    return case.encode()[:max_size]


def run_atheris(session: Session, seconds: int, passthrough: list[str]) -> None:
    import atheris

    flags = [a for a in passthrough if a.startswith("-")]
    paths = [a for a in passthrough if not a.startswith("-")]
    (OUT / "corpus").mkdir(parents=True, exist_ok=True)
    if not paths:
        paths = [str(OUT / "corpus"), str(SEED_CORPUS)]
    defaults = {"-max_total_time": str(seconds), "-max_len": "20000", "-timeout": "30",
                "-rss_limit_mb": "4096", "-print_final_stats": "1",
                "-artifact_prefix": f"{OUT}/"}  # fmt: skip
    for flag, value in defaults.items():
        if not any(f.startswith(flag + "=") for f in flags):
            flags.append(f"{flag}={value}")
    argv = [sys.argv[0], *flags, *paths]
    print(f"#fuzz atheris {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    atheris.Setup(argv, session.run, custom_mutator=custom_mutator)
    atheris.Fuzz()


def run_hypothesis(session: Session, seconds: int) -> None:
    """The same property, hypothesis generating the cases (no atheris needed), until `seconds`."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.database import DirectoryBasedExampleDatabase

    from fuzz.cases import random_case
    from fuzz.wire import HypothesisChoices

    deadline = time.monotonic() + seconds

    @settings(
        max_examples=100,  # a round: the deadline is checked between rounds
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(OUT / "hypothesis")),
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def property_(data: Any) -> None:
        case = random_case(HypothesisChoices(data))
        try:
            session.run(case.encode())
        except Exception:
            (OUT / f"crash-{hashlib.sha1(case.encode()).hexdigest()}").write_bytes(case.encode())
            raise

    OUT.mkdir(parents=True, exist_ok=True)
    while time.monotonic() < deadline:
        property_()
    session.report()


def explain(session: Session, paths: list[str]) -> int:
    from fuzz.cases import Case
    from fuzz.differential import Divergence

    failed = 0
    for path in paths:
        case = Case.decode(Path(path).read_bytes())
        print(f"== {path}\n{case.describe()}")
        try:
            session.checker.check(case)
        except Divergence as divergence:
            failed += 1
            issue = session.checker.known_issue(case, divergence)
            print(f"-> {divergence}\n-> known issue: {issue}")
        else:
            print("-> both gates agree, the oracle is satisfied")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], default="atheris")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--gate-c", help="the C gate extension to load (e.g. an ASan build)")
    parser.add_argument(
        "--stop-on-known",
        action="store_true",
        help="stop at a known issue too (see fuzz.differential.KNOWN_ISSUES)",
    )
    parser.add_argument("--explain", nargs="+", metavar="FILE", help="run saved inputs, verbosely")
    args, passthrough = parser.parse_known_args()  # fmt: skip
    if args.engine == "atheris" and not args.explain:
        import atheris

        with atheris.instrument_imports(include=["fastpath"]):
            gates = load_gates(args.gate_c)
    else:
        gates = load_gates(args.gate_c)
    print(f"#fuzz C gate {gates[0].__file__}", file=sys.stderr)
    session = Session(
        gates,
        stop_on_known=args.stop_on_known,
        seconds=args.seconds if args.engine == "atheris" else 0,
    )
    if args.explain:
        return explain(session, args.explain)
    if args.engine == "hypothesis":
        run_hypothesis(session, args.seconds)
    else:
        run_atheris(session, args.seconds, passthrough)
    return 0


if __name__ == "__main__":
    sys.exit(main())

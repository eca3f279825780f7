"""Make docs/harvest.png from a real attack: a real covergate server exporting to a real OTLP/gRPC
receiver, honest pharmacists at work, then a list walker and a guesser on stolen credentials.

The picture is drawn only from the exported spans (what a tracing backend would hold):
    .venv/bin/python docs/make_harvest_plot.py [--seconds 30] [--out docs/harvest.png]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import grpc  # noqa: E402
from harness import (  # noqa: E402
    OTHER_AMC,
    PHARMACY_AMC,
    PractitionerRow,
    RunningServer,
    build_dataset,
    cli,
    create_token,
    make_identity,
    write_practitioners_csv,
)

from bench.otlp_receiver import OtlpReceiver  # noqa: E402
from covergate.v1 import covergate_pb2 as pb  # noqa: E402
from covergate.v1 import covergate_pb2_grpc as pb_grpc  # noqa: E402

HONEST = ["10000000011", "10000000022", "10000000033", "10000000044"]
WALKER = "10000000055"  # stolen credentials, walks a leaked list of real people
GUESSER = "10000000066"  # stolen credentials, guesses identities


def _attrs(span):
    out = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


def run_attack(seconds: float, tmp: Path) -> list:
    ds = build_dataset(tmp, extra_beneficiaries=400)
    ids = [*HONEST, WALKER, GUESSER]
    write_practitioners_csv(
        tmp / "more.csv",
        [PractitionerRow(pid, "pharmacist", (PHARMACY_AMC, OTHER_AMC)) for pid in ids],
    )
    cli("import", "practitioners", str(tmp / "more.csv"), data_dir=ds.data_dir)
    for pid in ids:
        cli("practitioner", "quota", pid, "--set", "rate_per_minute=100000", "--set",
            "burst=100000", "--set", "distinct_limit=120", data_dir=ds.data_dir)  # fmt: skip
    tokens = {pid: create_token(ds.data_dir, pid) for pid in ids}
    people = [r for r in ds.rights if r.domain == "PHAR"]

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
        with RunningServer(ds.data_dir, env=env) as server:
            start = time.monotonic()

            def practitioner(pid: str, begin: float, rate: float, pick) -> None:
                metadata = (("authorization", f"Bearer {tokens[pid]}"),)
                with server.channel() as channel:
                    stub = pb_grpc.CoverageServiceStub(channel)
                    time.sleep(begin)
                    while time.monotonic() - start < seconds:
                        right = pick()
                        request = pb.CheckCoverageRequest(
                            **right.identity.fields(),
                            amc_number=right.amc_number,
                            domain=pb.CARE_DOMAIN_PHARMACY,
                        )
                        try:
                            stub.CheckCoverage(request, metadata=metadata, timeout=5)
                        except grpc.RpcError as exc:
                            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                                return  # suspended: the credential is dead
                        time.sleep(1 / rate)

            threads = []
            for n, pid in enumerate(HONEST):
                rng = random.Random(n)
                patients = rng.sample(people, 40)  # a pharmacy sees its regulars again and again
                threads.append(threading.Thread(
                    target=practitioner, args=(pid, 0.0, 4.0, lambda r=rng, p=patients: r.choice(p))
                ))  # fmt: skip
            walk = iter(people * 10)
            threads.append(threading.Thread(
                target=practitioner, args=(WALKER, seconds * 0.2, 25.0, lambda: next(walk))
            ))  # fmt: skip
            guess_rng = random.Random(99)

            def guess():
                from harness import Right

                return Right(make_identity(guess_rng), PHARMACY_AMC, "PHAR")

            threads.append(threading.Thread(
                target=practitioner, args=(GUESSER, seconds * 0.55, 6.0, guess)
            ))  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return receiver.spans()


def plot(spans: list, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookups = [(s, _attrs(s)) for s in spans]
    lookups = [(s, a) for s, a in lookups if "covergate.decision" in a or "covergate.refusal" in a]
    t0 = min(s.start_time_unix_nano for s, _ in lookups)
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    distinct: dict[str, list[tuple[float, int]]] = defaultdict(list)
    fired: dict[str, float] = {}
    for s, a in lookups:
        t = (s.start_time_unix_nano - t0) / 1e9
        pid = a["covergate.practitioner.id"]
        outcome = a.get("covergate.decision") or a["covergate.refusal"]
        per[pid][outcome].append(t)
        if "covergate.distinct_today" in a:
            distinct[pid].append((t, a["covergate.distinct_today"]))
        if a.get("covergate.guard.fired"):
            fired[pid] = t
    end = max(max(v) for d in per.values() for v in d.values())
    colors = {"COVERED": "#2b8a3e", "NOT_COVERED": "#74b816", "NO_MATCH": "#e03131",
              "DISTINCT_LIMIT": "#f08c00", "PRACTITIONER_SUSPENDED": "#5f3dc4"}  # fmt: skip
    pids = sorted(per, key=lambda p: (p in (WALKER, GUESSER), p))
    fig, axes = plt.subplots(
        len(pids) + 1, 1, figsize=(11, 2.0 * len(pids) + 3), sharex=True,
        gridspec_kw={"height_ratios": [1] * len(pids) + [2]},
    )  # fmt: skip
    bins = [i * 1.0 for i in range(int(end) + 2)]
    for ax, pid in zip(axes, pids, strict=False):
        outcomes = sorted(per[pid], key=lambda o: list(colors).index(o) if o in colors else 99)
        ax.hist([per[pid][o] for o in outcomes], bins=bins, stacked=True,
                color=[colors.get(o, "#868e96") for o in outcomes], label=outcomes)  # fmt: skip
        role = {WALKER: " (stolen: list walker)", GUESSER: " (stolen: guesser)"}.get(pid, "")
        ax.set_ylabel("lookups/s", fontsize=8)
        ax.set_title(f"practitioner {pid}{role}", fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right", ncol=len(outcomes))
        if pid in fired:
            ax.axvline(fired[pid], color="#5f3dc4", linestyle="--")
            ax.annotate("covergate.guard.fired: suspended", (fired[pid], ax.get_ylim()[1] * 0.8),
                        fontsize=8, color="#5f3dc4", xytext=(4, 0),
                        textcoords="offset points")  # fmt: skip
    ax = axes[-1]
    for pid in pids:
        points = sorted(distinct[pid])
        ax.step([t for t, _ in points], [d for _, d in points], where="post", label=pid,
                linewidth=2.5 if pid in (WALKER, GUESSER) else 1)  # fmt: skip
    ax.set_ylabel("covergate.distinct_today")
    ax.set_xlabel("seconds (span start times)")
    ax.legend(fontsize=7, ncol=3)
    fig.suptitle(
        "A harvest as the tracing backend sees it: lookups per practitioner by decision, and "
        "distinct beneficiaries (from the exported OTLP spans only)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out} from {len(lookups)} lookup spans")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "harvest.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spans = run_attack(args.seconds, Path(tmp))
    plot(spans, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

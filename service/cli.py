"""The `covergate` command line: demo data, imports, tokens, practitioners, serve, and a one-off
check as a client. Every mistake a person can make here ends in one line and a documented status.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import os
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fastpath.quota import SHADOW_RULES
from fastpath.rules import DOMAIN_CODES
from service.config import (
    DEFAULT_DATA_DIR,
    PEPPER_BYTES,
    QUOTA_FIELDS,
    ConfigError,
    PepperError,
    load_config,
    load_pepper,
)
from service.store import STORE_SUBDIR, StoreError

if TYPE_CHECKING:
    from service.store import PractitionerRecord, Store

# -- exit statuses ---------------------------------------------------------------------------------

EXIT_OK = 0  # done; for `check`: the server answered with a decision, whatever it was
EXIT_FAILED = 1  # could not be done: unknown practitioner, no data dir, config/pepper/store trouble
EXIT_USAGE = 2  # a bad option or value, an unreadable input file, an import with invalid rows
EXIT_UNREACHABLE = 3  # check: the server could not be reached (down, TLS mismatch, certificate)
EXIT_REFUSED = 4  # check: the server refused the check (credential, scope, quota, invalid field)
EXIT_INTERRUPTED = 130

EXIT_STATUS_HELP = """\
exit status:
  0    done; for check: the server answered (COVERED, NOT_COVERED or NO_MATCH, on stdout)
  1    could not be done: unknown practitioner, no data dir, a config, pepper or store problem,
       or the server could not start
  2    usage: a bad option or value, an unreadable input file, an import with invalid rows
  3    check: the server could not be reached (not running, TLS/plaintext mismatch, certificate)
  4    check: the server refused the check (credential, suspension, scope, quota, invalid field)
  130  interrupted (Ctrl-C)"""

DEMO_DATA_DIR = Path(".demo") / "data"  # where `make run` keeps its demo data
DEFAULT_TARGET = "127.0.0.1:50051"


class CliError(Exception):
    """An expected failure: printed as one line `covergate: <message>`, exits with `status`."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


def _say(message: str) -> None:
    """A progress or notice line, on stderr so that stdout stays the command's result."""
    print(f"covergate: {message}", file=sys.stderr, flush=True)


def _share(args: argparse.Namespace, kind: str, practitioner_id: str, **what: Any) -> None:
    """With [cluster]: send an admin change made in this host's store to every host (the admin
    stream in Redis). `kind`: practitioner (what: changes, event, suspended), token (record) or
    revoke (event)."""
    config = load_config(args.config)
    if not config.cluster.enabled:
        return
    from service import cluster

    host = config.cluster.host()
    if kind == "practitioner":
        entry = cluster.practitioner_change(practitioner_id, what["changes"], what["event"], host)
    elif kind == "token":
        entry = cluster.token_change(what["record"], host)
    else:
        entry = cluster.revoke_change(practitioner_id, what["event"], host)
    try:
        cluster.publish(config.cluster, entry, what.get("suspended"))
    except cluster.BackendUnavailable as exc:
        where = cluster.redacted(config.cluster.redis)
        raise CliError(
            f"changed on this host only: the cluster's Redis ({where}) did not answer ({exc}); "
            "run the same command again once it does"
        ) from None
    print(f"shared with every host through {cluster.redacted(config.cluster.redis)}")


def _who(args: argparse.Namespace) -> str:
    """Who makes an admin change, for the history: --by, else the OS user."""
    if getattr(args, "by", None):
        return str(args.by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# -- the data dir ----------------------------------------------------------------------------------


def data_dir(args: argparse.Namespace, *, announce: bool = True) -> Path:
    """--data, else $COVERGATE_DATA, else ./covergate-data; when that does not exist but the
    `make run` demo data (./.demo/data) does, that one, said on stderr."""
    explicit = args.data or os.environ.get("COVERGATE_DATA")
    if explicit:
        return Path(explicit)
    default = Path(DEFAULT_DATA_DIR)
    if not default.exists() and (DEMO_DATA_DIR / STORE_SUBDIR).is_dir():
        if announce:
            _say(
                f"using the `make run` demo data in {DEMO_DATA_DIR} "
                "(--data DIR or COVERGATE_DATA=DIR to choose another)"
            )
        return DEMO_DATA_DIR
    return default


def _has_store(path: Path) -> bool:
    return (path / STORE_SUBDIR / "data.mdb").is_file()


def open_existing_store(args: argparse.Namespace) -> Store:
    """The store of a data dir that must already exist: never creates one."""
    from service.store import Store

    config = load_config(args.config)
    path = data_dir(args)
    if not _has_store(path):
        where = "it does not exist" if not path.exists() else "it holds no covergate store"
        raise CliError(
            f"no covergate data in {path} ({where}): pass --data DIR or set COVERGATE_DATA=DIR "
            "(`make run` prints its export line); `covergate import practitioners FILE` or "
            "`covergate demo` makes one"
        )
    return Store(path, config.store)


def _input_file(name: str) -> Path:
    path = Path(name)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CliError(f"cannot read {name}: it {what}", EXIT_USAGE)
    if not os.access(path, os.R_OK):
        raise CliError(f"cannot read {name}: permission denied", EXIT_USAGE)
    return path


# -- import ----------------------------------------------------------------------------------------


def _write_pepper(path: Path, pepper: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pepper.hex() + "\n")
    _say(
        f"created a new pepper in {path} (mode 0600). In production keep the pepper outside the "
        "data dir (--pepper-file / COVERGATE_PEPPER_FILE): together they reveal nothing, apart "
        "they are useless."
    )


def _pepper_for_import(directory: Path, pepper_file: str | None) -> tuple[bytes, Path | None]:
    """The pepper, and where to save it if it is new: a new one is written only once the file
    proved valid, so that a failed first import leaves nothing behind."""
    explicit = pepper_file or os.environ.get("COVERGATE_PEPPER_FILE")
    if explicit or (directory / "pepper").exists():
        return load_pepper(directory, pepper_file), None
    return secrets.token_bytes(PEPPER_BYTES), directory / "pepper"


def _changes(extra: dict[str, int]) -> str:
    return ", ".join(
        f"{extra.get(name, 0):,} {name}" for name in ("added", "removed", "changed", "unchanged")
    )


def cmd_import(args: argparse.Namespace) -> int:
    from fastpath import Keys
    from service import importer
    from service.store import Store

    directory = data_dir(args)
    path = _input_file(args.file)
    config = load_config(args.config)
    try:
        if args.kind == "rights":
            pepper, new_pepper = _pepper_for_import(directory, args.pepper_file)
            keys = Keys(pepper)
            started = time.perf_counter()
            progress = False if args.no_progress else None
            rights, rows = importer.read_rights_records(path, keys, progress=progress)
            if new_pepper is not None:
                _write_pepper(new_pepper, pepper)
            with Store(directory, config.store) as store:
                report = importer.load_rights(
                    store, keys, rights, rows, path.name, merge=args.merge, started=started
                )
            print(
                f"imported {report.rows:,} rights rows for {report.beneficiaries:,} "
                f"beneficiaries in {report.seconds:.1f}s ({report.rows_per_second:,.0f} rows/s), "
                f"dataset {report.dataset_id}"
            )
            print(f"beneficiaries: {_changes(report.extra)}")
        else:
            started = time.perf_counter()
            records = importer.read_practitioners(path)
            with Store(directory, config.store) as store:
                report = importer.load_practitioners(
                    store, records, path.name, merge=args.merge, by=_who(args), started=started
                )
            print(f"imported {report.rows:,} practitioners in {report.seconds:.2f}s")
            print(f"practitioners: {_changes(report.extra)}")
    except importer.ImportRejected as exc:
        importer.print_rejection(exc)
        return EXIT_USAGE
    return EXIT_OK


# -- tokens ----------------------------------------------------------------------------------------


def cmd_token_create(args: argparse.Namespace) -> int:
    from service.auth import create_token

    with open_existing_store(args) as store:
        try:
            token = create_token(store, args.practitioner_id, args.role)
        except KeyError:
            raise CliError(
                f"no practitioner {args.practitioner_id}; import practitioners first "
                "(covergate import practitioners FILE)"
            ) from None
        record = store.credential(token.split(".")[1])
        assert record is not None
    _share(args, "token", args.practitioner_id, record=record)
    print(f"new {args.role} token for {args.practitioner_id} (shown once, store it now):")
    print(token)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    with open_existing_store(args) as store:
        known = store.practitioner(args.practitioner_id) is not None
        n = store.revoke_credentials(args.practitioner_id)
        event = {"by": _who(args), "action": "tokens revoked", "detail": f"{n} token(s)"}
        if n:
            store.add_history(args.practitioner_id, event)
    # Shared even when this host had none: another host may have some.
    _share(args, "revoke", args.practitioner_id, event=event)
    if n:
        print(f"revoked {n} token(s) of {args.practitioner_id}")
        return EXIT_OK
    if not known:
        raise CliError(
            f"no practitioner {args.practitioner_id} and no token of it: nothing revoked"
        )
    print(f"revoked 0 token(s) of {args.practitioner_id}: it had none")
    return EXIT_OK


# -- practitioners ---------------------------------------------------------------------------------


def _practitioner(store: Store, practitioner_id: str) -> PractitionerRecord:
    rec = store.practitioner(practitioner_id)
    if rec is None:
        raise CliError(
            f"no practitioner {practitioner_id} in {store.data_dir} "
            "(covergate import practitioners FILE adds practitioners)"
        )
    return rec


def _print_practitioner(args: argparse.Namespace, store: Store, rec: PractitionerRecord) -> None:
    from service.clock import ParisClock
    from service.quotas import (
        Usage,
        baseline_lines,
        open_quota_file,
        profile_for,
        quota_path,
        usage,
    )

    config = load_config(args.config)
    profile = profile_for(config, rec.profession, rec.quota)
    print(f"practitioner  {rec.practitioner_id}")
    print(f"profession    {rec.profession}")
    print(f"insurers      {', '.join(rec.amc_numbers)}")
    print(f"domains       {', '.join(config.profession_domains.get(rec.profession, ()))}")
    status = rec.status + (f" ({rec.suspension_reason})" if rec.suspension_reason else "")
    print(f"status        {status}")
    if rec.cert_fingerprints:
        print(f"certificates  {', '.join(rec.cert_fingerprints)}")
    shadow = [name for name, bit in SHADOW_RULES.items() if profile.shadow & bit]
    print(
        f"quota         {profile.rate_per_minute}/min (burst {profile.burst}), "
        f"{profile.daily_limit}/day, {profile.distinct_limit} distinct/day, guard "
        f"{profile.guard_bad_percent}% of last {profile.guard_window} "
        f"(from {profile.guard_min_lookups})"
        + (f", shadow: {', '.join(shadow)}" if shadow else "")
        + (f"  [overrides: {', '.join(sorted(rec.quota))}]" if rec.quota else "")
    )
    used = Usage(0, 0, 0, 0, 0, 0, False)
    directory = store.data_dir
    if rec.slot >= 0 and quota_path(directory).exists():
        quota_file = open_quota_file(directory, config, rec.slot + 1)
        used = usage(quota_file, rec.slot, ParisClock().now()[0])
        quota_file.close()
    print(f"today         {used.daily_count} lookups, {used.distinct_count} distinct beneficiaries")
    print(
        f"guard         {used.window_bad} of the last {used.window_len} lookups were NO_MATCH "
        f"or invalid; fired {used.guard_fired} time(s)"
        + (
            ""
            if not used.suspended_by_guard
            else "; SUSPENDED by the baseline policy"
            if rec.suspension_reason.startswith("baseline policy")
            else "; SUSPENDED by the guard"
        )
    )
    for line in baseline_lines(
        directory, rec.slot, ParisClock().now()[0], config.baseline_profile(rec.profession)
    ):
        print(line)
    events = store.history(rec.practitioner_id)
    if events:
        print(f"last change   {_event_line(events[-1])}")


def _event_line(event: dict[str, Any]) -> str:
    at = datetime.datetime.fromtimestamp(float(event.get("at", 0))).astimezone()
    parts = [at.strftime("%Y-%m-%d %H:%M:%S %Z"), str(event.get("action", "?"))]
    if event.get("detail"):
        parts.append(f"[{event['detail']}]")
    parts.append(f"by {event.get('by') or '?'}")
    if event.get("reason"):
        parts.append(f"- {event['reason']}")
    return "  ".join(parts)


def cmd_practitioner_show(args: argparse.Namespace) -> int:
    with open_existing_store(args) as store:
        _print_practitioner(args, store, _practitioner(store, args.practitioner_id))
    return EXIT_OK


def cmd_practitioner_history(args: argparse.Namespace) -> int:
    with open_existing_store(args) as store:
        events = store.history(args.practitioner_id)
        rec = store.practitioner(args.practitioner_id)
    if rec is None and not events:
        raise CliError(f"no practitioner {args.practitioner_id} and no history of one")
    if rec is None:
        print(f"# {args.practitioner_id} is no longer in the store; its history:")
    if not events:
        print(
            f"no recorded change for {args.practitioner_id} (status {rec.status if rec else '?'})"
        )
    for event in events:
        print(_event_line(event))
    return EXIT_OK


def _change(
    args: argparse.Namespace,
    store: Store,
    rec: PractitionerRecord,
    action: str,
    *,
    reason: str = "",
    detail: str = "",
    **changes: Any,
) -> PractitionerRecord:
    event = {"by": _who(args), "action": action}
    if reason:
        event["reason"] = reason
    if detail:
        event["detail"] = detail
    changed = store.update_practitioner(rec.practitioner_id, event=event, **changes)
    suspended = {"suspended": True, "active": False}.get(changes.get("status", ""))
    _share(args, "practitioner", rec.practitioner_id, changes=changes, event=event,
           suspended=suspended)  # fmt: skip
    return changed


def cmd_practitioner_suspend(args: argparse.Namespace) -> int:
    reason = args.reason or "suspended by an administrator"
    with open_existing_store(args) as store:
        rec = _practitioner(store, args.practitioner_id)
        was = rec.suspension_reason if rec.status == "suspended" else ""
        rec = _change(
            args, store, rec, "suspended", reason=reason, status="suspended",
            suspension_reason=reason,
        )  # fmt: skip
        if was:
            print(f"{rec.practitioner_id} was already suspended ({was}); reason now: {reason}")
        else:
            print(f"suspended {rec.practitioner_id}: {reason}")
        _print_practitioner(args, store, rec)
    return EXIT_OK


def cmd_practitioner_reinstate(args: argparse.Namespace) -> int:
    from service.quotas import clear_baseline_suspension, open_quota_file, quota_path, usage

    config = load_config(args.config)
    with open_existing_store(args) as store:
        rec = _practitioner(store, args.practitioner_id)
        directory = store.data_dir
        by_guard = False
        if rec.slot >= 0 and quota_path(directory).exists():
            quota_file = open_quota_file(directory, config, rec.slot + 1)
            by_guard = usage(quota_file, rec.slot, 0).suspended_by_guard
            quota_file.close()
        if rec.status != "suspended" and not by_guard:
            print(f"{rec.practitioner_id} is {rec.status}, not suspended: nothing to reinstate")
            return EXIT_OK
        was = rec.suspension_reason
        rec = _change(
            args, store, rec, "reinstated", reason=args.reason or "", detail=f"was: {was}",
            status="active", suspension_reason="",
        )  # fmt: skip
        if by_guard:
            quota_file = open_quota_file(directory, config, rec.slot + 1)
            quota_file.reinstate(rec.slot)
            clear_baseline_suspension(directory, quota_file, rec.slot)
            quota_file.close()
        print(f"reinstated {rec.practitioner_id} (was suspended: {was or 'by the harvest guard'})")
        _print_practitioner(args, store, rec)
    return EXIT_OK


def _fingerprint(value: str) -> str:
    fingerprint = value.replace(":", "").strip().lower()
    if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
        raise CliError(
            "--fingerprint must be a SHA-256 fingerprint in hex (64 digits, colons allowed), e.g. "
            "from `openssl x509 -in client.pem -noout -fingerprint -sha256`",
            EXIT_USAGE,
        )
    return fingerprint


def cmd_practitioner_pin(args: argparse.Namespace) -> int:
    fingerprint = _fingerprint(args.fingerprint)
    with open_existing_store(args) as store:
        rec = _practitioner(store, args.practitioner_id)
        if fingerprint in rec.cert_fingerprints:
            print(f"{fingerprint} is already pinned for {rec.practitioner_id}: nothing changed")
            return EXIT_OK
        rec = _change(
            args, store, rec, "pinned", detail=fingerprint,
            cert_fingerprints=sorted({*rec.cert_fingerprints, fingerprint}),
        )  # fmt: skip
        print(f"pinned {fingerprint} for {rec.practitioner_id}")
        _print_practitioner(args, store, rec)
    return EXIT_OK


def cmd_practitioner_unpin(args: argparse.Namespace) -> int:
    fingerprint = _fingerprint(args.fingerprint) if args.fingerprint else ""
    with open_existing_store(args) as store:
        rec = _practitioner(store, args.practitioner_id)
        if not rec.cert_fingerprints:
            print(f"{rec.practitioner_id} has no pinned certificate: nothing changed")
            return EXIT_OK
        if fingerprint and fingerprint not in rec.cert_fingerprints:
            raise CliError(
                f"{fingerprint} is not pinned for {rec.practitioner_id} (pinned: "
                f"{', '.join(rec.cert_fingerprints)}): nothing changed"
            )
        gone = [fingerprint] if fingerprint else list(rec.cert_fingerprints)
        rec = _change(
            args, store, rec, "unpinned", detail=", ".join(gone),
            cert_fingerprints=[f for f in rec.cert_fingerprints if f not in gone],
        )  # fmt: skip
        print(f"unpinned {len(gone)} certificate(s) of {rec.practitioner_id}: {', '.join(gone)}")
        _print_practitioner(args, store, rec)
    return EXIT_OK


def _quota_name(name: str) -> str:
    if name not in QUOTA_FIELDS:
        raise CliError(f"no quota setting {name!r}: one of {', '.join(QUOTA_FIELDS)}", EXIT_USAGE)
    return name


def cmd_practitioner_quota(args: argparse.Namespace) -> int:
    from service.config import check_quota_overrides
    from service.quotas import profile_for

    if not args.set and not args.unset:
        raise CliError(
            "say what to change: --set NAME=VALUE and/or --unset NAME "
            f"(names: {', '.join(QUOTA_FIELDS)}); `practitioner show` shows the quota",
            EXIT_USAGE,
        )
    config = load_config(args.config)
    with open_existing_store(args) as store:
        rec = _practitioner(store, args.practitioner_id)
        overrides = dict(rec.quota)
        said: list[str] = []
        for item in args.set or ():
            name, sep, value = item.partition("=")
            _quota_name(name.strip())
            name = name.strip()
            if not sep:
                raise CliError(f"--set {item}: write NAME=VALUE, e.g. daily_limit=500", EXIT_USAGE)
            if name == "shadow":
                rules = [v.strip() for v in value.split(",") if v.strip()]
                unknown = [r for r in rules if r not in SHADOW_RULES]
                if unknown:
                    raise CliError(
                        f"--set shadow=: unknown rule(s) {', '.join(unknown)}; "
                        f"some of: {', '.join(SHADOW_RULES)}",
                        EXIT_USAGE,
                    )
                overrides[name] = rules
            elif value.strip().isdigit() and int(value) > 0:
                overrides[name] = int(value)
            else:
                raise CliError(f"--set {name}= needs a positive integer", EXIT_USAGE)
            said.append(f"{name}={value.strip()}")
        for name in args.unset or ():
            _quota_name(name)
            if name in overrides:
                del overrides[name]
                said.append(f"unset {name}")
            else:
                print(f"{name} had no override for {rec.practitioner_id}: nothing to unset")
        try:
            check_quota_overrides(overrides, "quota override")
            profile_for(config, rec.profession, overrides)  # refuses impossible values
        except (ConfigError, ValueError) as exc:
            raise CliError(f"{exc}; nothing changed", EXIT_USAGE) from None
        if overrides == rec.quota:
            print(f"quota of {rec.practitioner_id} unchanged")
        else:
            rec = _change(args, store, rec, "quota", detail=", ".join(said), quota=overrides)
            print(f"quota of {rec.practitioner_id}: {', '.join(said)}")
        _print_practitioner(args, store, rec)
    return EXIT_OK


# -- status ----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    with open_existing_store(args) as store:
        counts = store.counts()
        dataset = store.dataset()
        directory = store.data_dir
    print(f"data dir      {directory.resolve()}")
    print(f"practitioners {counts['practitioners']:,}")
    print(f"tokens        {counts['credentials']:,}")
    if dataset:
        at = datetime.datetime.fromtimestamp(dataset.get("imported_at", 0)).astimezone()
        print(
            f"rights        {dataset.get('beneficiaries', 0):,} beneficiaries from "
            f"{dataset.get('source', '?')} ({dataset.get('mode', '?')}, "
            f"{at:%Y-%m-%d %H:%M:%S %Z})"
        )
    else:
        print("rights        none loaded yet (covergate import rights FILE)")
    explicit = args.pepper_file or os.environ.get("COVERGATE_PEPPER_FILE")
    pepper = Path(explicit) if explicit else directory / "pepper"
    print(f"pepper        {pepper}{'' if pepper.exists() else ' (missing)'}")
    return EXIT_OK


# -- demo ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from fastpath import Keys
    from service import demo, importer
    from service.auth import create_token
    from service.store import Store

    directory = Path(args.data or os.environ.get("COVERGATE_DATA") or DEFAULT_DATA_DIR)
    if (directory / STORE_SUBDIR).exists():
        if args.if_missing:
            _say(f"demo data already in {directory}; keeping it (delete it for fresh data)")
            return EXIT_OK
        if not args.force:
            raise CliError(
                f"{directory} already holds a store; use --force to add demo data to it, or "
                "choose another --data"
            )
    if args.beneficiaries < 1:
        raise CliError("--beneficiaries must be at least 1", EXIT_USAGE)
    config = load_config(args.config)
    keys = Keys(load_pepper(directory, args.pepper_file, create=True))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="covergate-demo-") as tmp:
        # The CSVs hold (synthetic) identities in clear: they never go into the data dir.
        _say(f"generating {args.beneficiaries:,} synthetic beneficiaries ...")
        files = demo.generate(Path(tmp), beneficiaries=args.beneficiaries)
        with Store(directory, config.store) as store:
            _say(f"importing {len(files.practitioners)} practitioners ...")
            importer.import_practitioners(store, files.practitioners_csv, by="covergate demo")
            _say(f"importing {files.rights_rows:,} rights rows into {directory} ...")
            report = importer.import_rights(
                store, keys, files.rights_csv, progress=not args.no_progress
            )
            _say("creating one token per profession ...")
            tokens = []
            seen = set()
            for p in files.practitioners:
                if p.status == "active" and p.profession not in seen:
                    seen.add(p.profession)
                    tokens.append((p, create_token(store, p.practitioner_id)))
            claims_token = create_token(store, "900000001", role="claims")
    _say(f"demo data ready in {time.perf_counter() - started:.1f}s")
    text = demo_text(
        directory, report.beneficiaries, report.rows, files, tokens, claims_token, config
    )
    if args.examples:
        path = Path(args.examples)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(
            f"# covergate demo data in {directory}: {report.beneficiaries:,} synthetic "
            f"beneficiaries, {report.rows:,} rights, {len(files.practitioners)} practitioners\n"
            f"# {len(tokens) + 1} tokens and {len(files.examples)} example checks written to "
            f"{path} (mode 0600; the tokens are shown nowhere else)"
        )
    else:
        print(text, end="")
    return EXIT_OK


def demo_text(
    directory: Path,
    beneficiaries: int,
    rows: int,
    files: Any,
    tokens: list[tuple[Any, str]],
    claims_token: str,
    config: Any,
) -> str:
    lines = [
        f"# covergate demo data in {directory}: {beneficiaries:,} synthetic beneficiaries, "
        f"{rows:,} rights, {len(files.practitioners)} practitioners",
        "# Tokens (one practitioner per profession; shown once, stored only as hashes):",
    ]
    for p, token in tokens:
        lines.append(f"TOKEN_{p.profession.upper()}={token}  # {p.practitioner_id}")
    lines.append(f"TOKEN_CLAIMS={claims_token}  # claims system 900000001")
    lines.append("# Synthetic identities to try (label: decision expected today):")
    for ex in files.examples:
        # A token whose profession may check the example's domain.
        token = next(t for p, t in tokens if ex.domain in config.profession_domains[p.profession])
        check = [
            "covergate", "check", "--insecure", "--token", token,
            "--nir", ex.nir, "--nir-key", ex.nir_key, "--birth-date", ex.birth_date,
            "--birth-rank", str(ex.birth_rank), "--amc", ex.amc_number, "--domain", ex.domain,
        ]  # fmt: skip
        if ex.member_number:
            check += ["--member", ex.member_number]
        if ex.care_date:
            check += ["--care-date", ex.care_date]
        lines.append(f"# {ex.label}: {ex.expected}")
        lines.append(shlex.join(check))
    return "\n".join(lines) + "\n"


# -- serve -----------------------------------------------------------------------------------------


def _read_pem(option: str, name: str) -> bytes:
    path = Path(name)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"{option} {name}: no such file", EXIT_USAGE) from None
    except IsADirectoryError:
        raise CliError(f"{option} {name}: is a directory, not a PEM file", EXIT_USAGE) from None
    except OSError as exc:
        raise CliError(f"{option} {name}: cannot read it ({exc.strerror})", EXIT_USAGE) from None


def _check_certificates(option: str, name: str) -> bytes:
    from cryptography import x509

    data = _read_pem(option, name)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CliError(
            f"{option} {name}: not a PEM certificate (-----BEGIN CERTIFICATE-----)", EXIT_USAGE
        ) from None
    return data


def _check_private_key(option: str, name: str) -> bytes:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_pem(option, name)
    try:
        load_pem_private_key(data, password=None)
    except TypeError:
        raise CliError(
            f"{option} {name}: the key is encrypted; give an unencrypted PEM key", EXIT_USAGE
        ) from None
    except Exception:  # ValueError, or cryptography's UnsupportedAlgorithm
        raise CliError(f"{option} {name}: not a PEM private key", EXIT_USAGE) from None
    return data


def _check_listen(listen: str) -> str:
    _, sep, port = listen.rpartition(":")  # an empty host (":PORT") serves every address
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise CliError(
            f"--listen must be HOST:PORT with a port from 0 to 65535 (not {listen!r}), e.g. "
            "127.0.0.1:50051 or [::]:50051",
            EXIT_USAGE,
        )
    return listen


def _tracing_line() -> str:
    from service import telemetry

    if not telemetry.enabled():
        return (
            "tracing is off (set OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:4317 to export every "
            "lookup as a span, and metrics, over OTLP/gRPC)"
        )
    endpoint = telemetry.traces_endpoint()
    if not endpoint:
        return "tracing is on: spans printed on stderr as JSON (COVERGATE_TRACE_CONSOLE); no export"
    try:
        interval = int(os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "60000")) / 1000
    except ValueError:
        interval = 60.0
    return (
        f"tracing is on: spans exported over OTLP/gRPC to {endpoint} every "
        f"{int(os.environ.get('OTEL_BSP_SCHEDULE_DELAY', '1000') or 1000) / 1000:g}s; metrics "
        f"(covergate.lookups, ...) too, the first after {interval:g}s "
        "(OTEL_METRIC_EXPORT_INTERVAL)"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import ServeOptions, TlsFiles, configure_logging, serve

    if args.insecure and args.tls_cert:
        raise CliError(
            "--insecure and --tls-cert exclude each other: choose plaintext (development) or TLS",
            EXIT_USAGE,
        )
    if not args.insecure and not args.tls_cert:
        raise CliError("choose --insecure (development) or --tls-cert F --tls-key F", EXIT_USAGE)
    if args.workers is not None and args.workers < 0:
        raise CliError("--workers must be 0 (one per core) or more", EXIT_USAGE)
    config = load_config(args.config)
    listen = _check_listen(args.listen or config.server.listen)
    tls = None
    if args.tls_cert:
        if not args.tls_key:
            raise CliError("--tls-cert needs --tls-key (the server's private key)", EXIT_USAGE)
        _check_certificates("--tls-cert", args.tls_cert)
        _check_private_key("--tls-key", args.tls_key)
        if args.client_ca:
            _check_certificates("--client-ca", args.client_ca)
        tls = TlsFiles(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.client_ca) if args.client_ca else None,
        )
    elif args.tls_key or args.client_ca:
        raise CliError("--tls-key and --client-ca go with --tls-cert, not --insecure", EXIT_USAGE)
    configure_logging()
    if tls is None:
        banner = "!" * 78
        print(
            f"{banner}\n!! covergate is serving PLAINTEXT gRPC (--insecure): bearer tokens cross "
            f"the network\n!! in clear. For development only; use --tls-cert/--tls-key in "
            f"production.\n{banner}",
            file=sys.stderr,
        )
    options = ServeOptions(
        data_dir=data_dir(args),
        config=config,
        listen=listen,
        workers=args.workers if args.workers is not None else config.server.workers,
        tls=tls,
        pepper_file=args.pepper_file,
    )

    def announce(line: str) -> None:
        print(line, flush=True)
        _say(_tracing_line())  # once serving: a server that cannot start says one line only

    try:
        return serve(options, announce=announce)
    except OSError as exc:
        raise CliError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


# -- check (client) --------------------------------------------------------------------------------


def _connection_problem(message: str, args: argparse.Namespace) -> str:
    """What to do about a call that never reached the server, in one line."""
    target = args.target
    lowered = message.lower()
    if "wrong_version_number" in lowered or "packet_length_too_long" in lowered:
        return (
            f"{target} answers in plaintext, not TLS: add --insecure (a development server such "
            "as `make run` serves plaintext)"
        )
    if "certificate_verify_failed" in lowered or "unable to get local issuer" in lowered:
        return (
            f"cannot verify the certificate of {target}: pass --ca-cert FILE with the CA that "
            "signed it"
        )
    if "socket closed" in lowered or "connection reset" in lowered or "handshake" in lowered:
        if args.insecure:
            return (
                f"{target} closed the connection: it probably expects TLS; drop --insecure "
                "(and pass --ca-cert FILE if its CA is not a public one)"
            )
        if not args.client_cert:
            return (
                f"{target} closed the connection during the TLS handshake: it probably requires "
                "a client certificate (--client-cert FILE --client-key FILE)"
            )
        return (
            f"{target} refused the TLS handshake: is the client certificate signed by the CA "
            "the server trusts (its --client-ca)?"
        )
    if "connection refused" in lowered or "failed to connect" in lowered:
        return (
            f"nothing answers at {target}: is the server running? (`make run` serves on "
            f"{DEFAULT_TARGET}; --target HOST:PORT for another)"
        )
    if "deadline" in lowered:
        return f"no answer from {target} within {args.timeout:g}s (--timeout SECONDS)"
    if "dns" in lowered or "resolve" in lowered or "name" in lowered:
        return f"cannot resolve {target}: check --target HOST:PORT"
    return f"cannot reach {target}: {message}"


def cmd_check(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get("COVERGATE_TOKEN") or None
    if args.client_cert and not args.client_key:
        raise CliError("--client-cert needs --client-key (its private key)", EXIT_USAGE)
    if args.client_key and not args.client_cert:
        raise CliError("--client-key needs --client-cert (the certificate)", EXIT_USAGE)
    if args.insecure and (args.client_cert or args.ca_cert):
        raise CliError("--client-cert and --ca-cert need TLS: drop --insecure", EXIT_USAGE)
    if not token and not args.client_cert:
        raise CliError(
            "say who is calling: --token TOKEN (or COVERGATE_TOKEN), or a client certificate "
            "with --client-cert FILE --client-key FILE",
            EXIT_USAGE,
        )
    if args.timeout <= 0:
        raise CliError("--timeout must be a positive number of seconds", EXIT_USAGE)
    root = _check_certificates("--ca-cert", args.ca_cert) if args.ca_cert else None
    client_cert = None
    if args.client_cert:
        client_cert = (
            _check_certificates("--client-cert", args.client_cert),
            _check_private_key("--client-key", args.client_key),
        )
    # gRPC's C core would print its own handshake errors on stderr; we explain them instead.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from service.client import CoverageClient, CoverageError

    with CoverageClient(
        args.target,
        token,
        insecure=args.insecure,
        root_certificates=root,
        client_cert=client_cert,
        timeout=args.timeout,
    ) as client:
        try:
            result = client.check(
                nir=args.nir,
                nir_key=args.nir_key,
                birth_date=args.birth_date,
                birth_rank=args.birth_rank,
                amc_number=args.amc,
                member_number=args.member or "",
                domain=args.domain,
                care_date=args.care_date or "",
                request_id=args.request_id or "",
            )
        except CoverageError as exc:
            if not exc.from_server:
                raise CliError(_connection_problem(exc.message, args), EXIT_UNREACHABLE) from None
            raise CliError(f"refused: {exc}", EXIT_REFUSED) from None
    print(f"decision      {result.decision}")
    if result.covered:
        print(f"rate          {result.rate_percent}%")
        print(f"convention    {result.convention_type}")
        print(f"rights until  {result.rights_end_date}")
        print(f"attestation   {result.attestation}")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their lines; an option's default is shown when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """One line for a usage mistake, saying where the help is; exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _version() -> str:
    try:
        return metadata.version("covergate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _domain(value: str) -> str:
    code = value.strip().upper()
    if code.startswith("CARE_DOMAIN_"):
        from covergate.v1 import covergate_pb2 as pb

        try:
            number = pb.CareDomain.Value(code)
        except ValueError:
            number = -1
        code = next((c for c, n in DOMAIN_CODES.items() if n == number), code)
    if code not in DOMAIN_CODES:
        raise argparse.ArgumentTypeError(
            f"unknown care domain {value!r}: one of {', '.join(DOMAIN_CODES)} (any case)"
        )
    return code


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r} must not be negative")
    return n


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None


def _epilog(*examples: str) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_STATUS_HELP


# -- rights snapshots ------------------------------------------------------------------------------


def _outside_data_dir(args: argparse.Namespace, path: Path, what: str) -> None:
    data = data_dir(args).resolve()
    if path.resolve() == data or data in path.resolve().parents:
        raise CliError(f"keep the {what} outside the data dir ({data}): a copied data dir must "
                       "not carry it", EXIT_USAGE)  # fmt: skip


def cmd_snapshot_keygen(args: argparse.Namespace) -> int:
    from service import snapshots

    path = Path(args.key)
    _outside_data_dir(args, path, "signing key")
    if path.exists():
        raise CliError(f"{path} exists: choose another file (a key is never overwritten)")
    public = snapshots.generate_key(path)
    print(f"signing key written to {path} (mode 0600; keep it off the hosts)")
    print("every host's config:")
    print(f'[snapshots]\npublic_key = "{public}"')
    return EXIT_OK


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    from service import snapshots

    key_path = Path(args.signing_key)
    _outside_data_dir(args, key_path, "signing key")
    out = Path(args.out)
    with open_existing_store(args) as store:
        try:
            key = snapshots.load_signing_key(key_path)
            started = time.monotonic()
            manifest = snapshots.create(store, out, key, args.generation)
        except snapshots.SnapshotError as exc:
            raise CliError(str(exc)) from None
    (out / "latest.tmp").write_text(f"{manifest.generation}\n")
    os.replace(out / "latest.tmp", out / "latest")
    print(f"generation {manifest.generation} in {out / str(manifest.generation)}: "
          f"{manifest.beneficiaries} beneficiaries, {manifest.rights_rows} rights rows, "
          f"{manifest.size} bytes, dataset {manifest.dataset_id}, signed "
          f"({time.monotonic() - started:.1f} s)")  # fmt: skip
    return EXIT_OK


def _snapshot_config(args: argparse.Namespace) -> tuple[Any, str]:
    """([snapshots] settings, this host's pepper fingerprint)."""
    from fastpath.rules import Keys
    from service.config import PepperError, load_pepper

    config = load_config(args.config)
    if not config.snapshots.public_key:
        raise CliError("[snapshots] public_key is not set in the config: put there the line "
                       "`covergate snapshot keygen` printed", EXIT_USAGE)  # fmt: skip
    try:
        pepper = load_pepper(data_dir(args), getattr(args, "pepper_file", None))
    except PepperError as exc:
        raise CliError(f"{exc}") from None
    return config, Keys(pepper).fingerprint


def cmd_snapshot_fetch(args: argparse.Namespace) -> int:
    from service import snapshots

    config, fingerprint = _snapshot_config(args)
    source = args.source or config.snapshots.source
    if not source:
        raise CliError("say where from: SOURCE, or [snapshots] source in the config", EXIT_USAGE)
    started = time.monotonic()
    try:
        manifest = snapshots.fetch(source, data_dir(args), config.snapshots.public_key,
                                   fingerprint, args.generation)  # fmt: skip
    except snapshots.SnapshotError as exc:
        raise CliError(f"refused, this host keeps serving generation "
                       f"{snapshots.active(data_dir(args))}: {exc}") from None  # fmt: skip
    print(f"generation {manifest.generation} ready on this host (checked: size, sha256, "
          f"signature, schema, pepper; {time.monotonic() - started:.1f} s)")  # fmt: skip
    return EXIT_OK


def _cluster_client(args: argparse.Namespace) -> Any:
    config = load_config(args.config)
    if not config.cluster.enabled:
        return None
    from service import cluster

    return cluster.connect_sync(config.cluster.redis, max(config.cluster.timeout_ms / 1000, 2.0))


def cmd_snapshot_activate(args: argparse.Namespace) -> int:
    from service import snapshots

    client = _cluster_client(args)
    try:
        if client is None:
            snapshots.set_active(data_dir(args), args.generation)
            print(f"this host serves generation {args.generation} from its next call")
            return EXIT_OK
        try:
            hosts = snapshots.activate_everywhere(client, args.generation, args.wait)
        finally:
            client.close()
    except snapshots.SnapshotError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"the cluster's Redis did not answer ({exc}): nothing activated") from None
    print(f"generation {args.generation} active on {len(hosts)} host(s): {', '.join(hosts)} "
          "(each switches within a second)")  # fmt: skip
    return EXIT_OK


def cmd_snapshot_rollback(args: argparse.Namespace) -> int:
    from service import snapshots

    client = _cluster_client(args)
    try:
        if client is None:
            current = snapshots.active(data_dir(args))
            args.generation = snapshots.previous(data_dir(args), current)
        else:
            try:
                args.generation = snapshots.cluster_previous(
                    client, snapshots.cluster_active(client)
                )
            finally:
                client.close()
    except snapshots.SnapshotError as exc:
        raise CliError(str(exc)) from None
    print(f"rolling back to generation {args.generation}")
    return cmd_snapshot_activate(args)


def cmd_snapshot_status(args: argparse.Namespace) -> int:
    from service import snapshots

    client = _cluster_client(args)
    if client is None:
        directory = data_dir(args)
        print(f"this host: active {snapshots.active(directory)}, "
              f"installed {snapshots.installed(directory) or 'none'}")  # fmt: skip
        last = snapshots.refusals(directory).get("last")
        if last:
            print(f"  {_refused_line(last)}")
        return EXIT_OK
    try:
        statuses = snapshots.hosts(client)
        active = snapshots.cluster_active(client)
    except OSError as exc:
        raise CliError(f"the cluster's Redis did not answer ({exc})") from None
    finally:
        client.close()
    print(f"cluster active generation: {active or 'none (each host its own store)'}")
    now = time.time()
    for host, status in sorted(statuses.items()):
        age = now - status.get("seen", 0)
        state = "live" if age <= snapshots.LIVE_SECONDS else f"silent for {age:.0f} s"
        print(f"  {host:24} active {status.get('active', 0):<4} ready {status.get('ready', [])} "
              f"{'waiting for ' + str(status['wanted']) if status.get('wanted') else ''} "
              f"({state})")  # fmt: skip
        if status.get("refused"):
            print(f"  {'':24} {_refused_line(status['refused'])}")
    return EXIT_OK


def _refused_line(last: dict[str, Any]) -> str:
    """The last copy a host refused, for `snapshot status`."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.get("at", 0)))
    return f"last refused copy ({last.get('check')}, {when}): {last.get('reason')}"


def build_parser() -> argparse.ArgumentParser:
    data_options = _Parser(add_help=False)
    group = data_options.add_argument_group("data options")
    group.add_argument(
        "--data",
        metavar="DIR",
        help="data dir (default: $COVERGATE_DATA, else ./covergate-data, else ./.demo/data "
        "when `make run` made it)",
    )
    group.add_argument("--config", metavar="FILE", help="TOML configuration file (see README)")
    group.add_argument(
        "--pepper-file",
        metavar="FILE",
        help="file holding the pepper in hex (default: $COVERGATE_PEPPER_FILE, else DIR/pepper)",
    )
    admin = _Parser(add_help=False, parents=[data_options])
    admin.add_argument(
        "--by",
        metavar="NAME",
        help="who makes the change, for the practitioner's history (default: your OS user)",
    )

    parser = _Parser(
        prog="covergate",
        description="Coverage checks for practitioner software, without harvesting: demo data, "
        "imports, tokens, practitioner administration, the gRPC server, and a one-off check.",
        epilog=_epilog(
            "make run                                  # demo data, server, ready-to-paste checks",
            "export COVERGATE_DATA=$PWD/.demo/data     # then the admin commands find that data",
            "covergate practitioner show 10001234567",
            "covergate check --insecure --token $TOKEN --nir 1850775123456 --nir-key 08 \\",
            "    --birth-date 19850701 --birth-rank 1 --amc 310457218 --domain phar",
            "covergate COMMAND --help                  # each command's options and examples",
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"covergate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str,
        help_text: str,
        examples: Sequence[str],
        parents: Sequence[argparse.ArgumentParser] = (),
        subs: Any = sub,
        func: Callable[[argparse.Namespace], int] | None = None,
    ) -> argparse.ArgumentParser:
        p = subs.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=_epilog(*examples),
            parents=list(parents),
            formatter_class=_Formatter,
        )
        if func is not None:
            p.set_defaults(func=func)
        return p

    # demo
    p = command(
        "demo",
        "make a demo data dir: synthetic beneficiaries, practitioners of every profession, tokens",
        ["covergate demo --data /tmp/demo --beneficiaries 10000",
         "covergate demo --data .demo/data --examples .demo/try.txt --if-missing   # make run"],
        [data_options],
        func=cmd_demo,
    )  # fmt: skip
    p.add_argument(
        "--beneficiaries", type=_positive_int, default=100_000, metavar="N",
        help="how many synthetic beneficiaries",
    )  # fmt: skip
    p.add_argument(
        "--examples",
        metavar="FILE",
        help="write the tokens and example checks to FILE (mode 0600) instead of printing them",
    )
    p.add_argument(
        "--if-missing", action="store_true", help="do nothing if DIR already holds a store"
    )
    p.add_argument("--force", action="store_true", help="add demo data to an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for the import")

    # import
    p = command(
        "import",
        "validate a rights or practitioners file, then load it atomically",
        ["covergate import practitioners practitioners.csv",
         "covergate import rights rights.csv            # replaces every right",
         "covergate import rights update.csv --merge    # changes only who is in the file"],
    )  # fmt: skip
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, what, example in (
        ("rights", "rights (one row per beneficiary, insurer and care domain)", "rights.csv"),
        ("practitioners", "practitioners (id, profession, insurers, status)", "practitioners.csv"),
    ):
        k = command(
            kind,
            f"validate and load a CSV file of {what}",
            [f"covergate import {kind} {example}", f"covergate import {kind} {example} --merge"],
            [admin],
            subs=kinds,
            func=cmd_import,
        )
        k.add_argument("file", metavar="FILE", help="CSV with a header (format: see README)")
        k.add_argument(
            "--merge",
            action="store_true",
            help="update only what the file lists instead of replacing everything",
        )
        k.add_argument(
            "--no-progress", action="store_true", help="no progress bar (rights; large files)"
        )

    # token
    p = command(
        "token",
        "create or revoke bearer tokens",
        ["covergate token create 10001234567",
         "covergate token create 900000001 --role claims",
         "covergate token revoke 10001234567"],
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = command(
        "create",
        "print a new bearer token, once, alone on the last line (only its hash is stored)",
        ["covergate token create 10001234567", "covergate token create 900000001 --role claims"],
        [admin],
        subs=actions,
        func=cmd_token_create,
    )
    k.add_argument("practitioner_id", metavar="PRACTITIONER_ID", help="who the token is for")
    k.add_argument(
        "--role",
        choices=("practitioner", "claims"),
        default="practitioner",
        help="practitioner: coverage checks; claims: attestation checks",
    )
    k = command(
        "revoke",
        "revoke every token of a practitioner (running servers refuse them on the next call)",
        ["covergate token revoke 10001234567"],
        [admin],
        subs=actions,
        func=cmd_token_revoke,
    )
    k.add_argument("practitioner_id", metavar="PRACTITIONER_ID", help="whose tokens to revoke")

    # practitioner
    p = command(
        "practitioner",
        "show and administer one practitioner: suspension, certificates, quota, history",
        ["covergate practitioner show 10001234567",
         "covergate practitioner suspend 10001234567 --reason 'stolen laptop, ticket 42'",
         "covergate practitioner history 10001234567"],
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    verbs: list[tuple[str, str, list[str], Callable[[argparse.Namespace], int]]] = [
        ("show", "profile, scope, quota, today's usage, the harvest guard and the last change",
         ["covergate practitioner show 10001234567"], cmd_practitioner_show),
        ("history", "every recorded change: suspensions, reinstatements, pins, quota, imports "
         "(who, when, why)", ["covergate practitioner history 10001234567"],
         cmd_practitioner_history),
        ("suspend", "refuse every lookup by this practitioner until it is reinstated",
         ["covergate practitioner suspend 10001234567 --reason 'stolen laptop, ticket 42'"],
         cmd_practitioner_suspend),
        ("reinstate", "lift a suspension (by hand or by the harvest guard)",
         ["covergate practitioner reinstate 10001234567 --reason 'new laptop, ticket 42'"],
         cmd_practitioner_reinstate),
        ("pin", "register a client certificate fingerprint (SHA-256) for this practitioner",
         ["covergate practitioner pin 10001234567 --fingerprint AB:CD:...",
          "openssl x509 -in client.pem -noout -fingerprint -sha256   # the fingerprint"],
         cmd_practitioner_pin),
        ("unpin", "remove a registered client certificate fingerprint (without one: all)",
         ["covergate practitioner unpin 10001234567 --fingerprint AB:CD:...",
          "covergate practitioner unpin 10001234567          # every pinned certificate"],
         cmd_practitioner_unpin),
        ("quota", "override this practitioner's quota (profession defaults otherwise)",
         ["covergate practitioner quota 10001234567 --set daily_limit=500",
          "covergate practitioner quota 10001234567 --set shadow=guard,rate",
          "covergate practitioner quota 10001234567 --unset daily_limit"],
         cmd_practitioner_quota),
    ]  # fmt: skip
    for verb, help_text, examples, func in verbs:
        read_only = verb in ("show", "history")
        k = command(
            verb,
            help_text,
            examples,
            [data_options if read_only else admin],
            subs=actions,
            func=func,
        )
        k.add_argument("practitioner_id", metavar="PRACTITIONER_ID", help="9 to 14 digits")
        if verb in ("suspend", "reinstate"):
            k.add_argument(
                "--reason", metavar="TEXT", help="why, kept in the history with who and when"
            )
        if verb == "pin":
            k.add_argument(
                "--fingerprint", required=True, metavar="SHA256HEX",
                help="the certificate's SHA-256 fingerprint in hex (colons allowed)",
            )  # fmt: skip
        if verb == "unpin":
            k.add_argument(
                "--fingerprint",
                metavar="SHA256HEX",
                help="the fingerprint to remove (default: every pinned one)",
            )
        if verb == "quota":
            k.add_argument(
                "--set",
                action="append",
                metavar="NAME=VALUE",
                help=f"override a setting (repeatable); NAME one of {', '.join(QUOTA_FIELDS)}; "
                f"shadow takes rules: {', '.join(SHADOW_RULES)}",
            )
            k.add_argument(
                "--unset",
                action="append",
                metavar="NAME",
                help="drop an override, back to the profession's default (repeatable)",
            )

    # snapshot
    p = command(
        "snapshot",
        "build, fetch, check, activate and roll back signed generations of the rights",
        ["covergate snapshot keygen ~/covergate-signing.pem",
         "covergate snapshot create /srv/snapshots --signing-key ~/covergate-signing.pem",
         "covergate snapshot fetch /srv/snapshots        # on every host",
         "covergate snapshot activate 7                 # once every host is ready",
         "covergate snapshot rollback",
         "covergate snapshot status"],
    )  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    k = command("keygen", "make an Ed25519 signing key (outside any data dir); print the public "
                "key for the hosts' config", ["covergate snapshot keygen ~/covergate-signing.pem"],
                [data_options], subs=actions, func=cmd_snapshot_keygen)  # fmt: skip
    k.add_argument("key", metavar="KEYFILE", help="where to write the private key (mode 0600)")
    k = command("create", "write this data dir's rights as the next generation in OUT, signed",
                ["covergate snapshot create /srv/snapshots --signing-key ~/covergate-signing.pem"],
                [data_options], subs=actions, func=cmd_snapshot_create)  # fmt: skip
    k.add_argument("out", metavar="OUT", help="directory of generations (OUT/<N>/, OUT/latest)")
    k.add_argument("--signing-key", required=True, metavar="KEYFILE",
                   help="the Ed25519 private key from `snapshot keygen`")  # fmt: skip
    k.add_argument("--generation", type=int, metavar="N",
                   help="its number (default: one past the highest in OUT)")  # fmt: skip
    k = command("fetch", "download a generation, check it (size, sha256, signature, schema, "
                "pepper), install it read-only; a host that refuses it keeps serving",
                ["covergate snapshot fetch /srv/snapshots",
                 "covergate snapshot fetch https://snapshots.internal/covergate --generation 7"],
                [data_options], subs=actions, func=cmd_snapshot_fetch)  # fmt: skip
    k.add_argument("source", metavar="SOURCE", nargs="?",
                   help="directory or http(s) URL (default: [snapshots] source)")  # fmt: skip
    k.add_argument("--generation", type=int, metavar="N", help="default: the source's latest")
    k = command("activate", "serve generation N: on every live host once all have it ready "
                "([cluster]), else on this host", ["covergate snapshot activate 7"],
                [data_options], subs=actions, func=cmd_snapshot_activate)  # fmt: skip
    k.add_argument("generation", type=int, metavar="N", help="the generation to serve")
    k.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for every host to have it ready")  # fmt: skip
    k = command("rollback", "serve the generation that was active before the current one",
                ["covergate snapshot rollback"], [data_options], subs=actions,
                func=cmd_snapshot_rollback)  # fmt: skip
    k.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for every host to have it ready")  # fmt: skip
    command("status", "every host's ready and active generations ([cluster]), or this host's",
            ["covergate snapshot status"], [data_options], subs=actions,
            func=cmd_snapshot_status)  # fmt: skip

    # status
    command(
        "status",
        "what a data dir holds: practitioners, tokens, the rights dataset, the pepper",
        ["covergate status", "covergate status --data /srv/covergate"],
        [data_options],
        func=cmd_status,
    )

    # serve
    p = command(
        "serve",
        "serve gRPC (coverage, attestations, health, reflection) until SIGTERM or Ctrl-C",
        ["covergate serve --tls-cert server.pem --tls-key server.key --client-ca ca.pem",
         "covergate serve --insecure --listen 127.0.0.1:50051 --workers 2   # development"],
        [data_options],
        func=cmd_serve,
    )  # fmt: skip
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to serve on (default: the config's [server] listen, {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes (default: the config's [server] workers; 0 = one per core)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC, for development only (said loudly)"
    )
    p.add_argument("--tls-cert", metavar="FILE", help="the server's certificate chain, PEM")
    p.add_argument("--tls-key", metavar="FILE", help="the server's private key, PEM")
    p.add_argument(
        "--client-ca",
        metavar="FILE",
        help="require client certificates signed by this CA (PEM): mTLS",
    )

    # check
    p = command(
        "check",
        "one coverage check against a running server, as practitioner software would make it",
        ["covergate check --insecure --token $TOKEN --nir 1850775123456 --nir-key 08 \\",
         "    --birth-date 19850701 --birth-rank 1 --amc 310457218 --domain phar",
         "covergate check --target covergate.example:443 --ca-cert ca.pem \\",
         "    --client-cert me.pem --client-key me.key --nir ... (a certificate alone)"],
    )  # fmt: skip
    conn = p.add_argument_group("connection")
    conn.add_argument(
        "--target", default=DEFAULT_TARGET, metavar="HOST:PORT", help="the server to ask"
    )
    conn.add_argument(
        "--token", help="bearer token (default: $COVERGATE_TOKEN); optional with a certificate"
    )
    conn.add_argument(
        "--insecure", action="store_true", help="plaintext channel (a development server)"
    )
    conn.add_argument(
        "--ca-cert", metavar="FILE", help="CA certificate (PEM) to verify the server with"
    )
    conn.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM), for mTLS")
    conn.add_argument("--client-key", metavar="FILE", help="the client certificate's key (PEM)")
    conn.add_argument(
        "--timeout", type=_seconds, default=10.0, metavar="SECONDS", help="deadline of the call"
    )
    card = p.add_argument_group("the card and the care")
    card.add_argument("--nir", required=True, help="13 characters; 2A/2B for Corsica")
    card.add_argument("--nir-key", required=True, metavar="KEY", help="the NIR's 2-digit key")
    card.add_argument(
        "--birth-date", required=True, metavar="YYYYMMDD", help="as printed (day/month may be 00)"
    )
    card.add_argument(
        "--birth-rank", required=True, type=int, metavar="N", help="1 to 9 (twins: 1, 2)"
    )
    card.add_argument(
        "--amc", required=True, metavar="NUMBER", help="the insurer's (AMC) number on the card"
    )
    card.add_argument("--member", metavar="NUMBER", help="member number, if printed on the card")
    card.add_argument(
        "--domain",
        required=True,
        type=_domain,
        metavar="CODE",
        help=f"care domain, any case: {', '.join(DOMAIN_CODES)}",
    )
    card.add_argument(
        "--care-date", metavar="YYYYMMDD", help="date of care (default: today in Europe/Paris)"
    )
    card.add_argument(
        "--request-id", metavar="ID", help="your correlation id, echoed back (<= 64 characters)"
    )
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        _say(str(exc))
        return exc.status
    except (ConfigError, PepperError, StoreError) as exc:
        _say(str(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

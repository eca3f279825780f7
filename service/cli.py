"""The `covergate` command line: demo data, imports, tokens, practitioners, serve, and a one-off
check as a client. Every command takes --data DIR (COVERGATE_DATA) and --config FILE (TOML).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fastpath.quota import SHADOW_RULES
from fastpath.rules import DOMAIN_CODES
from service.config import ConfigError, PepperError, load_config, load_pepper, resolve_data_dir
from service.store import StoreError


def _fail(message: str, code: int = 1) -> int:
    print(f"covergate: {message}", file=sys.stderr)
    return code


def _open_store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from service.store import Store

    return Store(resolve_data_dir(args.data), load_config(args.config).store)


# -- import ----------------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from fastpath import Keys
    from service import importer

    data_dir = resolve_data_dir(args.data)
    path = Path(args.file)
    if not path.is_file():
        return _fail(f"no such file: {path}")
    with _open_store(args) as store:
        try:
            if args.kind == "rights":
                keys = Keys(load_pepper(data_dir, args.pepper_file, create=True))
                progress = False if args.no_progress else None
                report = importer.import_rights(
                    store, keys, path, merge=args.merge, progress=progress
                )
            else:
                report = importer.import_practitioners(store, path, merge=args.merge)
        except importer.ImportRejected as exc:
            importer.print_rejection(exc)
            return 2
    if report.kind == "rights":
        print(
            f"imported {report.rows:,} rights rows for {report.beneficiaries:,} beneficiaries "
            f"in {report.seconds:.1f}s ({report.rows_per_second:,.0f} rows/s), "
            f"dataset {report.dataset_id}"
        )
    else:
        print(f"imported {report.rows:,} practitioners in {report.seconds:.2f}s")
    return 0


# -- tokens ----------------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    from service.auth import create_token

    with _open_store(args) as store:
        if args.action == "create":
            try:
                token = create_token(store, args.practitioner_id, args.role)
            except KeyError:
                return _fail(f"no practitioner {args.practitioner_id}; import practitioners first")
            print(f"new {args.role} token for {args.practitioner_id} (shown once, store it now):")
            print(token)
        else:
            n = store.revoke_credentials(args.practitioner_id)
            print(f"revoked {n} token(s) of {args.practitioner_id}")
    return 0


# -- practitioners ---------------------------------------------------------------------------------


def cmd_practitioner(args: argparse.Namespace) -> int:
    from service.clock import ParisClock
    from service.config import check_quota_overrides
    from service.quotas import Usage, open_quota_file, profile_for, quota_path, usage

    config = load_config(args.config)
    data_dir = resolve_data_dir(args.data)
    with _open_store(args) as store:
        try:
            current = store.practitioner(args.practitioner_id)
            if current is None:
                raise KeyError(args.practitioner_id)
            if args.action == "suspend":
                rec = store.update_practitioner(
                    args.practitioner_id,
                    status="suspended",
                    suspension_reason=args.reason or "suspended by an administrator",
                )
            elif args.action == "reinstate":
                rec = store.update_practitioner(
                    args.practitioner_id, status="active", suspension_reason=""
                )
                if rec.slot >= 0 and quota_path(data_dir).exists():
                    quota_file = open_quota_file(data_dir, config, rec.slot + 1)
                    quota_file.reinstate(rec.slot)
                    quota_file.close()
            elif args.action == "pin":
                fingerprint = (args.fingerprint or "").replace(":", "").lower()
                if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
                    return _fail("--fingerprint must be a SHA-256 fingerprint in hex", 2)
                rec = store.update_practitioner(
                    args.practitioner_id,
                    cert_fingerprints=sorted({*current.cert_fingerprints, fingerprint}),
                )
            elif args.action == "unpin":
                rec = store.update_practitioner(args.practitioner_id, cert_fingerprints=[])
            elif args.action == "quota":
                overrides = dict(current.quota)
                for item in args.set or ():
                    name, _, value = item.partition("=")
                    if name == "shadow":
                        overrides[name] = [v for v in value.split(",") if v]
                    elif value.isdigit():
                        overrides[name] = int(value)
                    else:
                        return _fail(f"--set {name}= needs a positive integer", 2)
                for name in args.unset or ():
                    overrides.pop(name, None)
                check_quota_overrides(overrides, "quota override")
                profile_for(config, current.profession, overrides)  # refuses impossible values
                rec = store.update_practitioner(args.practitioner_id, quota=overrides)
            else:
                rec = current
        except KeyError:
            return _fail(f"no practitioner {args.practitioner_id}")
        except ValueError as exc:
            return _fail(str(exc), 2)
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
    if rec.slot >= 0 and quota_path(data_dir).exists():
        quota_file = open_quota_file(data_dir, config, rec.slot + 1)
        used = usage(quota_file, rec.slot, ParisClock().now()[0])
        quota_file.close()
    print(f"today         {used.daily_count} lookups, {used.distinct_count} distinct beneficiaries")
    print(
        f"guard         {used.window_bad} of the last {used.window_len} lookups were NO_MATCH "
        f"or invalid; fired {used.guard_fired} time(s)"
        + ("; SUSPENDED by the guard" if used.suspended_by_guard else "")
    )
    return 0


# -- demo ------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from fastpath import Keys
    from service import demo, importer
    from service.auth import create_token
    from service.store import Store

    data_dir = resolve_data_dir(args.data)
    if (data_dir / "store").exists():
        if args.if_missing:
            print(f"covergate: demo data already in {data_dir}; keeping it")
            return 0
        if not args.force:
            return _fail(f"{data_dir} already holds a store; use --force to add demo data to it")
    config = load_config(args.config)
    keys = Keys(load_pepper(data_dir, args.pepper_file, create=True))
    with tempfile.TemporaryDirectory(prefix="covergate-demo-") as tmp:
        # The CSVs hold (synthetic) identities in clear: they never go into the data dir.
        files = demo.generate(Path(tmp), beneficiaries=args.beneficiaries)
        with Store(data_dir, config.store) as store:
            importer.import_practitioners(store, files.practitioners_csv)
            report = importer.import_rights(store, keys, files.rights_csv, progress=False)
            tokens = []
            seen = set()
            for p in files.practitioners:
                if p.status == "active" and p.profession not in seen:
                    seen.add(p.profession)
                    tokens.append((p, create_token(store, p.practitioner_id)))
            claims_token = create_token(store, "900000001", role="claims")
    lines = [
        f"# covergate demo data in {data_dir}: {report.beneficiaries:,} synthetic beneficiaries, "
        f"{report.rows:,} rights, {len(files.practitioners)} practitioners",
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
    text = "\n".join(lines) + "\n"
    if args.examples:
        path = Path(args.examples)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


# -- serve -----------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from service.server import ServeOptions, TlsFiles, configure_logging, serve

    configure_logging()
    config = load_config(args.config)
    if args.insecure == bool(args.tls_cert):
        return _fail("choose --insecure (development) or --tls-cert F --tls-key F", 2)
    tls = None
    if args.tls_cert:
        if not args.tls_key:
            return _fail("--tls-cert needs --tls-key", 2)
        tls = TlsFiles(
            Path(args.tls_cert),
            Path(args.tls_key),
            Path(args.client_ca) if args.client_ca else None,
        )
    else:
        banner = "!" * 78
        print(
            f"{banner}\n!! covergate is serving PLAINTEXT gRPC (--insecure): bearer tokens cross "
            f"the network\n!! in clear. For development only; use --tls-cert/--tls-key in "
            f"production.\n{banner}",
            file=sys.stderr,
        )
    options = ServeOptions(
        data_dir=resolve_data_dir(args.data),
        config=config,
        listen=args.listen or config.server.listen,
        workers=args.workers if args.workers is not None else config.server.workers,
        tls=tls,
        pepper_file=args.pepper_file,
    )
    return serve(options, announce=lambda s: print(s, flush=True))


# -- check (client) --------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from service.client import CoverageClient, CoverageError

    token = args.token or os.environ.get("COVERGATE_TOKEN")
    if not token:
        return _fail("pass --token or set COVERGATE_TOKEN", 2)
    root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    client_cert = None
    if args.client_cert:
        client_cert = (Path(args.client_cert).read_bytes(), Path(args.client_key).read_bytes())
    with CoverageClient(
        args.target, token, insecure=args.insecure, root_certificates=root, client_cert=client_cert
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
            return _fail(str(exc), 3)
    print(f"decision      {result.decision}")
    if result.covered:
        print(f"rate          {result.rate_percent}%")
        print(f"convention    {result.convention_type}")
        print(f"rights until  {result.rights_end_date}")
        print(f"attestation   {result.attestation}")
    return 0


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", help="data dir (default: $COVERGATE_DATA or ./covergate-data)")
    common.add_argument("--config", help="TOML configuration file")
    common.add_argument(
        "--pepper-file", help="file holding the pepper in hex (default: $COVERGATE_PEPPER_FILE)"
    )

    parser = argparse.ArgumentParser(
        prog="covergate",
        description="Coverage checks for practitioner software, without harvesting.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", parents=[common], help="make a demo data dir (synthetic data)")
    p.add_argument("--beneficiaries", type=int, default=100_000)
    p.add_argument("--examples", help="also write tokens and example commands to this file")
    p.add_argument("--if-missing", action="store_true", help="do nothing if data exists")
    p.add_argument("--force", action="store_true", help="add demo data to an existing store")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("import", parents=[common], help="validate and load a file")
    p.add_argument("kind", choices=("rights", "practitioners"))
    p.add_argument("file")
    p.add_argument(
        "--merge",
        action="store_true",
        help="update only what the file lists instead of replacing everything",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("token", parents=[common], help="create or revoke bearer tokens")
    p.add_argument("action", choices=("create", "revoke"))
    p.add_argument("practitioner_id")
    p.add_argument("--role", choices=("practitioner", "claims"), default="practitioner")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("practitioner", parents=[common], help="show, suspend or reinstate")
    p.add_argument("action", choices=("show", "suspend", "reinstate", "pin", "unpin", "quota"))
    p.add_argument("practitioner_id")
    p.add_argument("--reason", help="why (suspend)")
    p.add_argument("--fingerprint", help="client certificate SHA-256, hex (pin)")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="quota override, e.g. daily_limit=500 or shadow=guard,rate (quota)",
    )
    p.add_argument("--unset", action="append", metavar="NAME", help="drop an override (quota)")
    p.set_defaults(func=cmd_practitioner)

    p = sub.add_parser("serve", parents=[common], help="serve gRPC")
    p.add_argument("--listen", help="HOST:PORT (default 127.0.0.1:50051)")
    p.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC, development only")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca", help="require client certificates signed by this CA")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", parents=[common], help="one coverage check, as a client")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--token", help="bearer token (default: $COVERGATE_TOKEN)")
    p.add_argument("--insecure", action="store_true", help="plaintext channel")
    p.add_argument("--ca-cert", help="CA certificate to verify the server")
    p.add_argument("--client-cert")
    p.add_argument("--client-key")
    p.add_argument("--nir", required=True)
    p.add_argument("--nir-key", required=True)
    p.add_argument("--birth-date", required=True)
    p.add_argument("--birth-rank", type=int, required=True)
    p.add_argument("--amc", required=True, help="AMC number")
    p.add_argument("--member", help="member number, if printed on the card")
    p.add_argument("--domain", required=True, choices=tuple(DOMAIN_CODES), help="care domain")
    p.add_argument("--care-date", help="YYYYMMDD (default: today in Europe/Paris)")
    p.add_argument("--request-id")
    p.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, PepperError, StoreError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

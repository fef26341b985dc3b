"""``siteplan``: the command line. A thin edge over the stage functions (DESIGN.md §3.2)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # pycolmap/glog prints every mapping step at INFO; keep the terminal for our progress lines.
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        from reconstruct.colmap import import_pycolmap

        import_pycolmap().logging.minloglevel = 2
    except ImportError:
        pass


def _policy(path: Path | None) -> Any:
    from pydantic import ValidationError

    from privacy.anonymize import AnonymizationPolicy

    if path is None:
        return AnonymizationPolicy()
    try:
        return AnonymizationPolicy.model_validate_json(path.read_text())
    except OSError as exc:
        raise SystemExit(f"error: the policy file cannot be read ({type(exc).__name__})") from None
    except ValidationError as exc:
        raise SystemExit(f"error: the policy file is not a valid policy ({exc.error_count()} problem(s))") from None


def _shown(name: str) -> str:
    """A file name as the terminal can always print it (a name that is not UTF-8 is escaped)."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def cmd_anonymize(args: argparse.Namespace) -> int:
    from privacy.anonymize import anonymize_dir

    in_dir, out_dir = Path(args.in_dir), Path(args.out_dir)
    if not in_dir.is_dir():
        raise SystemExit(f"error: {_shown(str(in_dir))} is not a directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: {_shown(str(out_dir))} exists and is not a directory")
    if out_dir.resolve() == in_dir.resolve():
        raise SystemExit("error: OUT_DIR must not be IN_DIR (the clean photos would overwrite the originals)")
    policy = _policy(Path(args.policy) if args.policy else None)

    def show(i: int, n: int, e: dict[str, Any]) -> None:
        status = f"error: {e['error']}" if e["error"] else f"{len(e['faces'])} faces, {len(e['plates'])} plates"
        print(f"[{i}/{n}] {_shown(e['input'])}: {status} ({e['seconds']:.2f} s)", flush=True)

    entries = anonymize_dir(in_dir, out_dir, policy, progress=show)
    bad = sum(1 for e in entries if e["error"])
    print(f"wrote {len(entries) - bad} photos and {_shown(str(out_dir / 'report.json'))}; {bad} refused")
    # Some refused: the run did its job (the report says why). All refused: nothing usable came out.
    return 1 if entries and bad == len(entries) else 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from reconstruct.reference import load_reference
    from reconstruct.sfm import SfmConfig
    from reconstruct.site import reconstruct
    from siteplan import PIPELINE_VERSION

    images, run_dir = Path(args.images_dir), Path(args.out)
    if not images.is_dir():
        raise SystemExit(f"error: {images} is not a directory")
    ref = load_reference(Path(args.reference))
    cfg = SfmConfig(max_image_size=args.max_image_size) if args.max_image_size else SfmConfig()
    had_model = (run_dir / "site.json").is_file()
    try:
        site = reconstruct(images, ref, run_dir, config=cfg, pipeline_version=PIPELINE_VERSION)
    except BaseException:  # an error or Ctrl-C: the earlier run's outputs were not touched
        if had_model:
            print(f"note: the model of the earlier run in {run_dir} is kept unchanged", file=sys.stderr)
        raise
    info = site.info
    print(
        json.dumps(
            {
                "registered": len(info["registered_images"]),
                "unregistered": info["unregistered_images"],
                "scale": info["scale"]["metres_per_model_unit"],
                "scale_sigma_pct": info["scale"]["sigma_pct"],
                "timings": info["timings"],
            },
            indent=1,
        )
    )
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from reconstruct.measure import measure
    from reconstruct.reference import load_segments
    from reconstruct.site import load_site

    site = load_site(Path(args.run_dir))
    print(json.dumps({"segments": measure(site, load_segments(Path(args.segments)))}, indent=1))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from reconstruct.plan import plan
    from reconstruct.report import plan_report, write_report_html

    run_dir = Path(args.run_dir)
    images = Path(args.images) if args.images else None  # None: where site.json says
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: {out} exists and is not a directory")
    for p in (Path(args.design), Path(args.placement)):
        if not p.is_file():
            raise SystemExit(f"error: {p} does not exist")
    with _progress_bar("plan") as tick:
        res = plan(run_dir, Path(args.design), Path(args.placement), out, images_dir=images, progress=tick)
    info_path = run_dir / "site.json"
    site_info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    write_report_html(plan_report(site_info, res), out / "report.html", company=args.company)
    made = [m["file"] for m in res["montages"] if "file" in m]
    print(json.dumps({"placement": res["placement"], "montages": made, "drawings": res["drawings"]}, indent=1))
    return 0


@contextlib.contextmanager
def _progress_bar(title: str) -> Iterator[Callable[[str, float], None]]:
    """A progress bar on stderr (rich) fed with (sub-stage, fraction done); the elapsed time and an
    ETA come with it. Silent when stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task(title, total=1.0)

        def tick(sub: str, fraction: float) -> None:
            bar.update(task, completed=max(0.0, min(1.0, fraction)), description=f"{title}: {sub}")

        yield tick
        bar.update(task, completed=1.0, description=f"{title}: done")


def cmd_demo(args: argparse.Namespace) -> int:
    from siteplan.settings import Settings
    from workers.demo import JobInputs, run_main_job

    sample = Path(args.sample)
    out = Path(args.out)
    settings = Settings()
    t0 = time.perf_counter()
    inputs = JobInputs.from_sample(sample, out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(msg: str) -> None:
        print(f"{time.perf_counter() - t0:6.1f}s  {msg}", flush=True)

    with _progress_bar("job") as tick:

        def sub(stage: str, sub_stage: str, fraction: float, eta_s: float | None) -> None:
            done = {"reconstruct": 0.1, "plan": 0.8}.get(stage, 0.0)
            tick(f"{stage}: {sub_stage}", done + (0.7 if stage == "reconstruct" else 0.2) * fraction)

        report = run_main_job(settings, inputs, progress, sub_progress=sub)
    print("\nwrote:")
    for f in report["files"] + ["report.json", "report.html", "model/", "photos/"]:
        print(f"  {out / f}")
    print("\nstage times:")
    for k, v in report["timings_s"].items():
        print(f"  {k:<12} {v:7.1f} s")
    print(f"\nopen {out / 'report.html'} in a browser")
    return 0


def _admin_session() -> Any:
    from dataprotection.vault import FileKeyStore
    from siteplan.db import init_db
    from siteplan.settings import Settings

    settings = Settings()
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = FileKeyStore(settings.key_dir)
    return init_db(settings.db_url, keys), keys


def cmd_serve(args: argparse.Namespace) -> int:
    from api.app import run
    from siteplan.settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    for k, v in overrides.items():  # worker processes read the environment
        os.environ[f"SITEPLAN_{k.upper()}"] = str(v)
    settings = Settings(**overrides)
    print(f"serving the Siteplan API on http://{settings.host}:{settings.port} (OpenAPI at /openapi.json)", flush=True)
    run(settings, workers=args.workers)
    return 0


def cmd_tenant_create(args: argparse.Namespace) -> int:
    from dataprotection.tenancy import create_contract, create_tenant

    factory, keys = _admin_session()
    with factory.begin() as db:
        t = create_tenant(db, keys, label=args.label)
        out: dict[str, Any] = {"tenant_id": t.id, "label": t.label}
        if args.with_contract:
            out["contract_id"] = create_contract(db, keys, tenant_id=t.id).id
    print(json.dumps(out))
    return 0


def cmd_contract_create(args: argparse.Namespace) -> int:
    from dataprotection.tenancy import create_contract
    from siteplan.db import Tenant

    factory, keys = _admin_session()
    with factory.begin() as db:
        if db.get(Tenant, args.tenant) is None:
            raise SystemExit("error: no such tenant")
        c = create_contract(db, keys, tenant_id=args.tenant)
        print(json.dumps({"contract_id": c.id, "tenant_id": args.tenant, "starts_on": c.starts_on.isoformat()}))
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    from dataprotection.tenancy import TenancyError, create_token, rotate_token

    factory, _ = _admin_session()
    try:
        with factory.begin() as db:
            if args.rotate:
                issued = rotate_token(db, token_id=args.rotate, days=args.days or None)
            else:
                if not args.tenant:
                    raise SystemExit("error: --tenant is required (or --rotate TOKEN_ID)")
                issued = create_token(
                    db, tenant_id=args.tenant, name=args.name, scopes=args.scopes.split(","), days=args.days or None
                )
            tok = issued.token
            out = {
                "token_id": tok.id,
                "tenant_id": tok.tenant_id,
                "scopes": tok.scopes.split(),
                "expires_at": tok.expires_at.isoformat() if tok.expires_at else None,
                "token": issued.secret,
            }
    except TenancyError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(out))
    print("store the token now: it is shown only once", file=sys.stderr)
    return 0


def _services() -> Any:
    from dataprotection.vault import FileKeyStore, Vault
    from siteplan.db import init_db
    from siteplan.settings import Settings

    settings = Settings()
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = FileKeyStore(settings.key_dir)
    return settings, init_db(settings.db_url, keys), Vault(settings.vault_dir, keys)


def cmd_contract_end(args: argparse.Namespace) -> int:
    from dataprotection.lifecycle import TerminationError, terminate_contract
    from siteplan.paths import lifecycle_paths

    settings, factory, vault = _services()
    try:
        pem = Path(args.recipient_key).read_bytes() if args.recipient_key else None
    except OSError as exc:
        raise SystemExit(f"error: the recipient key file cannot be read ({exc.strerror})") from None
    try:
        signed = terminate_contract(
            factory,
            vault,
            lifecycle_paths(settings),
            contract_id=args.contract,
            disposition=args.disposition,
            actor="operator",
            recipient_public_pem=pem,
        )
    except TerminationError as exc:
        raise SystemExit(f"error: {exc}") from None
    doc = signed["document"]
    cert = lifecycle_paths(settings).certificates / f"destruction-{doc['contract']}.json"
    print(
        json.dumps(
            {
                "contract": doc["contract"],
                "disposition": doc["disposition"],
                "objects_destroyed": doc["destroyed"]["objects"],
                "export": doc["export"],
                "certificate": str(cert),
                "certificate_html": str(cert.with_suffix(".html")),
            },
            indent=1,
        )
    )
    return 0


def cmd_contract_export(args: argparse.Namespace) -> int:
    from dataprotection.lifecycle import delete_export, stream_export
    from siteplan.files import atomic_file  # a copy cut short (an error, Ctrl-C) leaves nothing
    from siteplan.paths import lifecycle_paths

    settings, factory, _ = _services()
    paths = lifecycle_paths(settings)
    if args.delete:
        why = "end of service: the operator confirmed the controller received its export"
        if not delete_export(factory, paths, args.contract, actor="operator", why=why):
            raise SystemExit("error: this contract has no export archive waiting")
        print(json.dumps({"contract": args.contract, "export": "shredded"}))
        return 0
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"error: {out} exists; choose a new file name")
    found = stream_export(factory, paths, args.contract, actor="operator")
    if found is None:
        raise SystemExit("error: this contract has no export archive waiting")
    _, _, chunks = found
    try:
        with atomic_file(out) as g:
            for block in chunks:  # the register records the download after the last block
                g.write(block)
    except OSError as exc:
        raise SystemExit(f"error: the export cannot be written there ({exc.strerror})") from None
    print(json.dumps({"contract": args.contract, "export": str(out), "next": "--delete once received"}))
    return 0


def cmd_certificate_verify(args: argparse.Namespace) -> int:
    from dataprotection import signing
    from dataprotection.lifecycle import verify_certificate
    from dataprotection.vault import FileKeyStore, Vault
    from siteplan.settings import Settings

    try:
        signed = json.loads(Path(args.file).read_text())
    except (OSError, ValueError):
        raise SystemExit("error: the certificate file cannot be read as JSON") from None
    settings = Settings()
    here = settings.root.exists()
    vault = Vault(settings.vault_dir, FileKeyStore(settings.key_dir)) if here else None
    key_file = settings.key_dir / "signing.pem"
    service_key = signing.public_b64(signing.load_or_create(key_file)) if key_file.exists() else None
    check = verify_certificate(
        signed,
        vault=vault,
        data_dir=settings.root if here else None,
        service_public_key=service_key,
        fingerprint=args.fingerprint,
    )
    try:
        signer = signing.fingerprint(signed["signature"]["public_key"])
    except (KeyError, TypeError, ValueError):
        signer = None
    print(
        json.dumps(
            {
                "signature_valid": check.signature_ok,
                "signed_by": signer,
                "signer_checked": check.signature_ok and (service_key is not None or args.fingerprint is not None),
                "data_dir_checked": here,
                "problems": check.problems,
                "valid": check.ok,
            },
            indent=1,
        )
    )
    return 0 if check.ok else 1


def cmd_certificate_fingerprint(args: argparse.Namespace) -> int:
    from dataprotection import signing
    from siteplan.settings import Settings

    key = signing.load_or_create(Settings().key_dir / "signing.pem")
    print(signing.fingerprint(signing.public_b64(key)))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from dataprotection.register import export_register, verify_register
    from siteplan.db import Tenant

    _, factory, _ = _services()
    with factory() as db:
        tenants = [args.tenant] if args.tenant else list(db.scalars(select(Tenant.id)))
        if args.action == "export":
            if not args.tenant:
                raise SystemExit("error: --tenant is required for export")
            print(json.dumps(export_register(db, args.tenant), indent=1))
            return 0
        results = {t: verify_register(db, t) for t in tenants}
    print(
        json.dumps(
            {t: {"ok": r.ok, "entries": r.entries, "head": r.head, "problem": r.problem} for t, r in results.items()},
            indent=1,
        )
    )
    return 0 if all(r.ok for r in results.values()) else 1


def cmd_backup(args: argparse.Namespace) -> int:
    from dataprotection.backup import BackupError, backup

    settings, _, _ = _services()
    try:
        meta = backup(
            db_file=settings.root / "siteplan.db",
            vault_root=settings.vault_dir,
            out=Path(args.out),
            db_url=settings.db_url,
        )
    except BackupError as exc:
        raise SystemExit(f"error: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"error: the backup cannot be written ({exc.strerror or type(exc).__name__})") from None
    print(json.dumps({"backup": args.out, **meta}))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    import tarfile

    from dataprotection.backup import BackupError, restore
    from dataprotection.vault import FileKeyStore, Vault
    from siteplan.db import init_db
    from siteplan.paths import lifecycle_paths
    from siteplan.settings import Settings

    settings = Settings()
    settings.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    vault = Vault(settings.vault_dir, FileKeyStore(settings.key_dir))
    if args.reconcile_only == (args.archive is not None):
        raise SystemExit("error: give a backup archive to restore, or --reconcile-only (not both)")
    try:
        if args.reconcile_only:
            from dataprotection.backup import reconcile

            rep = reconcile(
                init_db(settings.db_url, vault.keys), vault, certificates_dir=lifecycle_paths(settings).certificates
            )
        else:
            rep = restore(
                Path(args.archive),
                db_file=settings.root / "siteplan.db",
                vault_root=settings.vault_dir,
                factory_for=lambda: init_db(settings.db_url, vault.keys),
                vault=vault,
                force=args.force,
                certificates_dir=lifecycle_paths(settings).certificates,
                db_url=settings.db_url,
            )
    except BackupError as exc:
        raise SystemExit(f"error: {exc}") from None
    except (OSError, tarfile.TarError) as exc:
        raise SystemExit(f"error: the backup cannot be read ({type(exc).__name__})") from None
    print(
        json.dumps(
            {
                "contracts": rep.contracts,
                "unrecoverable_contracts": rep.unrecoverable,
                "erasures_replayed": rep.erasures_replayed,
                "certificates_restored": rep.certificates_restored,
                "register_entries_replayed": rep.register_entries_replayed,
                "register_entries_left_out": rep.register_entries_left_out,
                "note": "contracts whose data key was destroyed stay destroyed" if rep.unrecoverable else "",
            }
        )
    )
    return 0


def cmd_incident(args: argparse.Namespace) -> int:
    from datetime import datetime

    from dataprotection.incident import affected_by_object, affected_in_window

    _, factory, _ = _services()
    with factory() as db:
        if args.object:
            out = affected_by_object(db, args.object)
        elif args.since and args.until:
            out = affected_in_window(db, datetime.fromisoformat(args.since), datetime.fromisoformat(args.until))
        else:
            raise SystemExit("error: give --object NAME, or --since and --until (ISO times)")
    print(json.dumps(out, indent=1))
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    from datetime import date

    from sqlalchemy import delete

    from dataprotection.lifecycle import expire_exports
    from siteplan.db import BillingRecord
    from siteplan.paths import lifecycle_paths

    settings, factory, _ = _services()
    with factory.begin() as db:
        n = db.execute(delete(BillingRecord).where(BillingRecord.delete_after < date.today())).rowcount
    exports = expire_exports(factory, lifecycle_paths(settings))
    print(json.dumps({"billing_records_deleted": n, "exports_shredded": exports}))
    return 0


def cmd_reprocess(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from workers.project_job import run_project_job
    from workers.reprocess import driver_lock, run_batch, select_projects
    from workers.runtime import ray_runtime

    settings, factory, vault = _services()
    since = datetime.fromisoformat(args.since).replace(tzinfo=UTC) if args.since else None
    with factory() as db:
        sel = select_projects(db, version=args.pipeline_version, since=since, tenant=args.tenant)
    print(json.dumps({"to_process": len(sel.todo), "skipped": dict(sel.skipped), "dry_run": args.dry_run}))
    if args.dry_run or not sel.todo:
        return 0
    try:
        with driver_lock(settings.root / "reprocess.lock"), ray_runtime(settings):
            summary = run_batch(
                factory, sel, lambda job_id: run_project_job(settings, factory, vault, job_id), sole_driver=True
            )
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(summary.to_json(), indent=1))
    return 0 if summary.failed == 0 else 1


def cmd_subject(args: argparse.Namespace) -> int:
    """Data-subject rights from the operator's side: the same functions as the API's routes
    (dataprotection.rights), each recording its own register entry."""
    from dataprotection import rights
    from siteplan.db import Subject

    settings, factory, vault = _services()
    held = contextlib.ExitStack()
    if args.action == "erase":  # under the contract's data lock, as the API's erasure (docs/workers.md)
        from dataprotection.lifecycle import ContractBusy, contract_lock
        from siteplan.paths import lifecycle_paths

        with factory() as db:
            pre = db.get(Subject, args.subject)
        if pre is not None:
            try:
                held.enter_context(contract_lock(lifecycle_paths(settings), pre.contract_id))
            except ContractBusy as exc:
                raise SystemExit(f"error: {exc}") from None
    with held, factory.begin() as db:
        s = db.get(Subject, args.subject)
        if s is None:
            raise SystemExit("error: no such subject")
        sid = s.id
        if args.action == "export":
            out = Path(args.out or f"subject-{sid}.zip")
            out.write_bytes(rights.access(db, vault, s, actor="operator"))
            result: dict[str, Any] = {"exported": str(out)}
        elif args.action == "erase":
            er = rights.erase(db, vault, s, settings.uploads_dir, actor="operator")
            result = {"erased": sid, "projects": er.projects, "objects_shredded": er.objects}
        elif args.action in ("restrict", "lift"):
            rights.set_restriction(db, s, args.action == "restrict", actor="operator")
            result = {"subject": sid, "restricted": s.restricted}
        else:  # rectify
            given: dict[str, Any] = {"name": args.name}
            if args.address is not None:
                given["address"] = args.address
            if args.phone is not None:
                given["phone"] = args.phone
            rights.rectify(db, vault.keys, s, actor="operator", **given)
            result = {"subject": sid, "rectified": True}
    print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="siteplan", description="Site photos in, private metric 3D plans out.")
    p.add_argument("--log-level", default=os.environ.get("SITEPLAN_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job on sample_data/ with the embedded defaults")
    d.add_argument("--sample", default="sample_data")
    d.add_argument("--out", default="out/demo")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("anonymize", help="anonymise every image in IN_DIR into OUT_DIR")
    a.add_argument("in_dir")
    a.add_argument("out_dir")
    a.add_argument("--policy", help="JSON file with the controller's anonymisation policy")
    a.set_defaults(func=cmd_anonymize)

    r = sub.add_parser("reconstruct", help="build the metric site model")
    r.add_argument("images_dir")
    r.add_argument("--reference", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--max-image-size", type=int, default=None)
    r.set_defaults(func=cmd_reconstruct)

    m = sub.add_parser("measure", help="measure pixel segments on the site, with 1-sigma")
    m.add_argument("run_dir")
    m.add_argument("--segments", required=True)
    m.set_defaults(func=cmd_measure)

    pl = sub.add_parser("plan", help="merge a design into the site: drawings, 3D plan, montages")
    pl.add_argument("run_dir")
    pl.add_argument("--company", default="", help="the designer's business name, shown on the report")
    pl.add_argument("--design", required=True)
    pl.add_argument("--placement", required=True)
    pl.add_argument("--out", required=True)
    pl.add_argument("--images", help="the anonymised photos (default: as recorded in site.json)")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="the HTTP API (embedded defaults unless configured)")
    sv.add_argument("--host", default=None)
    sv.add_argument("--port", type=int, default=None)
    sv.add_argument("--workers", type=int, default=1, help="server processes (e.g. one per core)")
    sv.set_defaults(func=cmd_serve)

    te = sub.add_parser("tenant", help="controllers (tenants)").add_subparsers(dest="action", required=True)
    tc = te.add_parser("create", help="create a tenant; prints its id")
    tc.add_argument("label", help="the controller's business name")
    tc.add_argument("--with-contract", action="store_true", help="also start a contract for it today")
    tc.set_defaults(func=cmd_tenant_create)

    co = sub.add_parser("contract", help="contracts").add_subparsers(dest="action", required=True)
    ce = co.add_parser("end", help="end a contract: export if asked, destroy everything, sign a certificate")
    ce.add_argument("contract")
    ce.add_argument("--disposition", choices=["destroy", "return", "transfer"], required=True)
    ce.add_argument("--recipient-key", help="for transfer: the receiving processor's X25519 public key (PEM file)")
    ce.set_defaults(func=cmd_contract_end)
    cx = co.add_parser(
        "export",
        help="copy an ended contract's export archive out (--out), or shred the service's copy (--delete); "
        "unclaimed exports are shredded 30 days after the end",
    )
    cx.add_argument("contract")
    what = cx.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="where to write the archive (owner-only)")
    what.add_argument("--delete", action="store_true", help="the controller has it: shred the service's copy")
    cx.set_defaults(func=cmd_contract_export)

    ctf = sub.add_parser("certificate", help="destruction certificates").add_subparsers(dest="action", required=True)
    cv = ctf.add_parser("verify", help="check a certificate's signature and, with the data dir, that nothing survives")
    cv.add_argument("file")
    cv.add_argument(
        "--fingerprint",
        help="the signing key's fingerprint the operator publishes (SHA256:...); needed away from the server",
    )
    cv.set_defaults(func=cmd_certificate_verify)
    cf = ctf.add_parser("fingerprint", help="print this service's signing-key fingerprint, for the operator to publish")
    cf.set_defaults(func=cmd_certificate_fingerprint)

    rg = sub.add_parser("register", help="the register of processing")
    rg.add_argument("action", choices=["verify", "export"])
    rg.add_argument("--tenant")
    rg.set_defaults(func=cmd_register)

    bk = sub.add_parser(
        "backup", help="back up the DB (SQLite, or PostgreSQL with pg_dump) and the vault (never the keys)"
    )
    bk.add_argument("out", help="archive to write (.tar.gz)")
    bk.set_defaults(func=cmd_backup)
    rs = sub.add_parser("restore", help="restore a backup; contracts whose key was destroyed stay destroyed")
    rs.add_argument("archive", nargs="?")
    rs.add_argument("--force", action="store_true", help="replace the current database")
    rs.add_argument(
        "--reconcile-only",
        action="store_true",
        help="no archive: bring a database restored by other means (a snapshot, PITR) in line with the "
        "erasures, destroyed keys and register entries made since",
    )
    rs.set_defaults(func=cmd_restore)

    inc = sub.add_parser("incident", help="which controllers and subjects an object or time window touches")
    inc.add_argument("--object")
    inc.add_argument("--since")
    inc.add_argument("--until")
    inc.set_defaults(func=cmd_incident)

    sj = sub.add_parser("subject", help="data-subject rights: export, rectify, erase, restrict, lift")
    sj.add_argument("action", choices=["export", "rectify", "erase", "restrict", "lift"])
    sj.add_argument("subject", help="the subject's id")
    sj.add_argument("--out", help="export: the zip to write")
    sj.add_argument("--name")
    sj.add_argument("--address")
    sj.add_argument("--phone")
    sj.set_defaults(func=cmd_subject)

    rp = sub.add_parser("reprocess", help="re-run stored projects with a new pipeline version (resumable)")
    rp.add_argument("--since", help="projects last processed on or after this date (YYYY-MM-DD)")
    rp.add_argument("--tenant")
    rp.add_argument("--pipeline-version", default=__import__("siteplan").PIPELINE_VERSION)
    rp.add_argument("--dry-run", action="store_true", help="show what would run and what is skipped, run nothing")
    rp.set_defaults(func=cmd_reprocess)

    rt = sub.add_parser("retention", help="apply retention: delete billing records past their 7 years")
    rt.set_defaults(func=cmd_retention)
    cc = co.add_parser("create", help="start a contract for a tenant (creates its data key)")
    cc.add_argument("tenant")
    cc.set_defaults(func=cmd_contract_create)

    to = sub.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    tk = to.add_parser("create", help="issue an API token (shown once), or rotate one with --rotate")
    tk.add_argument("--tenant")
    tk.add_argument("--name", default="app")
    tk.add_argument("--scopes", default="upload,read", help="comma separated: upload,read,admin")
    tk.add_argument("--days", type=int, default=90, help="validity in days (0: no expiry)")
    tk.add_argument("--rotate", metavar="TOKEN_ID", help="revoke this token and issue its replacement")
    tk.set_defaults(func=cmd_token_create)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    from privacy.errors import InvalidImage
    from reconstruct.errors import DesignError, PlacementError, ReconstructionError, ScaleReferenceError
    from workers.stages import JobFailed

    try:
        return int(args.func(args))
    except (
        JobFailed,
        ReconstructionError,
        ScaleReferenceError,
        DesignError,
        PlacementError,
        InvalidImage,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a permission: named, without a path or a traceback
        print(f"error: a file could not be read or written ({type(exc).__name__}: {exc.strerror})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

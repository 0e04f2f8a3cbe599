"""The `mcnode` command line. The only place that configures logging or exits the process.

Each subcommand is one `_cmd_<name>(args) -> int` function plus its parser in `_build_parser`;
library code raises NodeError (or a package's own error) and this module turns it into a message
and an exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anonymizer.errors import McNodeError
from dicom_node.errors import ConfigError, NodeError

LOGGER = logging.getLogger("mcnode")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class LogGuard(logging.Filter):
    """Keeps what libraries log from breaking the node's log.

    - A record whose message cannot be formatted (a library passing an array to "%.3f", as pymedphys's
      gamma does) becomes a plain line with its arguments, instead of a "--- Logging error ---"
      traceback on stderr.
    - Records logged on the root logger itself below WARNING are dropped: the node logs on named
      loggers only, so these are a library's chatter (pymedphys calls logging.info directly).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.levelno < logging.WARNING:
            return False
        try:
            record.getMessage()
        except Exception:  # noqa: BLE001 - any formatting error of any library
            record.msg = f"{record.msg!s} (unformattable arguments: {record.args!r})"
            record.args = None
        return True


def guard_log_handlers(logger: logging.Logger | None = None) -> None:
    """Put a LogGuard on every handler of `logger` (the root logger by default), once."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, LogGuard) for f in handler.filters):
            handler.addFilter(LogGuard())


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    guard_log_handlers()
    # pynetdicom logs every PDU at INFO; keep its association-level messages only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _triple(text: str) -> tuple[float, float, float]:
    values = _floats(text)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected one number or three (x,y,z), got {text!r}")
    return (values[0], values[1], values[2])


# --- subcommands ---------------------------------------------------------------------------


def _cmd_init(args: argparse.Namespace) -> int:
    from dicom_node.settings import init_config_dir

    path = init_config_dir(Path(args.dir), port=args.port, ae_title=args.ae_title)
    print(f"wrote {path} and {path.parent / 'site.key'} (mode 0600); start with: mcnode serve -c {path}")
    return EXIT_OK


def _cmd_phantom(args: argparse.Namespace) -> int:
    from dicom_node.phantom import PhantomSpec, build_study, write_study

    spec = PhantomSpec(size_mm=args.size, spacing_mm=args.spacing, gantry_angles=args.gantry,
                       energy_layers=args.layers)
    study = build_study(spec)
    paths = write_study(study, args.out_dir)
    ct = study.ct[0]
    print(f"wrote {len(paths)} files to {args.out_dir}: {len(study.ct)} CT slices "
          f"{ct.Columns}x{ct.Rows} at {spec.spacing_mm[0]}x{spec.spacing_mm[1]}x{spec.spacing_mm[2]} mm, "
          f"RT Struct (BODY, PTV), RT Ion Plan ({len(spec.gantry_angles)} beam(s), "
          f"{spec.energy_layers} layers)")
    return EXIT_OK


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.jobs.node import serve_forever
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    serve_forever(settings)
    return EXIT_OK


def _cmd_send(args: argparse.Namespace) -> int:
    from dicom_node.net.scu import send_paths

    failures = send_paths([Path(p) for p in args.paths], host=args.host, port=args.port,
                          called_ae=args.aec, calling_ae=args.aet)
    if failures:
        for path, why in failures:
            print(f"FAILED {path}: {why}", file=sys.stderr)
        print(f"{len(failures)} file(s) failed", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_jobs(args: argparse.Namespace) -> int:
    from dicom_node.intake.journal import Journal
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    with Journal.open(settings.node.data_dir) as journal:
        rows = journal.list_jobs()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no jobs")
        return EXIT_OK
    print(f"{'id':<14} {'state':<10} {'progress':<9} {'uncertainty % per wave':<24} {'created':<20} {'updated':<20} "
          "reason / result")
    for row in rows:
        progress = f"{row['shards_done']}/{row['shards_total']}" if row.get("shards_total") else ""
        print(f"{row['id']:<14} {row['state']:<10} {progress:<9} {_waves_note(row):<24} {row['created']:<20} "
              f"{row['updated']:<20} {_job_note(row)}")
    return EXIT_OK


def _waves_note(row: dict[str, object]) -> str:
    """The pooled uncertainty after each wave, e.g. '4.10 > 2.62 > 1.93 ok' (target met) or '... NOT MET'."""
    waves = row.get("waves")
    values = [w.get("uncertainty_percent") for w in waves] if isinstance(waves, list) else []
    text = " > ".join("?" if v is None else f"{float(v):.2f}" for v in values)
    met = row.get("uncertainty_target_met")
    if met is not None:
        text += " ok" if met else " NOT MET"
    return text


def _job_note(row: dict[str, object]) -> str:
    """The last column of `mcnode jobs`: the reason, or the second-check verdict with its pass rates."""
    parts = [" ".join(str(row["reason"]).split())] if row.get("reason") else []  # one line per job
    if row.get("verdict"):
        rates = row.get("gamma_pass_rates")
        shown = ", ".join(f"{k} {float(v):.1f} %" for k, v in rates.items()) if isinstance(rates, dict) else ""
        parts.insert(0, f"second check {row['verdict']}" + (f" (gamma {shown})" if shown else ""))
    if row.get("commissioned") is False:
        parts.insert(0, "UNCOMMISSIONED beam model")
    return "; ".join(parts)


def _cmd_report(args: argparse.Namespace) -> int:
    from dicom_node.intake.journal import Journal
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    with Journal.open(settings.node.data_dir) as journal:
        job = journal.job(args.job)
    report = job.data.report
    if not report:
        print(f"job {job.id} has no second-check report (state {job.state}"
              f"{': ' + job.reason if job.reason else ''})", file=sys.stderr)
        return EXIT_FAILURE
    verdict = job.data.public.verdict or "?"
    print(f"job {job.id} {job.state} verdict {verdict}")
    print(f"html: {report.html}")
    print(f"pdf:  {report.pdf}")
    return EXIT_OK


def _cmd_commission(args: argparse.Namespace) -> int:
    from dicom_node.commission import commission
    from dicom_node.settings import load_settings

    calibrations = load_settings(args.config).engine.ct_calibrations if args.config else {}
    if args.primaries <= 0 or args.groups <= 0:
        raise ConfigError("--primaries and --groups must be positive")
    commission([Path(d) for d in args.reference or []], Path(args.out), base=Path(args.base) if args.base else None,
               measured=Path(args.measured) if args.measured else None, primaries=args.primaries,
               groups=args.groups, threads=args.threads, ct_calibrations=calibrations)
    return EXIT_OK


def _beam_model_args(values: list[str]) -> dict[str, Path | str]:
    """--beam-model MACHINE=BDL_FILE|generic, as [engine] beam_models entries."""
    from dicom_node.settings import GENERIC_BEAM_MODEL

    out: dict[str, Path | str] = {}
    for value in values:
        machine, sep, target = value.partition("=")
        if not sep or not machine or not target:
            raise ConfigError(f"--beam-model: expected MACHINE=BDL_FILE or MACHINE={GENERIC_BEAM_MODEL}, got {value!r}")
        if target == GENERIC_BEAM_MODEL:
            out[machine] = target
        elif Path(target).is_file():
            out[machine] = Path(target).resolve()
        else:
            raise ConfigError(f"--beam-model {machine}: beam model file {target} does not exist")
    return out


def _cmd_compute(args: argparse.Namespace) -> int:
    import dataclasses

    from dicom_node.jobs.compute import compute_folder
    from dicom_node.settings import EngineSettings, load_settings

    engine, shards = EngineSettings(), 4
    if args.config:
        settings = load_settings(args.config)
        engine, shards = settings.engine, settings.cloud.shards
    changes: dict[str, Any] = {k: v for k, v in (("threads", args.threads), ("rbe", args.rbe or None))
                               if v is not None}
    if args.beam_model:
        changes["beam_models"] = {**engine.beam_models, **_beam_model_args(args.beam_model)}
    engine = dataclasses.replace(engine, **changes)
    primaries = args.primaries or engine.primaries
    shards = args.shards or shards
    if primaries < shards:
        raise ConfigError(f"--primaries ({primaries}) must be at least --shards ({shards})")
    result = compute_folder(Path(args.in_dir), Path(args.out), primaries=primaries, shards=shards,
                            engine_settings=engine)
    s = result.merged.summary
    unc = s["uncertainty_percent"]
    print(f"wrote {result.rt_dose_path}")
    print(f"max dose {s['max_dose_plan_gy']:.4g} Gy ({s['dose_type'].lower()}, plan total over {s['fractions']} "
          f"fractions; {s['max_dose_per_fraction_gy']:.4g} Gy per fraction)")
    unc_text = "n/a (one shard)" if unc is None else f"{unc:.2f} %"
    print(f"uncertainty (pooled relative SE, body voxels >= 50 % of max): {unc_text}; "
          f"{s['primaries']} primaries, {s['shards']} shards")
    for warning in result.warnings:
        print(f"warning: {warning}")
    if args.json:
        print(json.dumps({"rt_dose": str(result.rt_dose_path), **s, "warnings": list(result.warnings)}))
    return EXIT_OK


def _cmd_commission_photon(args: argparse.Namespace) -> int:
    from dicom_node.photon_commission import commission_photon

    model = commission_photon(Path(args.out), energy_mv=args.energy, spectrum=args.spectrum, gy_per_mu=args.gy_per_mu,
                              measured=Path(args.pdd), ref_depth_cm=args.ref_depth, ref_field_cm=args.ref_field,
                              ref_ssd_cm=args.ref_ssd, tolerance=args.tolerance, histories=args.histories)
    for row in model["commissioning"]["pdd_check"]:  # type: ignore[index]
        print(f"PDD({row['depth_cm']:g} cm): measured {row['measured']:.1f} %, computed {row['computed']:.1f} %")
    print(f"wrote {args.out}; map the machine to it in [engine] beam_models")
    return EXIT_OK


def _cmd_depth_dose(args: argparse.Namespace) -> int:
    from dicom_node.jobs.depth_dose import CSV_NAME, PNG_NAME, run_depth_dose

    dd = run_depth_dose(args.beam, Path(args.out), field_cm=args.field, ssd_cm=args.ssd, histories=args.histories,
                        shards=args.shards)
    print(f"wrote {Path(args.out) / CSV_NAME} and {Path(args.out) / PNG_NAME}")
    print(dd.describe())
    return EXIT_OK


def _cmd_retry(args: argparse.Namespace) -> int:
    from dicom_node.intake.journal import Journal
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    with Journal.open(settings.node.data_dir) as journal:
        job = journal.retry(args.job)
    print(f"job {job.id} is {job.state} again; a running node takes it up within seconds")
    return EXIT_OK


def _cmd_purge(args: argparse.Namespace) -> int:
    from dicom_node.intake.journal import Journal
    from dicom_node.jobs.retention import purge
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    if settings.retention.days <= 0:
        print("retention.days is 0: nothing is ever removed")
        return EXIT_OK
    with Journal.open(settings.node.data_dir) as journal:
        items = purge(settings, journal, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for item in items:
        print(f"{verb} {item.describe()}")
    total = sum(i.bytes for i in items) / 1e6
    jobs = sum(1 for i in items if not i.orphans)
    print(f"{jobs} job(s) past {settings.retention.days:g} days after they ended; {verb} {total:.1f} MB")
    return EXIT_OK


def _read_password() -> str:
    """The new password: typed twice on a terminal, else the first line of standard input."""
    if sys.stdin.isatty():
        import getpass

        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _cmd_user(args: argparse.Namespace) -> int:
    from dicom_node.settings import load_settings
    from dicom_node.web.users import UserStore, check_name

    settings = load_settings(args.config)
    store = UserStore.in_dir(settings.node.data_dir)
    if args.action == "list":
        for name, created in store.names():
            print(f"{name:<24} created {created}")
        return EXIT_OK
    if not args.name:
        raise ConfigError(f"mcnode user {args.action} needs a NAME")
    if args.action == "add":
        check_name(args.name)
        store.add(args.name, _read_password(), replace=args.replace)
        print(f"user {args.name} {'updated' if args.replace else 'added'}; the web page accepts it at once")
    else:
        store.remove(args.name)
        print(f"user {args.name} removed; open sessions of it end at their next request")
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    from dicom_node.intake.journal import Journal
    from dicom_node.settings import load_settings

    settings = load_settings(args.config)
    with Journal.open(settings.node.data_dir) as journal:
        job = journal.cancel(args.job, "mcnode cancel")
    print(f"job {job.id} is {job.state}; a running node stops its shards within seconds")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from dicom_node.demo import run_demo

    if not args.verbose:  # the demo prints its own progress; the node's log lines only with -v
        logging.getLogger().setLevel(logging.WARNING)

    return run_demo(Path(args.out), primaries=args.primaries, shards=args.shards)


def _cmd_worker(args: argparse.Namespace) -> int:
    from cloud.worker import run_from_args

    return run_from_args(args)


def _site_key_for(args: argparse.Namespace) -> bytes:
    """The site key from --key-file (hex, mode 0600) or from the config's anonymizer.site_key_file."""
    from dicom_node.settings import load_settings, read_site_key, settings_from_dict

    if args.key_file:
        settings = settings_from_dict({"anonymizer": {"site_key_file": str(Path(args.key_file).resolve())}})
    else:
        settings = load_settings(args.config)
    return read_site_key(settings)


def _cmd_anonymize(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import pydicom
    from pydicom.errors import InvalidDicomError

    from anonymizer.deidentify import Deidentifier
    from anonymizer.errors import AnonymizerError
    from dicom_node.net.uids import SHORT_NAMES

    in_dir = Path(args.in_dir)
    if not in_dir.is_dir():
        raise ConfigError(f"IN_DIR: {in_dir} is not a directory")
    if not args.what_if and not args.out:
        raise ConfigError("-o OUT_DIR is required unless --what-if is given")
    deid = Deidentifier(_site_key_for(args))
    out_dir = Path(args.out) if args.out else None
    sources = sorted(p for p in in_dir.rglob("*") if p.is_file()
                     and (out_dir is None or out_dir.resolve() not in p.resolve().parents))
    # (tag path without item indexes, keyword, action, detail) -> number of files it occurs in
    seen: dict[tuple[str, str, str, str], int] = {}
    staging: Path | None = None
    if out_dir is not None and not args.what_if:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Written files appear in OUT_DIR only when every file de-identified: fail closed.
        staging = Path(tempfile.mkdtemp(prefix=".anonymize-", dir=out_dir))
    skipped = done = 0
    try:
        for path in sources:
            try:
                ds = pydicom.dcmread(path)
            except (InvalidDicomError, OSError, ValueError):
                skipped += 1
                continue
            try:
                if args.what_if:
                    actions = deid.describe(ds)
                    for key in {(_strip_items(a.tag), a.keyword, a.action, a.detail) for a in actions}:
                        seen[key] = seen.get(key, 0) + 1
                else:
                    out = deid.deidentify(ds)
                    kind = SHORT_NAMES.get(str(out.get("SOPClassUID", "")), "DICOM")
                    name = f"{kind}_{out.SOPInstanceUID}.dcm"  # pseudonymous: input names may hold PHI
                    out.save_as(staging / name, enforce_file_format=True)  # type: ignore[operator]
            except AnonymizerError as exc:
                raise NodeError(f"anonymize: file {done + skipped + 1} of {len(sources)}: {exc}; "
                                "nothing written") from exc
            done += 1
        if staging is not None and out_dir is not None:
            for f in staging.iterdir():
                f.replace(out_dir / f.name)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if skipped:
        LOGGER.warning("skipped %d file(s) that are not DICOM", skipped)
    if args.what_if:
        from anonymizer.profile import ACTIONS

        # The input path is not echoed: users name folders after patients.
        print(f"what-if: {done} DICOM file(s) read; nothing written. Action per tag (nested: SEQ>TAG):")
        for letter, meaning in ACTIONS.items():
            print(f"  {letter} = {meaning}")
        for (tag, keyword, action, detail), count in sorted(seen.items()):
            print(f"{tag:<42} {keyword:<40} {action}  {detail}  [{count} file(s)]")
    else:
        print(f"wrote {done} de-identified file(s) to {out_dir}")
    return EXIT_OK


def _strip_items(tag_path: str) -> str:
    return re.sub(r"\[\d+\]", "", tag_path)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcnode", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a config file and a fresh site key into DIR")
    p.add_argument("dir")
    p.add_argument("--port", type=int, default=11112)
    p.add_argument("--ae-title", default="MCNODE")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("serve", help="run the DICOM node in the foreground (SIGTERM/SIGINT stop it)")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("phantom", help="write a test study (CT, RT Struct, RT Ion Plan) as a TPS exports it")
    p.add_argument("out_dir")
    p.add_argument("--size", type=_triple, default=(300.0, 300.0, 300.0), help="mm, one value or x,y,z")
    p.add_argument("--spacing", type=_triple, default=(2.5, 2.5, 2.5), help="mm, one value or x,y,z")
    p.add_argument("--gantry", type=_floats, default=(0.0,), help="gantry angles, one beam each (deg)")
    p.add_argument("--layers", type=int, default=6, help="energy layers per beam")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("send", help="C-STORE every DICOM file in the given files/folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--aec", default="MCNODE", help="called AE title")
    p.add_argument("--aet", default="TPS", help="our (calling) AE title")
    p.set_defaults(func=_cmd_send)

    p = sub.add_parser("jobs", help="list jobs (no patient data)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_jobs)

    p = sub.add_parser("report", help="where the second-check report (HTML, PDF) of a job is")
    p.add_argument("job")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_report)

    from cloud.worker import build_parser as worker_parser

    p = sub.add_parser("worker", help="run one shard of a job (data key as hex on standard input)")
    worker_parser(p)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("compute", help="offline: plan + CT in a folder -> one RT Dose file (no network)")
    p.add_argument("in_dir")
    p.add_argument("-o", "--out", required=True, help="folder for the RT Dose file")
    p.add_argument("--primaries", type=int, help="total primaries (default: engine.primaries)")
    p.add_argument("--shards", type=int, help="independent shards (default: cloud.shards, or 4)")
    p.add_argument("--threads", type=int, help="threads per shard; 0 = all cores (default: engine.threads)")
    p.add_argument("--rbe", action="store_true", help="RBE-weighted dose (x1.1, DoseType EFFECTIVE)")
    p.add_argument("--beam-model", action="append", metavar="MACHINE=BDL",
                   help="beam model of a treatment machine: a BDL file, or 'generic' (uncommissioned); "
                        "adds to [engine] beam_models; repeatable")
    p.add_argument("-c", "--config", help="config file for [engine] and [cloud] defaults")
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    p.set_defaults(func=_cmd_compute)

    p = sub.add_parser("commission-photon", help="a photon beam model: spectrum checked against a measured PDD, "
                       "output anchored at the reference point; write its JSON")
    p.add_argument("--energy", type=float, required=True, help="nominal MV of the beam (the plan's NominalBeamEnergy)")
    p.add_argument("--spectrum", default="mohan6", help="spectrum shipped with ompmc (mohan6, var_6MV)")
    p.add_argument("--gy-per-mu", type=float, required=True, help="Gy per MU at the reference point")
    p.add_argument("--pdd", required=True, help="measured depth dose CSV (depth_cm, dose_percent), reference field")
    p.add_argument("--ref-depth", type=float, default=1.5, help="reference depth, cm (default 1.5)")
    p.add_argument("--ref-field", type=float, default=10.0, help="reference square field, cm (default 10)")
    p.add_argument("--ref-ssd", type=float, default=100.0, help="reference SSD, cm (default 100)")
    p.add_argument("--tolerance", type=float, default=2.0, help="largest PDD difference accepted, points (default 2)")
    p.add_argument("--histories", type=int, default=400_000, help="histories for each of the two calculations")
    p.add_argument("-o", "--out", required=True, help="the model JSON to write")
    p.set_defaults(func=_cmd_commission_photon)

    p = sub.add_parser("depth-dose", help="central-axis depth dose of one beam in water (co60, e10, x6, p150)")
    p.add_argument("beam", help="co60 | e<MeV> (electrons) | x<MV> (photons) | p<MeV> (protons)")
    p.add_argument("-o", "--out", required=True, help="folder for depth_dose.csv and depth_dose.png")
    p.add_argument("--field", type=float, help="square field side at the surface, cm (default 10)")
    p.add_argument("--ssd", type=float, help="source-surface distance, cm (default 80 for co60, else 100)")
    p.add_argument("--histories", type=int, help="histories over all shards (default depends on the beam)")
    p.add_argument("--shards", type=int, default=4, help="independent shards, at least 2 (default 4)")
    p.set_defaults(func=_cmd_depth_dose)

    p = sub.add_parser("commission", help="fit a machine's protons per MU to trusted doses; write a BDL")
    p.add_argument("--reference", action="append", metavar="DIR",
                   help="folder with one plan, its CT and the RT Dose the clinic trusts for it; repeatable")
    p.add_argument("--measured", metavar="CSV",
                   help="measured IDD per MU at 2 cm depth in water: columns energy_MeV,idd_2cm_Gy_mm2_per_MU")
    p.add_argument("--base", metavar="BDL", help="beam model whose shape is kept (default: the generic model)")
    p.add_argument("-o", "--out", required=True, metavar="OUT_BDL", help="the commissioned BDL to write")
    p.add_argument("--primaries", type=int, default=200_000, help="primaries per reference (and per energy)")
    p.add_argument("--groups", type=int, default=1,
                   help="energy bands fitted separately per reference (1: one factor per reference)")
    p.add_argument("--threads", type=int, default=0, help="engine threads; 0 = all cores")
    p.add_argument("-c", "--config", help="config file whose [engine] ct_calibrations convert the references' CT")
    p.set_defaults(func=_cmd_commission)

    p = sub.add_parser("retry", help="put a FAILED job back (failed while RUNNING: its verified job folder and "
                                     "finished shards are kept, else sealed afresh from the originals; a failed "
                                     "second check: SENT)")
    p.add_argument("job")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_retry)

    p = sub.add_parser("purge", help="remove what ended jobs past [retention] days used (originals, job folder, "
                                     "reports, vault entry)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=_cmd_purge)

    p = sub.add_parser("user", help="web page users: add (password on standard input), list, remove")
    p.add_argument("action", choices=("add", "list", "remove"))
    p.add_argument("name", nargs="?")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--replace", action="store_true", help="add: set a new password for an existing user")
    p.set_defaults(func=_cmd_user)

    p = sub.add_parser("cancel", help="stop a job's shards on every backend and record CANCELLED (final)")
    p.add_argument("job")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("demo", help="phantom -> node -> result, end to end on this machine")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--primaries", type=int, default=200_000)
    p.add_argument("--shards", type=int, default=2)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("anonymize", help="de-identify DICOM files exactly as they would leave the clinic")
    p.add_argument("in_dir")
    p.add_argument("-o", "--out", help="folder for the de-identified files (required unless --what-if)")
    p.add_argument("--what-if", action="store_true", help="list the action per tag instead of writing")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("-c", "--config", help="config file; its anonymizer.site_key_file is used")
    key.add_argument("--key-file", help="site key file (64 hex digits, mode 0600)")
    p.set_defaults(func=_cmd_anonymize)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"mcnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except McNodeError as exc:
        print(f"mcnode: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

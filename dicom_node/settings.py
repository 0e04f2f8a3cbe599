"""The node's configuration: one TOML file, loaded once into one frozen, validated object.

Every section is a frozen dataclass; the loader walks the TOML against the dataclass fields, so an
unknown key, a wrong type or an out-of-range value fails at start with the key's dotted path
(``node.port: must be between 1 and 65535, got 70000``). Nothing silently falls back to a
default when a value is present but wrong. ``config/mcnode.example.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anonymizer.keys import check_site_key
from dicom_node.errors import ConfigError

LOGGER = logging.getLogger(__name__)

AE_TITLE_MAX = 16


def _check_ae_title(path: str, value: str) -> None:
    if not value or len(value) > AE_TITLE_MAX or not value.isascii() or "\\" in value:
        raise ConfigError(f"{path}: must be 1-16 ASCII characters without backslash, got {value!r}")


def _check_positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be greater than 0, got {value}")


def _check_non_negative(path: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{path}: must be 0 or more, got {value}")


Check = Callable[[str, Any], None]


def _between(lo: float, hi: float, unit: str = "") -> Check:
    """A check that a number lies in [lo, hi]; the message names the range (and the unit)."""
    def check(path: str, value: float) -> None:
        if not lo <= value <= hi:
            raise ConfigError(f"{path}: must be between {lo:g} and {hi:g}{f' ({unit})' if unit else ''}, got {value}")

    return check


_check_port = _between(0, 65535)
_check_percent = _between(0, 100)


def _choice(*allowed: str) -> Check:
    def check(path: str, value: str) -> None:
        if value not in allowed:
            raise ConfigError(f"{path}: must be one of {', '.join(allowed)}; got {value!r}")

    return check


def _meta(check: Check | None = None, path: bool = False, secret: bool = False,
          literals: tuple[str, ...] = ()) -> dict[str, Any]:
    """Field metadata: a check, whether it is a path, a secret, and words a path value may be instead."""
    return {"check": check, "path": path, "secret": secret, "literals": literals}


@dataclass(frozen=True)
class TlsSettings:
    """Optional TLS on the DICOM port. Off unless both cert_file and key_file are set."""

    cert_file: Path | None = field(default=None, metadata=_meta(path=True))
    key_file: Path | None = field(default=None, metadata=_meta(path=True))
    # CA bundle that client certificates must chain to; unset = no client certificates required.
    ca_file: Path | None = field(default=None, metadata=_meta(path=True))

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = field(default="MCNODE", metadata=_meta(_check_ae_title))
    host: str = "127.0.0.1"
    port: int = field(default=11112, metadata=_meta(_check_port))
    data_dir: Path = field(default=Path("data"), metadata=_meta(path=True))
    allowed_callers: tuple[str, ...] = ("TPS",)
    # Largest PDU we accept; 0 = unlimited. dcmtk's default is 16 kB, ours is larger for speed.
    max_pdu: int = field(default=262144, metadata=_meta(_check_non_negative))
    # Call fsync on every spooled file before answering success (durability over speed).
    fsync: bool = True
    # A connection whose association is not established this long after it opened is closed (ARTIM).
    association_setup_seconds: float = field(default=10.0, metadata=_meta(_check_positive))
    # An established association with nothing received or sent for this long is closed.
    idle_timeout_seconds: float = field(default=60.0, metadata=_meta(_check_positive))
    # Connections at once, in all and from one address; the per-address cap must leave room for others.
    max_associations: int = field(default=32, metadata=_meta(_check_positive))
    max_associations_per_peer: int = field(default=8, metadata=_meta(_check_positive))
    tls: TlsSettings = field(default_factory=TlsSettings)


@dataclass(frozen=True)
class TriggerSettings:
    stable_seconds: float = field(default=10.0, metadata=_meta(_check_positive))
    timeout_seconds: float = field(default=3600.0, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class AnonymizerSettings:
    site_key_file: Path = field(default=Path("site.key"), metadata=_meta(path=True, secret=True))


GENERIC_BEAM_MODEL = "generic"


def _check_beam_models(path: str, value: dict[str, Path | str]) -> None:
    for machine, bdl in value.items():
        if isinstance(bdl, Path) and not bdl.is_file():
            raise ConfigError(f"{path}.{machine}: beam model file {bdl} does not exist "
                              f'(or write "{GENERIC_BEAM_MODEL}" for the uncommissioned built-in model)')


def _check_ct_calibrations(path: str, value: dict[str, tuple[Path, ...]]) -> None:
    for scanner, tables in value.items():
        if len(tables) != 2:
            raise ConfigError(f"{path}.{scanner}: must be two files [HU->density, HU->material], got {len(tables)}")
        for table in tables:
            if not table.is_file():
                raise ConfigError(f"{path}.{scanner}: calibration file {table} does not exist")


def _check_target_uncertainty(path: str, value: float) -> None:
    if value != 0 and not 0.1 <= value <= 50:
        raise ConfigError(f"{path}: must be 0 (off) or between 0.1 and 50 (percent), got {value}")


@dataclass(frozen=True)
class EngineSettings:
    name: str = field(default="mcsquare", metadata=_meta(_choice("mcsquare")))
    primaries: int = field(default=1_000_000, metadata=_meta(_check_positive))
    # Threads per shard; 0 = every core of the machine running the shard.
    threads: int = field(default=0, metadata=_meta(_check_non_negative))
    # RBE 1.1 weighting of proton dose: the RT Dose gets DoseType EFFECTIVE instead of PHYSICAL.
    rbe: bool = False
    # TreatmentMachineName -> MCsquare BDL file, or "generic" (the built-in uncommissioned model, every
    # dose marked NOT FOR CLINICAL USE). A plan on a machine not listed is REJECTED when it arrives.
    beam_models: dict[str, Path | str] = field(default_factory=dict, metadata=_meta(
        _check_beam_models, literals=(GENERIC_BEAM_MODEL,)))
    # CT scanner -> [HU->density file, HU->material file] (MCsquare's format). The key is the CT's
    # "Manufacturer/ManufacturerModelName" or its StationName (case-insensitive); a CT that matches
    # none uses the built-in tables. The job records which was used.
    ct_calibrations: dict[str, tuple[Path, ...]] = field(default_factory=dict,
                                                          metadata=_meta(_check_ct_calibrations))
    # Dose grid: "uniform" = cubic voxels of dose_grid_mm covering the CT; "tps" = exactly the grid of
    # the RT Dose the TPS sent for the plan (uniform when it has sent none by the time the job starts);
    # "ct" = the CT's own voxels.
    dose_grid: str = field(default="uniform", metadata=_meta(_choice("uniform", "tps", "ct")))
    dose_grid_mm: float = field(default=2.5, metadata=_meta(_between(0.5, 10, "mm")))
    # Stop adding shards once the pooled relative standard error (body voxels >= 50 % of the max) is at
    # or below this (percent); 0 = off (one wave of `primaries`).
    target_uncertainty_percent: float = field(default=0.0, metadata=_meta(_check_target_uncertainty))
    # Upper bound on primaries per plan over all waves when a target uncertainty is set.
    max_primaries: int = field(default=100_000_000, metadata=_meta(_check_positive))
    # true: MCsquare converts dose to medium into dose to water (post-processing), as Eclipse and
    # RayStation report it; the RT Dose says which.
    dose_to_water: bool = False
    # CT voxels below this density are air and score no dose (MCsquare's segmentation); the External/BODY
    # contour, when the structure set has one, also zeroes every dose voxel outside it.
    body_density_g_cm3: float = field(default=0.05, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class SshHostSettings:
    host: str = ""
    port: int = field(default=22, metadata=_meta(_check_port))
    user: str = "mcnode"
    key_file: Path | None = field(default=None, metadata=_meta(path=True, secret=True))
    # Folder on the host for staged bundles and results; a per-job subfolder is removed afterwards.
    work_dir: str = "/tmp/mcnode"
    # How the host starts a worker; the shard's arguments are appended.
    command: str = "mcnode worker"
    slots: int = field(default=1, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class SshSettings:
    hosts: tuple[SshHostSettings, ...] = ()
    # Host keys are checked against this file (unset: the user's ~/.ssh/known_hosts).
    known_hosts_file: Path | None = field(default=None, metadata=_meta(path=True))
    # false accepts unknown host keys: for test setups only.
    strict_host_key_checking: bool = True
    connect_timeout_seconds: float = field(default=10.0, metadata=_meta(_check_positive))
    # Connections stay open this long after a job for the next one (0: closed after each job).
    keep_connections_seconds: float = field(default=300.0, metadata=_meta(_check_non_negative))


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str = ""  # empty: AWS itself; set for S3-compatible stores
    bucket: str = ""
    prefix: str = "mcnode"
    region: str = ""


@dataclass(frozen=True)
class AwsSettings:
    region: str = ""
    endpoint_url: str = ""  # empty: AWS itself (Batch and KMS)
    job_queue: str = ""
    job_definition: str = ""
    kms_key_id: str = ""
    # The worker command inside the container; the shard's arguments are appended.
    command: tuple[str, ...] = ("mcnode", "worker")
    poll_seconds: float = field(default=5.0, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class SizingSettings:
    # Choose the shard count from past jobs: the cheapest that meets deadline_seconds, or the fastest
    # within cost_cap. 0 = off (cloud.shards is used); both 0 = always cloud.shards.
    deadline_seconds: float = field(default=0.0, metadata=_meta(_check_non_negative))
    cost_cap: float = field(default=0.0, metadata=_meta(_check_non_negative))
    max_shards: int = field(default=64, metadata=_meta(_check_positive))
    price_per_ghz_hour: float = field(default=0.029, metadata=_meta(_check_non_negative))
    ghz_per_core: float = field(default=2.5, metadata=_meta(_check_positive))
    cores_per_worker: int = field(default=1, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class CloudSettings:
    backend: str = field(default="local", metadata=_meta(_choice("local", "ssh", "aws")))
    shards: int = field(default=4, metadata=_meta(_check_positive))
    # A failed shard is run again (on another worker where there is one) up to this many times.
    shard_retries: int = field(default=2, metadata=_meta(_check_non_negative))
    # A shard still running after this long counts as failed.
    shard_deadline_seconds: float = field(default=3600.0, metadata=_meta(_check_positive))
    ssh: SshSettings = field(default_factory=SshSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    aws: AwsSettings = field(default_factory=AwsSettings)
    sizing: SizingSettings = field(default_factory=SizingSettings)
    # backend = "local": shards run at the same time on this server, the cores split between them.
    # 1: one at a time with every core (one engine process holds the CT: the least memory).
    local_workers: int = field(default=1, metadata=_meta(_check_positive))
    # Jobs computed at the same time; their shards share the workers fairly. 0 = by backend:
    # 1 for local (the server's cores are the limit), 4 for ssh and aws.
    max_concurrent_jobs: int = field(default=0, metadata=_meta(_check_non_negative))

    def concurrent_jobs(self) -> int:
        """max_concurrent_jobs with 0 resolved for the backend."""
        return self.max_concurrent_jobs or (1 if self.backend == "local" else 4)

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments for cloud.backends.get_backend(self.backend, ...)."""
        options: dict[str, Any] = {"retries": self.shard_retries, "deadline_s": self.shard_deadline_seconds}
        if self.backend == "local":
            options["max_workers"] = self.local_workers
        elif self.backend == "ssh":
            options.update(
                hosts=[{"host": h.host, "port": h.port, "user": h.user,
                        "key_file": str(h.key_file) if h.key_file else None, "work_dir": h.work_dir,
                        "command": h.command, "slots": h.slots} for h in self.ssh.hosts],
                known_hosts=self.ssh.known_hosts_file, strict_host_keys=self.ssh.strict_host_key_checking,
                connect_timeout_s=self.ssh.connect_timeout_seconds,
                keep_connections_s=self.ssh.keep_connections_seconds)
        elif self.backend == "aws":
            options.update(bucket=self.s3.bucket, prefix=self.s3.prefix, s3_endpoint_url=self.s3.endpoint_url,
                           region=self.aws.region or self.s3.region, endpoint_url=self.aws.endpoint_url,
                           job_queue=self.aws.job_queue, job_definition=self.aws.job_definition,
                           kms_key_id=self.aws.kms_key_id, command=self.aws.command,
                           poll_s=self.aws.poll_seconds)
        return options


@dataclass(frozen=True)
class OutboxSettings:
    # Back-off between attempts to deliver an RT Dose: doubles from initial up to max.
    retry_initial_seconds: float = field(default=5.0, metadata=_meta(_check_positive))
    retry_max_seconds: float = field(default=600.0, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class Destination:
    calling_ae_title: str = field(default="", metadata=_meta(_check_ae_title))
    ae_title: str = field(default="", metadata=_meta(_check_ae_title))
    host: str = "127.0.0.1"
    port: int = field(default=11113, metadata=_meta(_check_port))
    # Which kind of sender this is: "interactive" (a planner waits: served first), "normal", or
    # "batch" (automatic second checks: served with what is left).
    priority: str = field(default="normal", metadata=_meta(_choice("interactive", "normal", "batch")))


def parse_criterion(text: str) -> tuple[float, float]:
    """'3%/3mm' -> (3.0, 3.0): dose difference in percent, distance to agreement in mm."""
    try:
        dose, dist = (part.strip().lower() for part in text.split("/"))
        if not dose.endswith("%") or not dist.endswith("mm"):
            raise ValueError(text)
        values = float(dose[:-1]), float(dist[:-2])
    except ValueError as exc:
        raise ConfigError(f"must look like '3%/3mm', got {text!r}") from exc
    if min(values) <= 0:
        raise ConfigError(f"dose and distance must be greater than 0, got {text!r}")
    return values


def _check_criteria(path: str, value: tuple[str, ...]) -> None:
    for i, text in enumerate(value):
        try:
            parse_criterion(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}[{i}]: {exc}") from None


def _check_tolerances(path: str, value: dict[str, float]) -> None:
    for roi, tol in value.items():
        if isinstance(tol, bool) or not isinstance(tol, int | float) or tol <= 0:
            raise ConfigError(f"{path}.{roi}: must be a number greater than 0 (percent), got {tol!r}")


STRUCTURE_METRICS = ("mean", "D98", "D95", "D50", "D2")


def _check_metrics(path: str, value: tuple[str, ...]) -> None:
    for i, name in enumerate(value):
        if name not in STRUCTURE_METRICS:
            raise ConfigError(f"{path}[{i}]: must be one of {', '.join(STRUCTURE_METRICS)}; got {name!r}")


def _check_optional_ae_title(path: str, value: str) -> None:
    if value:
        _check_ae_title(path, value)


@dataclass(frozen=True)
class SecondCheckSettings:
    """Automatic comparison of the MC dose with the TPS's own RT Dose (issue 7)."""

    enabled: bool = True
    # Gamma criteria that decide the verdict; each must reach min_pass_rate_percent. 3%/2mm global with
    # a 10 % threshold is AAPM TG-218's recommendation; 3%/3mm cannot see a 3 mm displacement.
    criteria: tuple[str, ...] = field(default=("3%/2mm",), metadata=_meta(_check_criteria))
    min_pass_rate_percent: float = field(default=95.0, metadata=_meta(_check_percent))
    # Also computed and reported, not part of the verdict.
    report_criteria: tuple[str, ...] = field(default=("2%/2mm",), metadata=_meta(_check_criteria))
    # Voxels where neither dose reaches this percentage of the normalisation dose are left out of gamma
    # and the dose statistics (as are voxels outside the body or outside either dose grid).
    low_dose_threshold_percent: float = field(default=10.0, metadata=_meta(_check_percent))
    # Global gamma and dose differences in percent of: "tps_max" = the TPS dose's maximum inside the
    # body; "prescription" = the plan's target prescription dose (DoseReferenceSequence).
    normalisation: str = field(default="tps_max", metadata=_meta(_choice("tps_max", "prescription")))
    # The dose-weighted centre of the TPS dose may lie at most this far (mm) from the MC dose's; 0 = off.
    max_shift_mm: float = field(default=2.0, metadata=_meta(_check_non_negative))
    # Above this MC statistical uncertainty (pooled relative SE, percent) the verdict is "inconclusive".
    max_mc_uncertainty_percent: float = field(default=2.0, metadata=_meta(_check_positive))
    # Gamma search stops at this value (speed); larger values are reported as this value.
    max_gamma: float = field(default=2.0, metadata=_meta(_check_positive))
    # ROI name -> largest allowed |TPS - MC| in percent of the MC value, for each metric in
    # structure_metrics; the key "*" applies to every ROI not listed. Empty: structures reported only.
    structure_tolerances: dict[str, float] = field(default_factory=dict, metadata=_meta(_check_tolerances))
    structure_metrics: tuple[str, ...] = field(default=("mean", "D95"), metadata=_meta(_check_metrics))
    # Which dose is interpolated (trilinear) onto the other's grid.
    resample: str = field(default="tps_to_mc", metadata=_meta(_choice("tps_to_mc", "mc_to_tps")))
    # Folder for the reports (one sub-folder per job); unset = <node.data_dir>/reports.
    report_dir: Path | None = field(default=None, metadata=_meta(path=True))
    # Optional: also send the PDF as DICOM Encapsulated PDF to this AE ("" = do not send).
    report_ae_title: str = field(default="", metadata=_meta(_check_optional_ae_title))
    report_host: str = "127.0.0.1"
    report_port: int = field(default=11113, metadata=_meta(_check_port))


@dataclass(frozen=True)
class RetentionSettings:
    """How long what a job used stays on the node after the job ended (SENT, VERIFIED, REJECTED)."""

    # Days after the job ended; then its received originals, job folder, reports and vault entry go.
    # 0 = keep everything (nothing is ever removed).
    days: float = field(default=30.0, metadata=_meta(_check_non_negative))
    # How often the running node looks for jobs past retention (`mcnode purge` does it at once).
    check_every_minutes: float = field(default=60.0, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class WebSettings:
    """The web page for physicists served by `mcnode serve` (issue 16); port 0 turns it off."""

    host: str = "127.0.0.1"
    port: int = field(default=8484, metadata=_meta(_check_port))
    # HTTPS with node.tls's certificate and key when those are set; false = plain HTTP even then
    # (e.g. behind a reverse proxy that terminates TLS).
    tls: bool = True
    # A login lasts this long; after it the browser asks for the password again.
    session_hours: float = field(default=12.0, metadata=_meta(_check_positive))
    # How often the jobs page asks for fresh rows, seconds.
    refresh_seconds: float = field(default=3.0, metadata=_meta(_check_positive))


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    trigger: TriggerSettings = field(default_factory=TriggerSettings)
    anonymizer: AnonymizerSettings = field(default_factory=AnonymizerSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    cloud: CloudSettings = field(default_factory=CloudSettings)
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    secondcheck: SecondCheckSettings = field(default_factory=SecondCheckSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    web: WebSettings = field(default_factory=WebSettings)
    destinations: tuple[Destination, ...] = ()
    # Folder the file was read from; relative paths in the file are resolved against it.
    base_dir: Path = field(default=Path("."), metadata={"internal": True})

    def destination_for(self, calling_ae_title: str) -> Destination | None:
        for dest in self.destinations:
            if dest.calling_ae_title == calling_ae_title:
                return dest
        return None

    def masked(self) -> dict[str, Any]:
        """The settings as a dict for logging, secrets masked."""
        masked: dict[str, Any] = _masked(self)
        return masked


def _masked(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else _masked(value)
        return out
    if isinstance(obj, tuple):
        return [_masked(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _convert(path: str, tp: Any, value: Any, meta: dict[str, Any], base_dir: Path) -> Any:
    """Convert one TOML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(path, args[0], value, meta, base_dir)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a table, got {type(value).__name__}")
        return _build(tp, value, path, base_dir)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: must be a list, got {type(value).__name__}")
        return tuple(_convert(f"{path}[{i}]", item_tp, v, {}, base_dir) for i, v in enumerate(value))
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: must be a non-empty path string")
        if value in meta.get("literals", ()):
            return value
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base_dir / p).resolve()
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    if tp is dict or typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a table, got {type(value).__name__}")
        (_k, v_tp) = typing.get_args(tp) or (str, Any)
        item_meta = {"literals": meta.get("literals", ())}
        return {k: (v if v_tp is Any else _convert(f"{path}.{k}", v_tp, v, item_meta, base_dir))
                for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported setting type {tp!r}")  # pragma: no cover - schema bug


def _build(cls: type, table: dict[str, Any], prefix: str, base_dir: Path) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}{unknown[0]}: unknown key (known keys here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in table:
            value = _convert(path, hints[name], table[name], dict(f.metadata), base_dir)
        elif f.metadata.get("path") and f.default is not dataclasses.MISSING and f.default is not None:
            value = (base_dir / f.default).resolve()
        else:
            continue
        check = f.metadata.get("check")
        if check is not None and value is not None:
            check(path, value)
        kwargs[name] = value
    return cls(**kwargs)


def settings_from_dict(table: dict[str, Any], base_dir: Path | str = ".") -> Settings:
    base = Path(base_dir).resolve()
    built: Settings = _build(Settings, table, "", base)
    settings = dataclasses.replace(built, base_dir=base)
    _check_destinations(settings)
    _check_cloud(settings.cloud)
    _check_node(settings.node)
    engine = settings.engine
    if engine.target_uncertainty_percent > 0 and engine.max_primaries < engine.primaries:
        raise ConfigError(f"engine.max_primaries ({engine.max_primaries}) must be at least engine.primaries "
                          f"({engine.primaries}), which the first wave runs")
    return settings


def _check_node(node: NodeSettings) -> None:
    if node.max_associations_per_peer >= node.max_associations:
        raise ConfigError(f"node.max_associations_per_peer: must be less than node.max_associations "
                          f"({node.max_associations}) so one address cannot take every connection, "
                          f"got {node.max_associations_per_peer}")


def _check_cloud(cloud: CloudSettings) -> None:
    """What the chosen backend cannot run without."""
    if cloud.backend == "ssh":
        if not cloud.ssh.hosts:
            raise ConfigError("cloud.ssh.hosts: the ssh backend needs at least one [[cloud.ssh.hosts]] entry")
        for i, h in enumerate(cloud.ssh.hosts):
            if not h.host:
                raise ConfigError(f"cloud.ssh.hosts[{i}].host: required")
            if not h.command.strip():
                raise ConfigError(f"cloud.ssh.hosts[{i}].command: required")
    if cloud.backend == "aws":
        for path, value in (("cloud.s3.bucket", cloud.s3.bucket), ("cloud.aws.job_queue", cloud.aws.job_queue),
                            ("cloud.aws.job_definition", cloud.aws.job_definition),
                            ("cloud.aws.kms_key_id", cloud.aws.kms_key_id)):
            if not value:
                raise ConfigError(f"{path}: required when cloud.backend is aws")
        if not cloud.aws.command:
            raise ConfigError("cloud.aws.command: must not be empty")
    if cloud.sizing.deadline_seconds and cloud.sizing.cost_cap:
        raise ConfigError("cloud.sizing: set deadline_seconds or cost_cap, not both")


def _check_destinations(settings: Settings) -> None:
    seen: set[str] = set()
    for i, dest in enumerate(settings.destinations):
        if not dest.calling_ae_title or not dest.ae_title:
            raise ConfigError(f"destinations[{i}]: calling_ae_title and ae_title are required")
        if dest.calling_ae_title in seen:
            raise ConfigError(f"destinations[{i}].calling_ae_title: {dest.calling_ae_title!r} appears twice")
        seen.add(dest.calling_ae_title)


def mc_target_uncertainty_percent(settings: Settings) -> float:
    """The statistical uncertainty (percent) an MC job runs waves to; 0 = one wave, no target.

    With the second check on, a job asks for at least what the check needs
    (secondcheck.max_mc_uncertainty_percent): the engine's own target when that is tighter. Without an
    engine target (0) no waves are run; a check of a noisier dose then says "inconclusive".
    """
    target = float(settings.engine.target_uncertainty_percent)
    if target <= 0 or not settings.secondcheck.enabled:
        return target
    return min(target, settings.secondcheck.max_mc_uncertainty_percent)


def load_settings(path: Path | str) -> Settings:
    """Read and validate a config file; raise ConfigError naming the key that is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return settings_from_dict(table, path.parent)


def read_site_key(settings: Settings) -> bytes:
    """The 32-byte site key; refuses a key file others can read."""
    key_path = settings.anonymizer.site_key_file
    try:
        st = key_path.stat()
    except FileNotFoundError as exc:
        raise ConfigError(f"anonymizer.site_key_file: {key_path} does not exist (run 'mcnode init')") from exc
    if st.st_mode & 0o077:
        raise ConfigError(f"anonymizer.site_key_file: {key_path} is readable by others; chmod 600 it")
    raw = key_path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"anonymizer.site_key_file: {key_path} is not a hex-encoded key") from exc
    return check_site_key(key, ConfigError, "anonymizer.site_key_file: key")


CONFIG_TEMPLATE = """\
# dicom-mc-node configuration. Every key is documented in config/mcnode.example.toml.
[node]
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
data_dir = "data"              # relative paths are relative to this file
allowed_callers = ["TPS"]      # calling AE titles; [] = anyone (logged as a warning)

[trigger]
stable_seconds = 10
timeout_seconds = 3600

[anonymizer]
site_key_file = "site.key"

[engine]
name = "mcsquare"
primaries = 1000000
# TreatmentMachineName -> commissioned BDL file (see `mcnode commission`), or "generic" for the
# uncommissioned built-in model (doses marked NOT FOR CLINICAL USE). Plans on other machines are REJECTED.
beam_models = {{}}

[cloud]
backend = "local"
shards = 4

[web]                          # the web page: add users with `mcnode user add NAME -c FILE`
host = "127.0.0.1"
port = 8484                    # 0 = no web page

[[destinations]]               # where RT Doses go, by the AE title that sent the plan
calling_ae_title = "TPS"
ae_title = "TPS"
host = "127.0.0.1"
port = 11113
"""


def write_site_key(path: Path) -> None:
    """Create a fresh random 256-bit site key, mode 0600, never overwriting an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")


def init_config_dir(directory: Path, port: int = 11112, ae_title: str = "MCNODE") -> Path:
    """Write DIR/mcnode.toml and DIR/site.key; refuse to overwrite either."""
    _check_port("--port", port)
    _check_ae_title("--ae-title", ae_title)
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "mcnode.toml"
    key_path = directory / "site.key"
    for existing in (config_path, key_path):
        if existing.exists():
            raise ConfigError(f"{existing} already exists; not overwriting it")
    write_site_key(key_path)
    config_path.write_text(CONFIG_TEMPLATE.format(port=port, ae_title=ae_title))
    return config_path

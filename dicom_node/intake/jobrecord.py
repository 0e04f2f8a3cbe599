"""The job record: its states, which state may follow which, and every field of its data.

A job is one received RT plan on its way through the node. The journal (`journal.py`) stores the
state in the `jobs.state` column and the data below as JSON in `jobs.data`; this module is the one
place that says what those hold and who writes them. States (DESIGN.md at the repository root):

    RECEIVING → READY → SEALED → RUNNING → MERGED → SENT (→ VERIFIED)

with the side exits FAILED (retryable: `mcnode retry` puts the job back where it failed),
REJECTED (the input can never work) and CANCELLED (a person stopped it before its dose was
delivered, with `mcnode cancel` or from the web page; final).

Writers hand the journal a *patch*: a `JobData` whose fields left at their default keep the stored
value, so stages on other threads (the outbox, the second check) never overwrite each other's keys
(`JobData.merged`). Rows written by an older or newer node load too: keys this module does not
know are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """A job's state; the value is the text stored in the journal."""

    RECEIVING = "RECEIVING"
    READY = "READY"
    SEALED = "SEALED"
    RUNNING = "RUNNING"
    MERGED = "MERGED"
    SENT = "SENT"
    VERIFIED = "VERIFIED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    CANCELLED = "CANCELLED"


# Which state may follow which. FAILED may be retried from the state the job failed in.
# CANCELLED is possible until the dose is delivered.
TRANSITIONS: dict[JobState, tuple[JobState, ...]] = {
    JobState.RECEIVING: (JobState.READY, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED),
    JobState.READY: (JobState.SEALED, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED),
    JobState.SEALED: (JobState.RUNNING, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED),
    JobState.RUNNING: (JobState.MERGED, JobState.REJECTED, JobState.FAILED, JobState.CANCELLED),
    JobState.MERGED: (JobState.SENT, JobState.FAILED, JobState.CANCELLED),
    JobState.SENT: (JobState.VERIFIED, JobState.FAILED),
    JobState.VERIFIED: (),
    # A failed second check (FAILED in SENT): `mcnode retry` puts it back to SENT, a newer TPS dose to VERIFIED.
    JobState.FAILED: (JobState.READY, JobState.SEALED, JobState.RUNNING, JobState.MERGED, JobState.FAILED,
                      JobState.REJECTED, JobState.SENT, JobState.VERIFIED, JobState.CANCELLED),
    JobState.REJECTED: (),
    JobState.CANCELLED: (),
}


@dataclass
class PublicData:
    """What `mcnode jobs` shows next to a job (and `--json` prints under these names).

    Nothing here identifies the patient. `None` means "not known yet"; it is not shown.
    """

    # assembler (READY)
    ct_slices: int | None = None
    assembly: str | None = None                   # how the CT was found
    # pipeline (SEALED, RUNNING, MERGED)
    warnings: list[str] | None = None             # engine warnings, e.g. an UNCOMMISSIONED beam model
    beam_model: str | None = None                 # the BDL file the machine is mapped to
    commissioned: bool | None = None              # False: generic model, dose marked NOT FOR CLINICAL USE
    ct_calibration: str | None = None             # HU tables used: "built-in tables" or the scanner key
    sizing: dict[str, Any] | None = None          # cloud.sizing.plan_job / finish_job
    summary: dict[str, Any] | None = None         # merged dose summary (cloud.merge)
    shards: int | None = None
    primaries: int | None = None
    shard_wall_s: list[float] | None = None
    dose_grid: dict[str, Any] | None = None       # the scoring grid, why it was chosen, the body, the quantity
    waves: list[dict[str, Any]] | None = None     # per wave: first_shard, shards, primaries, uncertainty_percent
    uncertainty_target_met: bool | None = None    # None: no engine.target_uncertainty_percent
    shard_failures: int | None = None             # failed shard attempts, over every attempt of the job
    bundle_files: list[list[Any]] | None = None   # [name, bytes] of each file sealed into the bundle
    # the last `mcnode retry` of a job failed while RUNNING: {"kept_shards": K, "shards": N} (finished shards
    # re-attached, the sealed job folder reused) or {"resealed": why, "kept_shards": 0}
    retry: dict[str, Any] | None = None
    # outbox (MERGED → SENT)
    send_attempts: int | None = None
    last_send_error: str | None = None
    resent: int | None = None                     # times a person had the dose sent again (web page)
    # second check (SENT → VERIFIED)
    verdict: str | None = None                    # "pass" | "fail" | "inconclusive" (MC too noisy)
    gamma_pass_rates: dict[str, float] | None = None
    secondcheck_seconds: float | None = None
    report_pdf: str | None = None                 # where the report PDF went
    # retention (dicom_node.jobs.retention): when the job's files were removed
    purged: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PublicData:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in raw.items() if k in names},
                   extra={k: v for k, v in raw.items() if k not in names})

    def merged(self, patch: PublicData) -> PublicData:
        changes = {f.name: getattr(patch, f.name) for f in dataclasses.fields(patch)
                   if f.name != "extra" and getattr(patch, f.name) is not None}
        return dataclasses.replace(self, **changes, extra={**self.extra, **patch.extra})


@dataclass(frozen=True)
class Report:
    """The second-check report files."""

    html: str
    pdf: str


@dataclass
class JobData:
    """Everything the node keeps about a job besides its state (paths stay on the node)."""

    # assembler (READY): the received files the job is made of
    plan: str = ""
    structure_set: str | None = None
    ct: list[str] = field(default_factory=list)
    # pipeline (SEALED, MERGED)
    anonymized: list[str] = field(default_factory=list)   # file names in the job's anonymized/ folder
    rtdose: str = ""                                       # the re-identified MC RT Dose
    # outbox (SENT)
    sent_to: str = ""                                      # AE@host:port
    # any stage that fails a job: where, so `mcnode retry` knows where to go back to
    failed_in: JobState | None = None
    failed_step: str | None = None                         # "secondcheck" when the second check failed
    # second check (VERIFIED)
    tps_dose_uid: str = ""                                 # the TPS RT Dose last compared
    secondcheck: dict[str, Any] | None = None              # the comparison result (qa.compare)
    report: Report | None = None
    public: PublicData = field(default_factory=PublicData)
    extra: dict[str, Any] = field(default_factory=dict)    # keys this version does not know

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if f.name == "public":
                out["public"] = value.to_json()
            elif f.name == "report":
                out["report"] = None if value is None else {"html": value.html, "pdf": value.pdf}
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobData:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known: dict[str, Any] = {k: v for k, v in raw.items() if k in names}
        if "public" in known:
            known["public"] = PublicData.from_json(known["public"] or {})
        if known.get("report") is not None:
            known["report"] = Report(html=str(known["report"]["html"]), pdf=str(known["report"]["pdf"]))
        if known.get("failed_in") is not None:
            known["failed_in"] = JobState(known["failed_in"])
        for name in ("plan", "rtdose", "sent_to", "tps_dose_uid", "ct", "anonymized"):
            if known.get(name) is None:  # stored as null by an older node: the default
                known.pop(name, None)
        return cls(**known, extra={k: v for k, v in raw.items() if k not in names})

    def merged(self, patch: JobData, clear: tuple[str, ...] = ()) -> JobData:
        """This data with `patch` applied: fields the patch leaves at their default keep their value,
        `public` is merged field by field, and the fields named in `clear` go back to their default."""
        defaults = JobData()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("public", "extra"):
                continue
            value = getattr(patch, f.name)
            if f.name in clear:
                changes[f.name] = getattr(defaults, f.name)
            elif value != getattr(defaults, f.name):
                changes[f.name] = value
        return dataclasses.replace(self, **changes, public=self.public.merged(patch.public),
                                   extra={**self.extra, **patch.extra})


FIELDS = frozenset(f.name for f in dataclasses.fields(JobData)) - {"extra", "public"}

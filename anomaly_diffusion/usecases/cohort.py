"""`adiff explain` over a cohort: every study of a manifest or a folder, resumable, in one MLflow parent run.

A cohort is a dataset manifest (`data.manifest`, every row a study) or a folder of studies named
by channel patterns with `{id}` (`data.patterns`, as `data_prep/folder.py` takes them). Each
study is explained as `adiff explain` explains one scan (`usecases.explain.explain_study`, the
model loaded once per process) into its own folder, and tracked as a child run of the cohort's
parent run. The output folder OUT holds:

    OUT/<study>/...          the study's outputs (anomaly map, healthy counterfactual, montage, JSON)
    OUT/<study>/study.json   its record, written last and atomically: done or failed, the metrics,
                             the output files, the child run, the settings and the inputs' sizes
                             and times; OUT/<study>/error.txt holds the traceback of a failure
                             that is not a user error (a bug)
    OUT/cohort.csv           the summary table, most abnormal first (by max anomaly score)
    OUT/cohort.json          the cohort: parent run, settings, counts
    OUT/.adiff.lock          held while a cohort writes there (`folder_lock`)

Resuming: a study is complete when its record says done, every output it lists is there, it
was made with the same settings, and its inputs have not changed since; a rerun skips it and
says so. Outputs are atomic and the record comes last, so a study interrupted in any way
(kill -9 included) has no record or an old one and is explained again. A study whose outputs
are complete but whose child run is missing (tracking failed, or another parent run) is only
logged again. A failed study is retried. `overwrite` explains every study again under a new
parent run.

Under torchrun, rank 0 takes the folder's lock, reads the records and opens the parent run,
then every rank explains every world_size-th study still to do (each study once); rank 0 waits
for the others' records in OUT and writes the summary and the parent run's table.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from anomaly_diffusion.data.dicom import DicomSource, redact
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.data.patterns import find_subjects, pattern_regex, resolve_pattern
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.errors import AdiffError, InputError, NoSpaceError, OutputError, TrackingError
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.folder_lock import folder_lock
from anomaly_diffusion.tracking import (
    PARENT_RUN_TAG,
    end_running_children,
    failed_run,
    run_status,
    tracked_run,
)
from anomaly_diffusion.usecases.explain import (
    Explainer,
    ExplainOptions,
    ExplainRequest,
    counterfactual_params,
    explain_study,
    load_explainer,
    track_study,
)

RECORD = "study.json"
ERROR_LOG = "error.txt"
SUMMARY_CSV = "cohort.csv"
STATE = "cohort.json"
TABLE_ARTIFACT = "cohort_summary.json"
RECORD_FORMAT = "adiff-study"
RECORD_VERSION = 1
POLL_S = 0.5
"""How often rank 0 looks for the other ranks' records."""


@dataclass(frozen=True)
class ManifestCohort:
    """Every row of a dataset manifest, whatever its split (masks and brain masks from its columns)."""

    manifest: Path

    def describe(self) -> str:
        return f"manifest {self.manifest.name}"


@dataclass(frozen=True)
class FolderCohort:
    """The studies of a folder, found by channel patterns with `{id}` (one per model channel, in order)."""

    root: Path
    channels: tuple[str, ...]
    mask: str | None = None
    brainmask: str | None = None

    def describe(self) -> str:
        return f"folder {self.root.name} ({', '.join(self.channels)})"


CohortSource = ManifestCohort | FolderCohort


def cohort_source(
    inputs: Sequence[Path], channels: Sequence[str], mask: Path | None = None, brainmask: Path | None = None
) -> CohortSource | None:
    """What `adiff explain` was given: a cohort (a manifest, or a folder with channel patterns), or None for one scan.

    Raises:
        InputError: channel patterns without one folder, a manifest among other inputs or with
            --mask/--brainmask, a folder cohort's mask pattern without {id}, or a folder of NIfTI
            files without channel patterns.
    """
    manifests = [p for p in inputs if p.suffix.lower() == ".csv"]
    if channels:
        if len(inputs) != 1 or not inputs[0].is_dir():
            given = ", ".join(str(p) for p in inputs)
            raise InputError(f"--channel patterns need one folder of studies, got {given}")
        for pattern in (*channels, *(str(p) for p in (mask, brainmask) if p is not None)):
            pattern_regex(pattern)
        return FolderCohort(
            inputs[0], tuple(channels), str(mask) if mask else None, str(brainmask) if brainmask else None
        )
    if manifests:
        if len(inputs) != 1:
            raise InputError(f"{manifests[0]}: a manifest is explained on its own, not with other inputs")
        if mask is not None or brainmask is not None:
            raise InputError(f"{manifests[0]}: --mask and --brainmask come from the manifest's mask/brainmask columns")
        return ManifestCohort(manifests[0])
    if len(inputs) == 1 and inputs[0].is_dir() and _holds_nifti(inputs[0]):
        raise InputError(
            f"{inputs[0]}: a folder of NIfTI files, not a DICOM series; to explain each study in it, name the "
            "channel files with --channel, e.g. --channel '{id}_t1.nii.gz'"
        )
    return None


def _holds_nifti(folder: Path) -> bool:
    return any(folder.glob("*.nii*")) or any(folder.glob("*/*.nii*"))


@dataclass(frozen=True)
class Study:
    """One study of a cohort.

    Attributes:
        subject: its id (the user's pseudonym), the name of its output folder and child run.
        images: one file or DICOM folder per channel.
        problem: why it cannot be explained, known before reading it (a channel file missing).
    """

    subject: str
    images: tuple[Path, ...]
    mask: Path | None = None
    brainmask: Path | None = None
    problem: str | None = None


def _check_subjects(subjects: Sequence[str], where: Path) -> None:
    seen: set[str] = set()
    for s in subjects:
        if not s or s in (".", "..") or "/" in s or "\\" in s or s.startswith("."):
            raise InputError(f"{where}: subject {s!r} cannot name an output folder; rename it")
        if s in seen:
            raise InputError(f"{where}: subject {s!r} appears more than once; a cohort needs one row per study")
        seen.add(s)


def list_studies(source: CohortSource, out_dir: Path) -> list[Study]:
    """The studies of a cohort, in manifest order or sorted by subject id.

    Missing channel files are not an error here: that study is recorded as failed and the others go on.

    Raises:
        InputError: an unreadable manifest, no studies, a subject id that cannot name a folder, a
            subject twice.
    """
    if isinstance(source, ManifestCohort):
        rows = read_manifest(source.manifest, strict=False)
        studies = []
        for row in rows:
            missing = next((p for p in (*row.images, row.mask, row.brainmask) if p and not p.exists()), None)
            problem = f"{missing}: file not found" if missing else None
            studies.append(Study(row.subject, row.images, row.mask, row.brainmask, problem))
        _check_subjects([s.subject for s in studies], source.manifest)
        return studies
    root = source.root
    patterns = [*source.channels, *(p for p in (source.mask, source.brainmask) if p)]
    subjects = find_subjects(root, source.channels, exclude=out_dir)
    if not subjects:
        raise InputError(f"{root}: nothing matches {' or '.join(repr(p) for p in source.channels)}")
    _check_subjects(subjects, root)
    studies = []
    for subject in subjects:
        images = tuple(resolve_pattern(root, p, subject) for p in source.channels)
        mask = resolve_pattern(root, source.mask, subject) if source.mask else None
        brainmask = resolve_pattern(root, source.brainmask, subject) if source.brainmask else None
        problem = None
        for pattern, path in zip(patterns, (*images, mask, brainmask), strict=False):
            if path is not None and not path.exists():
                problem = f"{path}: not found (pattern {pattern!r})"
                break
        studies.append(Study(subject, images, mask, brainmask, problem))
    return studies


@dataclass(frozen=True, kw_only=True)
class CohortRequest(ExplainOptions):
    """A cohort to explain, with the model and method options of `ExplainOptions` (checked there).

    Attributes:
        source: the manifest or the folder with its channel patterns.
        out_dir: OUT, one folder per study in it.
        overwrite: explain every study again (under a new parent run), complete or not.
    """

    source: CohortSource

    @classmethod
    def like(cls, request: ExplainRequest, source: CohortSource) -> CohortRequest:
        """The cohort form of a one-scan request: its output folder, model and method options."""
        shared = {f.name: getattr(request, f.name) for f in fields(ExplainOptions)}
        return cls(source=source, **shared)


@dataclass(frozen=True)
class StudyRow:
    """One line of the summary table (NaN where a number does not apply: a failed study, no mask)."""

    study: str
    status: str
    p_healthy_before_min: float
    p_healthy_after_min: float
    anomaly_max: float
    anomaly_volume_ml: float
    peak_slice: float
    seconds: float
    pixel_auprc: float
    run_id: str
    error: str


def _silent(text: str) -> None:
    pass


@dataclass(frozen=True)
class CohortHooks:
    """What the terminal is told: lines (`say`), the bar over studies (done, total, current study), the bar
    over the current study's slices."""

    say: Callable[[str], None] = _silent
    studies: Callable[[int, int, str], None] | None = None
    slices: Callable[[int, int], None] | None = None


@dataclass(frozen=True)
class CohortOutcome:
    """A finished cohort: the table (most abnormal first, failed studies last), its files, the parent run.

    `explained`, `tracked` and `skipped` count this run's work: studies explained, studies whose
    earlier outputs were only logged, complete studies left alone.
    """

    parent_run_id: str
    rows: tuple[StudyRow, ...]
    outputs: dict[str, Path]
    explained: int
    tracked: int
    skipped: int
    seconds: float
    world_size: int

    @property
    def failed(self) -> tuple[StudyRow, ...]:
        return tuple(r for r in self.rows if r.status != "done")

    def raise_for_failures(self) -> None:
        """InputError, one line, if any study could not be explained (the command then exits 1)."""
        failed = [row.study for row in self.failed]
        if failed:
            listed = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            raise InputError(
                f"{len(failed)} of {len(self.rows)} studies could not be explained ({listed}); why is in "
                f"{self.outputs['table']}; rerun to try them again"
            )


@dataclass(frozen=True)
class _Plan:
    """Rank 0's decisions, broadcast to every rank."""

    studies: tuple[Study, ...]
    parent_run_id: str
    attempt: str
    todo: tuple[tuple[str, str], ...]  # (subject, 'explain' | 'track') in cohort order
    skipped: tuple[str, ...]


def _settings(explainer: Explainer) -> dict[str, Any]:
    """What a study's outputs depend on: a complete study made with other settings is not this cohort's."""
    s = explainer.settings
    threshold = "otsu" if explainer.threshold is None else explainer.threshold
    levels = list(dict.fromkeys(p.noise_level for p in explainer.plans))  # an ensemble's: '100+200'
    return {
        "noise_level": levels[0] if len(levels) == 1 else "+".join(str(level) for level in levels),
        "draws": len({p.seed for p in explainer.plans}),
        "decoding": s.decoding,
        "scale": s.scale,
        "steps": s.grid.steps,
        "guidance": s.guidance,
        "residual": s.residual,
        "encoding": s.encoding,
        "seed": s.seed,
        "threshold": threshold,
        "model": explainer.identity,
        **counterfactual_params(s),  # only where set: cohorts made before these options stay complete
    }


def _fingerprint(path: Path) -> list[int]:
    """(size, mtime_ns) of a file; of a DICOM folder, (files, total size, newest mtime_ns) of its files."""
    try:
        if path.is_dir():
            stats = [p.stat() for p in path.iterdir() if p.is_file()]
            return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return []


def _inputs(study: Study) -> dict[str, list[int]]:
    """Every input's fingerprint by absolute path (the same study from another working folder is the same)."""
    paths = (*study.images, study.mask, study.brainmask)
    return {str(p.resolve()): _fingerprint(p) for p in paths if p is not None}


def read_record(out_dir: Path, subject: str) -> dict[str, Any] | None:
    """A study's record, None if there is none (or it is not one of ours)."""
    path = out_dir / subject / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(record, dict) and record.get("format") == RECORD_FORMAT
    return record if ours and record.get("version") == RECORD_VERSION else None


def _write_record(out_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_bytes(json.dumps(record, indent=2).encode(), out_dir / record["study"] / RECORD)


def _complete(record: dict[str, Any] | None, study: Study, out_dir: Path) -> str | None:
    """Why a study must be explained again (None: its outputs are complete)."""
    if record is None:
        return "not explained yet"
    if record.get("status") != "done":
        return "failed before"
    if record.get("inputs") != _inputs(study):
        return "its inputs changed"
    missing = [n for n in record.get("outputs", {}).values() if not (out_dir / study.subject / n).exists()]
    return f"{missing[0]} is missing" if missing else None


def _plan(request: CohortRequest, explainer: Explainer, studies: list[Study], say: Callable[[str], None]) -> _Plan:
    """Rank 0: which studies to explain, to log again or to skip, and the parent run (reopened or new)."""
    r = request
    settings = _settings(explainer)
    records = {s.subject: read_record(r.out_dir, s.subject) for s in studies}
    if r.overwrite:
        for s in studies:
            (r.out_dir / s.subject / RECORD).unlink(missing_ok=True)  # an interrupted overwrite must not skip
        records = dict.fromkeys(records)
    for s in studies:
        record = records[s.subject]
        if record is not None and record.get("status") == "done" and record.get("settings") != settings:
            before = record.get("settings") or {}
            changed = next(k for k in settings if before.get(k) != settings[k])
            raise OutputError(
                f"{r.out_dir}: holds studies explained with {changed}={before.get(changed)!r} (e.g. {s.subject}), "
                f"this run uses {settings[changed]!r}; pass --overwrite to explain them again or choose another --out"
            )
    parent_id = _previous_parent(r, settings, say)
    todo: list[tuple[str, str]] = []
    skipped, redone, retried, relogged = [], [], [], []
    for s in studies:
        record = records[s.subject]
        why = _complete(record, s, r.out_dir)
        if why is None and record is not None:
            if parent_id is not None and record.get("parent_run_id") == parent_id and record.get("run_id"):
                skipped.append(s.subject)
            else:
                todo.append((s.subject, "track"))
                relogged.append(s.subject)
            continue
        todo.append((s.subject, "explain"))
        if why == "failed before":
            retried.append(s.subject)
        elif record is not None or ((r.out_dir / s.subject).is_dir() and not r.overwrite):
            redone.append(f"{s.subject} ({why if record is not None else 'left incomplete'})")
    _say_list(say, skipped, "already complete in the output folder, skipped (--overwrite explains them again)")
    _say_list(say, relogged, "explained before, only logged into this cohort's MLflow run")
    _say_list(say, retried, "failed before, tried again")
    _say_list(say, redone, "explained again")
    placeholder = parent_id or ""
    return _Plan(tuple(studies), placeholder, uuid.uuid4().hex, tuple(todo), tuple(skipped))


def _say_list(say: Callable[[str], None], subjects: Sequence[str], what: str, shown: int = 8) -> None:
    if subjects:
        more = f" and {len(subjects) - shown} more" if len(subjects) > shown else ""
        noun = "study" if len(subjects) == 1 else "studies"
        say(f"{len(subjects)} {noun} {what}: {', '.join(subjects[:shown])}{more}")


def _previous_parent(request: CohortRequest, settings: dict[str, Any], say: Callable[[str], None]) -> str | None:
    """The parent run an earlier cohort into this folder left in this store, to reopen (None: make one)."""
    try:
        state = json.loads((request.out_dir / STATE).read_text())
    except (OSError, ValueError):
        return None
    previous = state.get("parent_run_id") if isinstance(state, dict) else None
    if not previous or request.overwrite:
        return None
    if state.get("source") != request.source.describe() or state.get("settings") != settings:
        say(
            f"note: {request.out_dir} held a cohort of {state.get('source')} made with other settings; this one gets "
            "its own MLflow run"
        )
        return None
    if state.get("tracking_uri") == request.tracking_uri and run_status(request.tracking_uri, previous):
        return str(previous)
    say(f"note: the cohort's earlier MLflow run {previous} is not in {request.tracking_uri}; starting a new one")
    return None


def _clear_leftovers(folder: Path) -> None:
    """Remove what interrupted atomic writes left in a study's folder: hidden temporary files and folders
    (`files.atomic_write`, `atomic_write_folder`); nothing else there starts with a dot."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith("."):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, AdiffError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def dicom_identifiers(paths: Sequence[Path | None], max_files: int = 2000) -> tuple[str, ...]:
    """The patient identifiers in the headers of the DICOM inputs among `paths` (files, or folders of files),
    read without pixel data; for a study that failed before its scan was read (best effort)."""
    import pydicom

    datasets = []
    for path in (p for p in paths if p is not None):
        files = sorted(path.iterdir())[:max_files] if path.is_dir() else [path]
        for file in files:
            if file.is_file() and not file.name.startswith("."):
                with suppress(Exception):  # not DICOM, unreadable: nothing to redact from it
                    datasets.append(pydicom.dcmread(file, stop_before_pixels=True))
    return DicomSource(tuple(datasets), (), False).identifiers() if datasets else ()


def public_name(subject: str, identifiers: Sequence[str]) -> str:
    """The study's name in MLflow: its id, or a hash of it when the id holds a patient identifier (a DICOM
    folder named after the patient)."""
    if redact(subject, identifiers) == subject:
        return subject
    return f"study-{hashlib.sha256(subject.encode()).hexdigest()[:10]}"


def _explain_one(
    explainer: Explainer, study: Study, request: CohortRequest, plan: _Plan, hooks: CohortHooks, rank: int = 0
) -> dict[str, Any]:
    """Explain one study into OUT/<study>, track it as a child run, write its record; a failure is recorded."""
    r = request
    folder = r.out_dir / study.subject
    _clear_leftovers(folder)
    started_at, started = time.time(), time.perf_counter()
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "study": study.subject,
        "attempt": plan.attempt,
        "rank": rank,
        "parent_run_id": plan.parent_run_id,
        "run_id": None,
        "settings": _settings(explainer),
        "inputs": _inputs(study),
        "started_at": started_at,
    }
    error = study.problem
    result = None
    full: NoSpaceError | None = None
    if error is None:

        def say(text: str) -> None:
            hooks.say(f"{study.subject}: {text}")

        try:
            result = explain_study(
                explainer,
                study.images,
                folder,
                study.mask,
                study.brainmask,
                True,
                hooks.slices,
                say,
                compute=False,
                review_slices=r.review_slices,
            )
        except (KeyboardInterrupt, TrackingError):
            raise
        except Exception as exc:  # a study's failure is recorded; the cohort goes on (unless the disk is full)
            error = _one_line(exc)
            full = exc if isinstance(exc, NoSpaceError) else None
            if not isinstance(exc, AdiffError):  # a bug: keep the traceback beside the record
                atomic_write_bytes(traceback.format_exc().encode(), folder / ERROR_LOG)
    record["seconds"] = time.perf_counter() - started
    if result is None:
        identifiers = dicom_identifiers([*study.images, study.mask, study.brainmask])
        name = public_name(study.subject, identifiers)
        error = redact(error or "unknown error", identifiers)
        record.update(status="failed", name=name, error=error, outputs={}, private=[], metrics={}, params={})
        _write_record(r.out_dir, record)
        note = f"Could not explain study `{name}`: {error}"
        experiment = explainer.bundle.config.tracking.experiment
        tags = {PARENT_RUN_TAG: plan.parent_run_id, "adiff.study": name}
        record["run_id"] = failed_run(r.tracking_uri, experiment, name, "explain", tags, note, started_at)
        _write_record(r.out_dir, record)
        if full is not None:  # every further study would fail the same way: stop; a rerun retries this one
            raise full
        hooks.say(f"{study.subject}: failed: {error}")
        return record
    (folder / ERROR_LOG).unlink(missing_ok=True)
    name = public_name(study.subject, result.identifiers)
    record.update(
        status="done",
        name=name,
        error="",
        outputs={k: p.name for k, p in result.outputs.items()},
        private=list(result.private),
        metrics=result.metrics,
        params=result.params,
    )
    _write_record(r.out_dir, record)  # complete but not tracked: a rerun only logs it
    tags = {PARENT_RUN_TAG: plan.parent_run_id, "adiff.study": name}
    record["run_id"] = track_study(
        r.tracking_uri, explainer, name, result.params, result.metrics, result.logged, tags, started_at, result.review
    )
    _write_record(r.out_dir, record)
    m = result.metrics
    hooks.say(
        f"{study.subject}: done in {record['seconds']:.0f} s (max anomaly score {m['anomaly_max']:.3f}, "
        f"{m['anomaly_volume_ml']:.2f} mL)"
    )
    return record


def _track_one(
    explainer: Explainer, study: Study, request: CohortRequest, plan: _Plan, rank: int = 0
) -> dict[str, Any]:
    """Log a study whose outputs are complete as a child run of this cohort's parent (nothing is recomputed)."""
    record = read_record(request.out_dir, study.subject)
    assert record is not None
    folder = request.out_dir / study.subject
    private = set(record.get("private", []))
    logged = {k: folder / n for k, n in record["outputs"].items() if k not in private}
    name = str(record.get("name") or study.subject)
    tags = {PARENT_RUN_TAG: plan.parent_run_id, "adiff.study": name}
    record["run_id"] = track_study(
        request.tracking_uri,
        explainer,
        name,
        record["params"],
        record["metrics"],
        logged,
        tags,
        record.get("started_at"),
    )
    record.update(attempt=plan.attempt, rank=rank, parent_run_id=plan.parent_run_id)
    _write_record(request.out_dir, record)
    return record


def _work(explainer: Explainer, request: CohortRequest, plan: _Plan, context: DistContext, hooks: CohortHooks) -> None:
    """This rank's share of the studies to do."""
    by_subject = {s.subject: s for s in plan.studies}
    mine = context.shard_list(list(plan.todo))
    for i, (subject, action) in enumerate(mine):
        if hooks.studies is not None:  # under torchrun, count the other ranks' studies too
            done = _finished(request.out_dir, plan) if context.active else i
            hooks.studies(done, len(plan.todo), subject)
        if action == "explain":
            _explain_one(explainer, by_subject[subject], request, plan, hooks, context.rank)
        else:
            _track_one(explainer, by_subject[subject], request, plan, context.rank)


def _finished(out_dir: Path, plan: _Plan) -> int:
    """How many of the studies to do have a record of this run (by any rank)."""
    return sum(1 for s, _ in plan.todo if (read_record(out_dir, s) or {}).get("attempt") == plan.attempt)


def _wait_for_others(request: CohortRequest, plan: _Plan, hooks: CohortHooks) -> None:
    """Rank 0: wait until every study to do has a record of this run (a rank that fails ends the job)."""
    while (done := _finished(request.out_dir, plan)) < len(plan.todo):
        if hooks.studies is not None:
            hooks.studies(done, len(plan.todo), "waiting for the other processes")
        time.sleep(POLL_S)
    if hooks.studies is not None:
        hooks.studies(len(plan.todo), len(plan.todo), "")


def _row(study: Study, record: dict[str, Any] | None) -> StudyRow:
    nan = float("nan")
    if record is None:
        return StudyRow(study.subject, "failed", nan, nan, nan, nan, nan, nan, nan, "", "no record was written")
    m = record.get("metrics", {})
    return StudyRow(
        study=study.subject,
        status=str(record.get("status")),
        p_healthy_before_min=float(m.get("p_healthy_before_min", nan)),
        p_healthy_after_min=float(m.get("p_healthy_after_min", nan)),
        anomaly_max=float(m.get("anomaly_max", nan)),
        anomaly_volume_ml=float(m.get("anomaly_volume_ml", nan)),
        peak_slice=float(m.get("anomaly_peak_slice", nan)),
        seconds=float(record.get("seconds", nan)),
        pixel_auprc=float(m.get("pixel_auprc", nan)),
        run_id=str(record.get("run_id") or ""),
        error=str(record.get("error") or ""),
    )


def most_abnormal_first(rows: Sequence[StudyRow]) -> list[StudyRow]:
    """Done studies by max anomaly score (highest first; ties: lowest p(healthy) first), failed ones last."""

    def key(row: StudyRow) -> tuple[int, float, float, str]:
        score = -row.anomaly_max if math.isfinite(row.anomaly_max) else math.inf
        p = row.p_healthy_before_min if math.isfinite(row.p_healthy_before_min) else math.inf
        return (row.status != "done", score, p, row.study)

    return sorted(rows, key=key)


def _cell(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


COLUMNS = tuple(f.name for f in fields(StudyRow))


def summary_csv(rows: Sequence[StudyRow]) -> str:
    """The summary table as CSV text (empty cells where a number does not apply)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(getattr(row, c), 6) for c in COLUMNS])
    return text.getvalue()


def _markdown(rows: Sequence[StudyRow], source: str, shown: int = 20) -> str:
    done = sum(r.status == "done" for r in rows)
    lines = [
        f"Cohort explain of {source}: {len(rows)} studies, {done} explained, {len(rows) - done} failed.",
        "",
        "Most abnormal first (by max anomaly score); every study's row is in `cohort.csv`.",
        "",
        "| study | status | p(healthy) before (min) | after (min) | max score | volume (mL) | peak slice | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows[:shown]:
        cells = [
            r.study,
            r.status,
            *(_cell(v) for v in (r.p_healthy_before_min, r.p_healthy_after_min)),
            _cell(r.anomaly_max),
            _cell(r.anomaly_volume_ml),
            _cell(r.peak_slice),
            r.error.replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > shown:
        lines.append(f"\n... and {len(rows) - shown} more")
    return "\n".join(lines)


def _write_state(request: CohortRequest, explainer: Explainer, plan: _Plan, **extra: Any) -> Path:
    state = {
        "format": "adiff-cohort",
        "source": request.source.describe(),
        "tracking_uri": request.tracking_uri,
        "parent_run_id": plan.parent_run_id,
        "settings": _settings(explainer),
        "studies": [s.subject for s in plan.studies],
        **extra,
    }
    return atomic_write_bytes(json.dumps(state, indent=2).encode(), request.out_dir / STATE)


def run_cohort(
    request: CohortRequest, hooks: CohortHooks | None = None, context: DistContext = SINGLE
) -> CohortOutcome | None:
    """Explain every study of a cohort into OUT/<study>, resumably; summary table and MLflow parent run.

    Under torchrun (`context`) the ranks share the studies; rank 0 alone plans, waits for the
    others and writes the summary, and returns the outcome; other ranks return None.

    Raises:
        InputError: the cohort cannot be read; OutputError: another run holds the output folder,
            or it holds a cohort made with other settings; TrackingError: the MLflow store
            cannot be used (a store locked by another writer included: the studies done so far
            are kept and a rerun resumes). A study that cannot be explained is not an error here:
            its row says why.
    """
    hooks = hooks or CohortHooks()
    started = time.perf_counter()
    started_at = time.time()
    r = request
    if not context.is_main:
        shared = context.broadcast(None)
        if not isinstance(shared, _Plan):
            return None  # rank 0 could not start the cohort and says why
        _work(load_explainer(r), r, shared, context, CohortHooks(say=hooks.say, slices=None))
        return None
    with ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(r.out_dir, "adiff explain cohort", hooks.say))
            studies = list_studies(r.source, r.out_dir)
            explainer = load_explainer(r)
            plan = _plan(r, explainer, studies, hooks.say)
            parent = stack.enter_context(
                tracked_run(
                    r.tracking_uri,
                    explainer.bundle.config.tracking.experiment,
                    f"cohort-{_source_name(r.source)}",
                    "explain-cohort",
                    explainer.tags(),
                    resume_run_id=plan.parent_run_id or None,
                    started_at=started_at,
                )
            )
            new = not plan.parent_run_id
            if not new:
                ended = end_running_children(r.tracking_uri, plan.parent_run_id)
                if ended:
                    hooks.say(f"note: {ended} child run(s) left running by an interrupted cohort marked KILLED")
            else:
                plan = _Plan(plan.studies, parent.run_id, plan.attempt, plan.todo, plan.skipped)
            _write_state(r, explainer, plan)
        except AdiffError as exc:
            context.broadcast(str(exc))
            raise
        context.broadcast(plan)
        hooks.say(explainer.compute + (f" x {context.world_size} processes" if context.active else ""))
        _work(explainer, r, plan, context, hooks)
        _wait_for_others(r, plan, hooks)
        records = {s.subject: read_record(r.out_dir, s.subject) for s in plan.studies}
        rows = most_abnormal_first([_row(s, records[s.subject]) for s in plan.studies])
        # MLflow gets each study under its public name (`public_name`), never a patient identifier
        names = {s: str((record or {}).get("name") or s) for s, record in records.items()}
        public = [replace(row, study=names[row.study]) for row in rows]
        outputs = {"table": r.out_dir / SUMMARY_CSV, "state": r.out_dir / STATE}
        atomic_write_bytes(summary_csv(rows).encode(), outputs["table"])
        explained = sum(1 for _, action in plan.todo if action == "explain")
        seconds = time.perf_counter() - started
        failed = sum(row.status != "done" for row in rows)
        _write_state(r, explainer, plan, done=len(rows) - failed, failed=failed, finished_at=time.time())
        _log_parent(parent, r, explainer, public, explained, seconds, context, new)
    return CohortOutcome(
        parent.run_id,
        tuple(rows),
        outputs,
        explained,
        len(plan.todo) - explained,
        len(plan.skipped),
        seconds,
        context.world_size,
    )


def _source_name(source: CohortSource) -> str:
    return source.manifest.stem if isinstance(source, ManifestCohort) else source.root.name


def _log_parent(
    parent: Any,
    request: CohortRequest,
    explainer: Explainer,
    rows: Sequence[StudyRow],
    explained: int,
    seconds: float,
    context: DistContext,
    new: bool,
) -> None:
    """The cohort's summary into its parent run: table, CSV, counts and a description (params if it is new)."""
    failed = sum(r.status != "done" for r in rows)
    if new:  # a reopened run has them: the same source and settings (`_previous_parent`); params cannot change
        params: dict[str, object] = {
            "source": request.source.describe(),
            "checkpoint": explainer.bundle_name,
            **{k: v for k, v in _settings(explainer).items() if k != "model"},
            "model": explainer.model_ref or "",
        }
        parent.log_params(params)
    metrics = {
        "studies": float(len(rows)),
        "studies_done": float(len(rows) - failed),
        "studies_failed": float(failed),
    }
    if explained:
        metrics["studies_per_hour"] = explained / seconds * 3600
    parent.log_metrics(metrics)
    parent.log_table({c: [getattr(r, c) for r in rows] for c in COLUMNS}, TABLE_ARTIFACT)
    with tempfile.TemporaryDirectory(prefix="adiff-cohort-") as folder:
        parent.log_artifact(atomic_write_bytes(summary_csv(rows).encode(), Path(folder) / SUMMARY_CSV))
    description = _markdown(rows, request.source.describe())
    parent.set_tags(
        {
            "mlflow.note.content": description,
            "adiff.studies_failed": failed,
            "adiff.world_size": context.world_size,
            "adiff.precision": explainer.precision,
        }
    )

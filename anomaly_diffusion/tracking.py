"""MLflow tracking: the only module that imports mlflow.

Runs are created through `MlflowClient` (no global active run): `tracked_run` opens a run, hands
out a `RunLogger`, and closes it FINISHED, or FAILED (or KILLED on Ctrl-C) if the body raises.
The use cases depend only on the `RunLogger` protocol; `MlflowRunLogger` is MLflow behind it.
The default store is a local SQLite file with artifacts in a folder beside it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from anomaly_diffusion import __version__
from anomaly_diffusion.errors import NoSpaceError, TrackingError
from anomaly_diffusion.files import no_space

if TYPE_CHECKING:
    import numpy as np

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
_SQLITE = "sqlite:///"
LOCK_PATIENCE_S = 30.0
"""How long a call waits for a SQLite store that another writer holds locked before giving up."""
PARENT_RUN_TAG = "mlflow.parentRunId"
"""The tag that nests a run under another in the MLflow UI."""


def _quiet_mlflow_loggers() -> None:
    for name in ("alembic", "mlflow.tracking.fluent"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # it logs a traceback for each database error before raising it, which `_Patient` reports as one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc)


SQLITE_NO_SPACE = {"database or disk is full": errno.ENOSPC, "attempt to write a readonly database": errno.EROFS}
"""SQLite's messages for a store it cannot write for want of space or a writable file system."""


def _no_space(uri: str, exc: BaseException) -> NoSpaceError | None:
    """A SQLite store's 'database or disk is full' (or read-only) as the one line of a full disk, naming its folder."""
    if not uri.startswith(_SQLITE):
        return None
    code = next((code for text, code in SQLITE_NO_SPACE.items() if text in str(exc)), None)
    if code is None:
        return None
    folder = Path(uri[len(_SQLITE) :]).expanduser().resolve().parent
    return no_space(OSError(code, os.strerror(code)), folder)


def _patiently(uri: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), tried again while the SQLite store is locked by another writer (see `_Patient`);
    a store on a full disk is one `NoSpaceError` line."""
    started = time.monotonic()
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            waited = time.monotonic() - started
            full = _no_space(uri, exc)
            if full is not None:
                raise full from exc
            if not _is_locked(exc):
                raise
            if waited >= LOCK_PATIENCE_S:
                raise TrackingError(
                    f"MLflow store {uri} is locked by another writer (database is locked; waited {waited:.0f} s); "
                    "retry when it is free"
                ) from exc
            time.sleep(min(1.0, LOCK_PATIENCE_S - waited))


class _Patient:
    """An MlflowClient whose calls wait out a SQLite store locked by another writer.

    SQLite gives up on a lock after its busy timeout (5 s); a call that fails so is tried again
    until `LOCK_PATIENCE_S` has passed, then raises one `TrackingError` line. A locked SQLite
    transaction is rolled back, so trying a call again never does it twice.
    """

    def __init__(self, client: Any, uri: str) -> None:
        self._client = client
        self._uri = uri

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), tried again while the store is locked."""
        return _patiently(self._uri, fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute
        return lambda *args, **kwargs: self.call(attribute, *args, **kwargs)


def artifact_root_for(uri: str) -> str | None:
    """For a SQLite store, the artifact folder beside the database file (as a file URI)."""
    if uri.startswith(_SQLITE):
        db = Path(uri[len(_SQLITE) :]).expanduser().resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _missing_sqlite(uri: str) -> bool:
    """Whether `uri` is a SQLite store whose file does not exist yet (opening it would create it)."""
    return uri.startswith(_SQLITE) and not Path(uri[len(_SQLITE) :]).expanduser().is_file()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'section.key': 'value'} for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


class RunLogger(Protocol):
    """What a use case logs into its tracked run."""

    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite metric values at a step."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Store a dict as a JSON or YAML artifact."""

    def log_text(self, text: str, name: str) -> None:
        """Store text as an artifact."""

    def log_table(self, columns: Mapping[str, Sequence[Any]], name: str) -> str:
        """Store a table (the run page's table view), replacing one of that name; returns the name used."""

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Log an (H, W) grey or (H, W, 3) RGB uint8 image as step `step` of the image series `key`."""


class MlflowRunLogger:
    """Logging into one MLflow run (a `RunLogger`)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values become strings, cut to MLflow's length limit)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite metric values at a step."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Store a dict as a JSON or YAML artifact (by the file name's extension)."""
        self._client.log_dict(self.run_id, dict(data), name)

    def log_text(self, text: str, name: str) -> None:
        """Store text as an artifact."""
        self._client.log_text(self.run_id, text, name)

    def log_table(self, columns: Mapping[str, Sequence[Any]], name: str) -> str:
        """Store a table with `MlflowClient.log_table`, replacing an earlier one of that name.

        `log_table` appends to an existing table; a resumed run's table is deleted first where the
        artifact store can delete, else the table goes to 'NAME-2.json', 'NAME-3.json', ...
        Returns the artifact name used.
        """
        listed = {a.path for a in self._client.list_artifacts(self.run_id)}
        chosen, stem, n = name, name.removesuffix(".json"), 1
        if chosen in listed:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            run = self._client.get_run(self.run_id)
            with contextlib.suppress(Exception):  # stores that cannot delete are handled below
                get_artifact_repository(run.info.artifact_uri).delete_artifacts(chosen)
            listed = {a.path for a in self._client.list_artifacts(self.run_id)}
        while chosen in listed:
            n += 1
            chosen = f"{stem}-{n}.json"
        self._client.log_table(self.run_id, data={k: list(v) for k, v in columns.items()}, artifact_file=chosen)
        return chosen

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        """Log an image as step `step` of the series `key`: the run page's Model metrics tab shows one
        chart per key with a step slider (and the image full size on click)."""
        self._client.log_image(self.run_id, image, key=key, step=step, synchronous=True)


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) store, fail fast when nothing listens (MLflow itself retries for minutes)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({exc.strerror or exc.__class__.__name__}); "
            "start it, fix --tracking-uri, or pass --local-tracking to log to the local SQLite store"
        ) from exc


def make_client(uri: str) -> Any:
    """An MlflowClient for `uri`, checked to answer; TrackingError with one line otherwise."""
    _quiet_mlflow_loggers()
    _check_reachable(uri)
    from mlflow.tracking import MlflowClient

    try:
        client = _Patient(_patiently(uri, MlflowClient, tracking_uri=uri), uri)
        client.search_experiments(max_results=1)
    except (TrackingError, NoSpaceError):
        raise
    except Exception as exc:  # MLflow raises many kinds: report them as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used: {first}") from exc
    return client


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's experiment kind for model training (the alternative is 'genai_development').

UIs that read the tag open the experiment in the model-training view (runs, metrics, images)
instead of the GenAI one (traces, "Evaluation runs"). MLflow 3.17's own UI ignores it and follows
its sidebar switch, which `?workflowType=machine_learning` in the URL sets (`ui_url`)."""


def _experiment_id(client: Any, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older adiff: declare it (never override)
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(experiment.experiment_id)
    return str(
        client.create_experiment(
            name, artifact_location=artifact_root_for(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    )


def git_commit(path: Path) -> str | None:
    """The git commit of the folder holding the package, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@contextmanager
def tracked_run(
    uri: str,
    experiment: str,
    run_name: str,
    kind: str,
    tags: Mapping[str, Any] | None = None,
    resume_run_id: str | None = None,
    started_at: float | None = None,
) -> Iterator[RunLogger]:
    """Open an MLflow run (or reopen `resume_run_id`); it ends FINISHED, or FAILED/KILLED if the body raises.

    `started_at` (seconds since the epoch) backdates a new run's start, for work done before the
    run is opened (explain and evaluate open theirs once their outputs exist), so the run's
    duration in the UI is the work's.
    """
    client = make_client(uri)
    if resume_run_id is not None:
        try:
            existing = client.get_run(resume_run_id)
        except Exception as exc:  # MLflow raises its own exception types for unknown runs
            raise TrackingError(f"MLflow run {resume_run_id} to resume is not in {uri}") from exc
        client.update_run(resume_run_id, status="RUNNING")
        logger = MlflowRunLogger(client, resume_run_id, existing.info.experiment_id)
    else:
        experiment_id = _experiment_id(client, uri, experiment)
        all_tags = {"adiff.kind": kind, "adiff.version": __version__, **(tags or {})}
        commit = git_commit(Path(__file__).parent)
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        start_time = None if started_at is None else int(started_at * 1000)
        run = client.create_run(
            experiment_id, start_time=start_time, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
        )
        logger = MlflowRunLogger(client, run.info.run_id, experiment_id)
    try:
        yield logger
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):  # the interruption is what the user must see
            client.set_terminated(logger.run_id, status="KILLED")
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # e.g. a locked store: the first error is the one to report
            client.set_terminated(logger.run_id, status="FAILED")
        raise
    client.set_terminated(logger.run_id, status="FINISHED")


def failed_run(
    uri: str, experiment: str, run_name: str, kind: str, tags: Mapping[str, Any], note: str, started_at: float
) -> str:
    """A run that records work which failed (status FAILED, the error as its description); returns its id."""
    client = make_client(uri)
    experiment_id = _experiment_id(client, uri, experiment)
    all_tags = {"adiff.kind": kind, "adiff.version": __version__, **tags, "mlflow.note.content": note}
    run = client.create_run(
        experiment_id,
        start_time=int(started_at * 1000),
        run_name=run_name,
        tags={k: str(v) for k, v in all_tags.items()},
    )
    client.set_terminated(run.info.run_id, status="FAILED")
    return str(run.info.run_id)


def run_status(uri: str, run_id: str) -> str | None:
    """A run's status (RUNNING, FINISHED, ...), None if the store has no such (undeleted) run."""
    client = make_client(uri)
    try:
        run = client.get_run(run_id)
    except (TrackingError, NoSpaceError):
        raise
    except Exception:  # MLflow raises its own exception types for unknown runs
        return None
    return None if run.info.lifecycle_stage == "deleted" else str(run.info.status)


def end_running_children(uri: str, parent_run_id: str, keep: Collection[str] = ()) -> int:
    """Mark the still RUNNING child runs of a parent KILLED (left by a process that was killed); returns how many.

    Runs in `keep` are left alone.
    """
    client = make_client(uri)
    parent = client.get_run(parent_run_id)
    found = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=10000,
    )
    ended = 0
    for run in found:
        if run.info.run_id not in keep:
            client.set_terminated(run.info.run_id, status="KILLED")
            ended += 1
    return ended


MODELS_PREFIX = "models:/"


def register_model(uri: str, run_id: str, name: str, alias: str | None = None) -> str:
    """Register the bundle logged under the run's `model/` artifacts as a new version of `name`."""
    client = make_client(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(f"MLflow run {run_id} is not in {uri}") from exc
    names = [a.path for a in client.list_artifacts(run_id, "model")]
    if "model/bundle.pt" not in names:
        raise TrackingError(f"MLflow run {run_id} has no model/bundle.pt to register (is it a training run?)")
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(
            name, description="anomaly_diffusion model bundle (DDPM + noise-aware classifier)"
        )
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def fetch_registered_bundle(uri: str, model_uri: str, folder: Path) -> tuple[Path, str]:
    """Download `models:/NAME/VERSION` or `models:/NAME@ALIAS` into folder; (bundle path, 'NAME/VERSION')."""
    client = make_client(uri)
    reference = model_uri[len(MODELS_PREFIX) :]
    name, _, version = reference.partition("/")
    try:
        if "@" in reference and not version:
            name, alias = reference.split("@", 1)
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
        from mlflow.artifacts import download_artifacts

        local = download_artifacts(artifact_uri=found.source, dst_path=str(folder), tracking_uri=uri)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise TrackingError(f"{model_uri}: not found in the registry of {uri} ({first[:200]})") from exc
    bundle = Path(local) / "bundle.pt"
    if not bundle.is_file():
        raise TrackingError(f"{model_uri}: the registered artifacts hold no bundle.pt")
    return bundle, f"{found.name}/{found.version}"


@dataclass(frozen=True)
class TrainedBundle:
    """The bundle of a finished training run in a tracking store.

    Attributes:
        path: the bundle file (in the store's own artifact folder when it is local, else downloaded).
        run_id, run_name: the training run.
        finished: its end time, seconds since the epoch.
    """

    path: Path
    run_id: str
    run_name: str
    finished: float


BUNDLE_ARTIFACT = "model/bundle.pt"


def _local_artifact(artifact_uri: str, relative: str) -> Path | None:
    """A run artifact's file path when the artifact store is a local folder, else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path)) / relative
    return Path(artifact_uri) / relative if parsed.scheme == "" else None


def newest_trained_bundle(uri: str, folder: Path, candidates: int = 20) -> TrainedBundle | None:
    """The newest FINISHED training run (tag adiff.kind=train) of any active experiment whose bundle
    artifact exists; remote artifacts are downloaded into `folder`. None when there is none, or when
    `uri` is a SQLite file that does not exist yet (the lookup never creates a store)."""
    if _missing_sqlite(uri):
        return None
    client = make_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string="tags.`adiff.kind` = 'train' AND attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=candidates,
    )
    for run in runs:
        local = _local_artifact(run.info.artifact_uri, BUNDLE_ARTIFACT)
        if local is not None:
            if not local.is_file():
                continue
            path = local
        else:
            if BUNDLE_ARTIFACT not in {a.path for a in client.list_artifacts(run.info.run_id, "model")}:
                continue
            path = Path(client.download_artifacts(run.info.run_id, BUNDLE_ARTIFACT, str(folder)))
        return TrainedBundle(path, run.info.run_id, run.info.run_name, (run.info.end_time or 0) / 1000)
    return None


def ui_url(base: str, uri: str, experiment: str) -> str:
    """Where `adiff ui` sends people: the experiment's runs in MLflow's model-training view, when the
    store has it (else the UI's home page)."""
    if _missing_sqlite(uri):
        return base
    try:
        found = make_client(uri).get_experiment_by_name(experiment)
    except (TrackingError, NoSpaceError):
        found = None
    if found is None or found.lifecycle_stage == "deleted":
        return base
    return f"{base}/#/experiments/{found.experiment_id}?workflowType=machine_learning"


def free_port(start: int, host: str = "127.0.0.1", tries: int = 50) -> int:
    """The first port >= start that can be bound on host."""
    for port in range(start, start + tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise TrackingError(f"no free port in {start}..{start + tries - 1} on {host}")


def start_ui(uri: str, host: str, port: int) -> subprocess.Popen[bytes]:
    """Start `mlflow ui` for the store, lean (one worker, no job runner)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host]
    command += ["--port", str(port), "--workers", "1"]
    root = artifact_root_for(uri)
    if root:
        command += ["--default-artifact-root", root]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # its own process group, so that `stop_ui` ends mlflow's uvicorn workers with it
    return subprocess.Popen(command, env=env, start_new_session=True)


def stop_ui(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a `start_ui` server and every process it started: SIGTERM to its group, SIGKILL to what is
    left of the group after `timeout` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)  # anyone of the group left?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()

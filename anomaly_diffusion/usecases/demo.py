"""`adiff demo`: build the synthetic MNI152 dataset, train on it, explain a held-out lesioned subject."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomaly_diffusion.config import Config, config_from_dict, load_config
from anomaly_diffusion.data.lesions import LESION_KINDS
from anomaly_diffusion.data.manifest import ManifestRow, read_manifest
from anomaly_diffusion.data.synthetic import build_demo_dataset, read_lesion_kinds
from anomaly_diffusion.tracking import DEFAULT_TRACKING_URI
from anomaly_diffusion.training.loops import PhaseProgress
from anomaly_diffusion.usecases.common import packaged_config, timestamped
from anomaly_diffusion.usecases.explain import ExplainOutcome, ExplainRequest, run_explain
from anomaly_diffusion.usecases.train import DataSummary, TrainOutcome, run_train


def demo_config(manifest: Path, output_dir: Path, overrides: list[str] | None = None) -> Config:
    """The packaged demo config pointed at a built demo dataset."""
    base = load_config(packaged_config("demo")).model_dump(mode="json")
    base["data"]["manifest"] = str(manifest)
    base["train"]["output_dir"] = str(output_dir)
    return config_from_dict(base, overrides, source="demo config")


DEMO_LESION_KINDS = ("grey", "bright")
"""The demo's two cases: one raw intensity cannot find (out of place), one it can (out of range)."""


@dataclass(frozen=True)
class DemoCase:
    """One explained held-out subject: its lesion kind (`data.lesions.LESION_KINDS`) and outcome."""

    kind: str
    subject: str
    explained: ExplainOutcome


@dataclass(frozen=True)
class DemoOutcome:
    """The demo's training run, its explained test subjects, its tracking store and its wall time.

    `next_command` is an `adiff explain` command line (argv) for another held-out subject with the
    demo's model and store, runnable from the current folder.
    """

    tracking_uri: str
    trained: TrainOutcome
    cases: tuple[DemoCase, ...]
    seconds: float
    next_command: tuple[str, ...]


@dataclass(frozen=True)
class DemoHooks:
    """What the CLI shows while the demo runs."""

    say: Callable[[str], None]
    train_progress: PhaseProgress | None = None
    on_data: Callable[[DataSummary], None] | None = None
    explain_progress: Callable[[int, int], None] | None = None


def held_out_cases(manifest: Path) -> list[tuple[str, ManifestRow]]:
    """The first test subject of each lesion kind, in `DEMO_LESION_KINDS` order."""
    kinds = read_lesion_kinds(manifest)
    test = [r for r in read_manifest(manifest, splits=["test"]) if r.mask is not None]
    return [(kind, next(r for r in test if kinds[r.subject] == kind)) for kind in DEMO_LESION_KINDS]


def _from_here(path: Path) -> str:
    """A path as typed from the current folder: relative inside it, absolute outside."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def next_explain_command(manifest: Path, explained: set[str], bundle: Path, tracking_uri: str) -> tuple[str, ...]:
    """`adiff explain` for a test subject the demo did not explain (lesioned ones first), with its brain
    mask and, if it has lesions, its lesion mask (so the printed numbers include Dice and AUPRC)."""
    test = read_manifest(manifest, splits=["test"])
    kinds = read_lesion_kinds(manifest)
    others = [r for r in test if r.subject not in explained] or test
    row = sorted(others, key=lambda r: kinds.get(r.subject, "none") == "none")[0]
    command = ["adiff", "explain", *(_from_here(p) for p in row.images)]
    if row.mask is not None and kinds.get(row.subject, "none") != "none":  # a healthy subject's mask is empty
        command += ["--mask", _from_here(row.mask)]
    if row.brainmask is not None:
        command += ["--brainmask", _from_here(row.brainmask)]
    command += ["--checkpoint", _from_here(bundle)]
    if tracking_uri != DEFAULT_TRACKING_URI:
        command += ["--tracking-uri", tracking_uri]
    return tuple(command)


def run_demo(
    work_dir: Path, tracking_uri: str | None, n_subjects: int, overrides: list[str], hooks: DemoHooks
) -> DemoOutcome:
    """Build the dataset in `work_dir/data`, train into `work_dir/runs`, explain a test subject of each
    lesion kind into `work_dir/explain`."""
    started = time.perf_counter()
    hooks.say(f"building demo dataset from the MNI152 template in {work_dir / 'data'} ...")
    manifest = build_demo_dataset(work_dir / "data", n_subjects=n_subjects, lesion_kinds=DEMO_LESION_KINDS)
    cfg = demo_config(manifest, work_dir / "runs", overrides)
    uri = tracking_uri or cfg.tracking.uri or DEFAULT_TRACKING_URI
    trained = run_train(
        cfg, uri, None, timestamped("demo-train"), hooks.train_progress, hooks.on_data, announce=hooks.say
    )
    hooks.say(f"trained in {trained.seconds:.0f} s: {trained.result.bundle_path}")
    cases = []
    for kind, row in held_out_cases(manifest):
        hooks.say(f"explaining held-out subject {row.subject} ({LESION_KINDS[kind]}) ...")
        request = ExplainRequest(
            scans=list(row.images),
            out_dir=work_dir / "explain",
            tracking_uri=uri,
            model=trained.result.bundle_path,
            mask=row.mask,
            brainmask=row.brainmask,
            overwrite=True,
        )
        cases.append(DemoCase(kind, row.subject, run_explain(request, hooks.explain_progress)))
    command = next_explain_command(manifest, {c.subject for c in cases}, trained.result.bundle_path, uri)
    return DemoOutcome(uri, trained, tuple(cases), time.perf_counter() - started, command)

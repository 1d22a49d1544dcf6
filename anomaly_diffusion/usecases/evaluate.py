"""`adiff evaluate`: every method against the lesion masks of a split, with tables, plots and an MLflow run."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from anomaly_diffusion.config import override_explain
from anomaly_diffusion.data.io import check_writable
from anomaly_diffusion.data.manifest import ManifestRow, read_manifest
from anomaly_diffusion.distributed import SINGLE, DistContext
from anomaly_diffusion.errors import ConfigError, InputError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import MAX_MEDIAN_FILTER, bind_methods
from anomaly_diffusion.evaluation.postprocess import NO_POSTPROCESS, PostProcess
from anomaly_diffusion.evaluation.report import flat_metrics, montage_rows, report_markdown
from anomaly_diffusion.evaluation.scoring import ScoreProgress, VolumeScores, score_volumes
from anomaly_diffusion.evaluation.split_metrics import EvaluationReport, evaluate
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.plots import dice_vs_threshold, evaluation_montage, roc_pr_curves
from anomaly_diffusion.runtime import compute_summary, model_device, precision_name, prepare_for_inference
from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.common import load_model

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class EvaluateRequest:
    """One evaluation, checked once when made (`__post_init__`), before any model is loaded.

    Attributes:
        manifest: dataset manifest; rows of `split` need lesion masks.
        model: bundle file or `models:/NAME/VERSION` / `models:/NAME@ALIAS`; None: the newest bundle.
        methods: specs for `parse_method` (guided, unguided, paper, intensity[:C], NAME:L=..,s=..,K=..).
        threshold_split: a split whose volumes choose the Dice threshold and the FPR thresholds;
            None: leave one volume out (Dice) and this split's lesion-free slices (FPR).
        median_size: in-plane median filter of every map (0 or 1 = none).
        max_volumes: evaluate only the first N volumes of each split (quick looks).
        explain_overrides: `explain.KEY=VALUE` settings replacing the bundle's explain defaults
            (what `guided` means), e.g. to score a trained model with the defaults of a newer config.
        postprocess: 3D median, brain-mask erosion and small-component removal, the same for
            every method (`evaluation.postprocess`).
    """

    manifest: Path
    out_dir: Path
    tracking_uri: str
    model: Path | str | None = None
    split: str = "val"
    methods: Sequence[str] = ("guided", "unguided", "intensity")
    threshold_split: str | None = None
    median_size: int = 0
    fprs: Sequence[float] = (0.01, 0.05)
    bootstrap: int = 1000
    batch_size: int | None = None
    device: str = "auto"
    overwrite: bool = False
    max_volumes: int | None = None
    compile_networks: bool = False
    fp32: bool = False
    explain_overrides: Sequence[str] = field(default=())
    postprocess: PostProcess = NO_POSTPROCESS

    def __post_init__(self) -> None:
        if self.split not in SPLITS or self.threshold_split not in (None, *SPLITS):
            raise ConfigError("--split and --threshold-split must be train, val or test")
        if not 0 <= self.median_size <= MAX_MEDIAN_FILTER:
            raise ConfigError(f"--median-filter must be in 0..{MAX_MEDIAN_FILTER}, got {self.median_size}")
        for fpr in self.fprs:
            if not 0 < fpr < 1:
                raise ConfigError(f"false-positive rates must be in (0, 1), got {fpr}")
        if self.median_size > 1 and self.postprocess.median_3d > 1:
            raise ConfigError("--median-filter (in-plane) and --median-3d exclude each other: choose one")
        if self.bootstrap < 0:
            raise ConfigError(f"--bootstrap must be >= 0, got {self.bootstrap}")
        if self.threshold_split is not None and self.threshold_split == self.split:
            raise ConfigError(
                f"--threshold-split must differ from --split ({self.split}): a threshold chosen on the "
                "evaluated volumes is the oracle, which is reported anyway as Dice (best)"
            )


@dataclass(frozen=True)
class EvaluateOutcome:
    """A finished evaluation: the report, its files and its MLflow run."""

    run_id: str
    report: EvaluationReport
    outputs: dict[str, Path]
    seconds: float


def _split_rows(rows: Sequence[ManifestRow], request: EvaluateRequest, name: str) -> list[ManifestRow]:
    chosen = [r for r in rows if r.split == name]
    if not chosen:
        raise InputError(f"{request.manifest}: no subjects in the {name} split")
    missing = [r.subject for r in chosen if r.mask is None]
    if missing:
        raise InputError(
            f"{request.manifest}: {name} subjects without a lesion mask cannot be evaluated: {missing[:5]}"
        )
    return chosen[: request.max_volumes] if request.max_volumes else chosen


def run_evaluate(
    request: EvaluateRequest,
    progress: ScoreProgress | None = None,
    context: DistContext = SINGLE,
    announce: Callable[[str], None] | None = None,
) -> EvaluateOutcome | None:
    """Score every method on a manifest split against its lesion masks; write tables and plots; track in MLflow.

    Under torchrun (`context`), each rank scores every world_size-th volume and rank 0 gathers
    them, reports and logs; other ranks return None. `announce` is told the model chosen without
    --checkpoint, the device, threads and precision before the work starts.
    """
    started = time.perf_counter()
    started_at = time.time()
    r = request
    bundle, bundle_name, model_ref = load_model(
        r.model, r.tracking_uri, r.device, announce if context.is_main else None
    )
    if r.explain_overrides:
        bundle = replace(bundle, config=override_explain(bundle.config, list(r.explain_overrides)))
    bundle = prepare_for_inference(bundle, r.compile_networks or bundle.config.explain.compile, r.fp32)
    cfg = bundle.config
    methods = bind_methods([parse_method(m, cfg) for m in r.methods], bundle, r.batch_size)
    rows = read_manifest(r.manifest)
    eval_rows = _split_rows(rows, r, r.split)
    threshold_rows = _split_rows(rows, r, r.threshold_split) if r.threshold_split else []
    outputs = {
        "table": r.out_dir / "results.md",
        "json": r.out_dir / "results.json",
        "curves": r.out_dir / "roc_pr.png",
        "dice_threshold": r.out_dir / "dice_threshold.png",
        "montage": r.out_dir / "montage.png",
    }
    for path in outputs.values():
        check_writable(path, r.overwrite)
    if announce is not None and context.is_main:
        announce(f"compute: {compute_summary(model_device(bundle), cfg.train.amp)}")

    def scored(split_rows: list[ManifestRow]) -> list[VolumeScores]:
        mine = score_volumes(bundle, context.shard_list(split_rows), methods, r.median_size, progress, r.postprocess)
        shards = context.gather(mine)
        if not context.is_main:
            return []
        # rank r scored rows r, r + N, ...: interleave back into manifest order
        order = [i for k in range(context.world_size) for i in range(k, len(split_rows), context.world_size)]
        flat = [v for shard in shards for v in shard]  # type: ignore[attr-defined]
        return [v for _, v in sorted(zip(order, flat, strict=True), key=lambda item: item[0])]

    volumes = scored(eval_rows)
    threshold_volumes = scored(threshold_rows) or None
    if not context.is_main:
        return None
    report = evaluate(
        volumes,
        methods,
        r.split,
        threshold_volumes,
        r.fprs,
        r.bootstrap,
        r.median_size,
        cfg.train.seed,
        r.threshold_split,
        r.postprocess,
    )
    curves = {
        m.name: (np.concatenate([v.scores[m.name] for v in volumes]), np.concatenate([v.truth for v in volumes]))
        for m in methods
    }
    title = f"{r.split} split, {len(volumes)} volume(s)"
    markdown = report_markdown(report)
    atomic_write_bytes(markdown.encode(), outputs["table"])
    atomic_write_bytes(json.dumps(report.as_dict(), indent=2, default=float).encode(), outputs["json"])
    roc_pr_curves(curves, outputs["curves"], title)
    dice_vs_threshold(curves, outputs["dice_threshold"], f"Dice vs threshold ({title})")
    primary = next((m.name for m in methods if m.kind == "diffusion"), None)
    evaluation_montage(montage_rows(volumes, primary) if primary else [], outputs["montage"])
    params = {
        "split": r.split,
        "manifest": r.manifest.name,
        "methods": ";".join(f"{m.name}={m.describe()}" for m in methods),
        "threshold_split": r.threshold_split or "",
        "threshold_source": report.threshold_source,
        "median_filter": r.median_size,
        "postprocess": r.postprocess.describe(),
        "bootstrap": r.bootstrap,
        "fprs": ",".join(f"{f:g}" for f in r.fprs),
        "volumes": len(volumes),
        "precision": precision_name(model_device(bundle), cfg.train.amp),
        "threads": torch.get_num_threads(),
        "checkpoint": bundle_name,
        "model": model_ref or "",
        "explain_overrides": ";".join(r.explain_overrides),
    }
    tags = {"adiff.train_run_id": bundle.train_run_id} if bundle.train_run_id else {}
    with tracked_run(
        r.tracking_uri, cfg.tracking.experiment, f"evaluate-{r.split}", "evaluate", tags, started_at=started_at
    ) as run:
        run.log_params(params)
        run.log_metrics(flat_metrics(report))
        for path in outputs.values():
            run.log_artifact(path, "evaluate")
        run.set_tags({"mlflow.note.content": markdown})
    return EvaluateOutcome(run.run_id, report, outputs, time.perf_counter() - started)

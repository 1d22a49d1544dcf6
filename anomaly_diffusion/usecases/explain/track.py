"""An explained scan as one MLflow run: its parameters, metrics, files (never the DICOM outputs), the
per-slice review images and a run description that points a reviewer to them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import numpy as np

from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.explain.explainer import Explainer
from anomaly_diffusion.usecases.explain.review import StudyReview

REVIEW_KEYS = ("review/1_input", "review/2_counterfactual", "review/3_map")
"""The run's image series, one per view, each stepped by the input's slice number (the UI sorts charts by key)."""


def track_study(
    uri: str,
    explainer: Explainer,
    run_name: str,
    params: dict[str, object],
    metrics: dict[str, float],
    logged: dict[str, Path],
    tags: dict[str, str] | None = None,
    started_at: float | None = None,
    review: StudyReview | None = None,
) -> str:
    """Log an explained scan's params, metrics and files (`logged`: never the DICOM outputs) as one MLflow
    run; returns its id."""
    with tracked_run(
        uri,
        explainer.bundle.config.tracking.experiment,
        run_name,
        "explain",
        {**explainer.tags(), **(tags or {})},
        started_at=started_at,
    ) as run:
        run.log_params(params)
        run.log_metrics(metrics)
        for path in logged.values():
            run.log_artifact(path, "explain")
        text = _run_description(params, metrics)
        run.log_text(text, "README.md")
        head, tail = "", ""
        if review is not None:
            for number, images in review.images:
                for key, image in zip(REVIEW_KEYS, images, strict=True):
                    run.log_image(image, key, step=number)
            numbers = np.array([n for n, _ in review.images], dtype=int)
            head, tail = _review_pointer(run.run_id, numbers, review.explained, review.cap, review.montage)
        run.set_tags({"mlflow.note.content": f"{head}{text}{tail}"})
    return run.run_id


def _review_pointer(run_id: str, numbers: np.ndarray, explained: int, cap: int, montage: str) -> tuple[str, str]:
    """The run description's parts (markdown) that send a reviewer to the per-slice images (first, as
    the run page folds long descriptions) and show the montage (last)."""
    source = f"get-artifact?path={quote(f'explain/{montage}')}&run_uuid={run_id}"
    shown = f"\n\nThe most anomalous slices (`explain/{montage}`):\n\n![montage]({source})"
    if numbers.size == 0:
        return "", shown
    every = "" if numbers.size == explained else f" (one in {-(-explained // cap)} of {explained})"
    review = (
        f"**Slice review**: tab *Model metrics*, section *review*: input, healthy counterfactual and map for "
        f"{numbers.size} explained slices{every}, the step being the slice number in the input file "
        f"({int(numbers.min())} to {int(numbers.max())}). "
        + ("The charts open at step 0, before the first: " if numbers.min() > 0 else "")
        + "move a slider or type a slice number; click an image for full size.\n\n"
    )
    return review, shown


def _run_description(params: dict[str, object], metrics: dict[str, float]) -> str:
    if params["method"] == "classifier_free":
        guided = (
            f"classifier-free guidance towards healthy, w={params['scale']} (label dropout "
            f"{params['cfg_label_dropout']}, inversion with the {params['encode_label']} label)"
        )
        healthy = "- p(healthy): not available (a classifier-free model has no classifier)"
    else:
        guided = f"classifier guidance ({params['guidance']} target, {params['classifier_pooling']}-pooled classifier)"
        healthy = (
            f"- p(healthy) before: {metrics['p_healthy_before_mean']:.3f} (mean over slices), "
            f"after: {metrics['p_healthy_after_mean']:.3f}"
        )
    levels = params.get("ensemble_levels", params["noise_level"])
    lines = [
        f"Explained `{params['inputs']}` with L={levels}, s={params['scale']}, "
        f"K={params['steps']} DDIM steps; the map is made by {guided}, {params['residual']} residual; "
        f"{params['encoding']} encoding, {params['decoding']} decoding"
        + (", compared with the plain reconstruction of x_L" if params.get("pairing") == "reconstruction" else "")
        + ".",
        "",
        healthy,
        f"- max anomaly score: {metrics['anomaly_max']:.3f}; {metrics['anomaly_volume_ml']:.2f} mL above the "
        f"threshold {metrics['anomaly_threshold']:.3f}",
    ]
    if "ensemble_members" in params:
        lines.append(
            f"- ensemble of {params['ensemble_members']} maps (levels {levels}, {params['ensemble_draws']} draw(s) "
            f"each): the map is their mean; uncertainty (their standard deviation) mean "
            f"{metrics['uncertainty_mean']:.3f}, max {metrics['uncertainty_max']:.3f}"
        )
    if "pixel_auprc" in metrics:
        lines.append(
            f"- against the given mask: AUPRC {metrics['pixel_auprc']:.3f}, best Dice {metrics['pixel_dice_best']:.3f} "
            f"(raw intensity baseline: AUPRC {metrics['intensity_baseline_auprc']:.3f})"
        )
    return "\n".join(lines)

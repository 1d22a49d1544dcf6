"""The parameters of an explanation (model, method, counterfactual and ensemble settings), as written
to the JSON summary and logged to MLflow: one flat dict of names a reviewer can filter runs by."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from anomaly_diffusion.counterfactual.settings import ExplainSettings
from anomaly_diffusion.diffusion.decoding import NEEDS_MASK
from anomaly_diffusion.diffusion.encoding import NOISE_CELL_ENCODINGS
from anomaly_diffusion.models.bundle import ModelBundle
from anomaly_diffusion.usecases.explain.explainer import Explainer


def explain_params(scans: Sequence[Path], explainer: Explainer) -> dict[str, object]:
    """Every parameter of one explanation: the inputs, the model, the first member's settings, the ensemble."""
    return _params(scans, explainer) | _ensemble_params(explainer.plans)


def _params(scans: Sequence[Path], explainer: Explainer) -> dict[str, object]:
    settings, bundle = explainer.settings, explainer.bundle
    return {
        "noise_level": settings.noise_level,
        "scale": settings.scale,
        "steps": settings.grid.steps,
        "residual": settings.residual,
        "guidance": settings.guidance,
        "batch_size": settings.batch_size,
        "precision": explainer.precision,
        "threads": torch.get_num_threads(),
        "inputs": ";".join(p.name for p in scans),
        "checkpoint": explainer.bundle_name,
        "model": explainer.model_ref or "",
        "bundle_version": bundle.package_version,
        **_method_params(bundle, settings),
    }


def _method_params(bundle: ModelBundle, settings: ExplainSettings) -> dict[str, object]:
    """How the map was guided: the method; for classifier-free guidance w, label dropout and inversion label."""
    cfg = bundle.config
    if cfg.method != "classifier_free":
        return {"method": cfg.method, "classifier_pooling": cfg.classifier.pooling}
    return {
        "method": cfg.method,
        "cfg_weight": settings.scale,
        "cfg_label_dropout": cfg.cfg.label_dropout,
        "encode_label": settings.encode_label,
    }


def counterfactual_params(settings: ExplainSettings) -> dict[str, object]:
    """The map's pairing and channel, the gradient smoothing and the mask, where they differ from the paper's."""
    params: dict[str, object] = {}
    if settings.pairing != "input":
        params["pairing"] = settings.pairing
    if settings.residual_channel is not None:
        params["residual_channel"] = settings.residual_channel
    if settings.smooth > 0 and settings.scale > 0:
        params["smooth"] = settings.smooth
    if settings.gate > 0:
        params["gate"] = settings.gate
    if settings.decoding in NEEDS_MASK:
        m = settings.mask
        params.update({"mask_threshold": m.threshold, "mask_dilation": m.dilation, "mask_sigma": m.sigma})
    return params


def _ensemble_params(plans: Sequence[ExplainSettings]) -> dict[str, object]:
    """The encoding, decoding and ensemble of an explanation, as run parameters."""
    first = plans[0]
    params: dict[str, object] = {"encoding": first.encoding, "decoding": first.decoding}
    if first.encoding in NOISE_CELL_ENCODINGS:
        params["noise_cell"] = first.noise_cell
    if first.decoding == "thor":
        h = first.harmonisation
        params.update(
            {"harmonise_levels": h.levels, "harmonise_threshold": h.threshold, "harmonise_dilation": h.dilation}
        )
        params["harmonise_soft"] = h.soft
    params.update(counterfactual_params(first))
    if len(plans) > 1:
        params["ensemble_levels"] = "+".join(str(level) for level in dict.fromkeys(p.noise_level for p in plans))
        params["ensemble_draws"] = len({p.seed for p in plans})
        params["ensemble_members"] = len(plans)
    return params

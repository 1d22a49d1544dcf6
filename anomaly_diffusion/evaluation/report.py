"""The evaluation as markdown tables, flat MLflow metrics and montage picks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from anomaly_diffusion.evaluation.bootstrap import PATIENT_METRICS
from anomaly_diffusion.evaluation.methods import REGIME_TEXT, REGIMES
from anomaly_diffusion.evaluation.scoring import VolumeScores
from anomaly_diffusion.evaluation.split_metrics import EvaluationReport
from anomaly_diffusion.metrics import per_slice_otsu_dice


def _f(value: float) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _with_ci(value: float, interval: tuple[float, float] | None) -> str:
    if interval is None or not all(np.isfinite(interval)):
        return _f(value)
    return f"{_f(value)} [{_f(interval[0])}, {_f(interval[1])}]"


def report_markdown(report: EvaluationReport) -> str:
    """The results as markdown tables: main metrics, FPR-calibrated Dice, per volume, by lesion size."""
    r0 = report.results[0]
    fpr_keys = list(r0.dice_at_fpr)
    lines = [
        f"## Evaluation on the {report.split} split",
        "",
        f"{len(report.subjects)} volume(s) ({', '.join(report.subjects)}); {report.voxels} scored brain voxels, "
        f"{report.lesion_voxels} lesion voxels; {report.pathological_slices} diseased and "
        f"{report.healthy_slices} lesion-free slices. Median filter: "
        f"{report.median_filter if report.median_filter > 1 else 'none'}. 3D post-processing: "
        f"{report.postprocess}. Chosen threshold: "
        f"{report.threshold_source}. Brackets: bootstrap 95% interval over volumes ({report.bootstrap} resamples).",
        "",
        "| regime | method | AUROC | AUPRC | Dice (slice Otsu) | Dice (chosen thr.) | Dice (best) | "
        + " | ".join(f"Dice @FPR {k}" for k in fpr_keys)
        + " | slice AUROC (max) | slice AUROC (mean) | p(healthy) before -> after |",
        "|---" * (10 + len(fpr_keys)) + "|",
    ]
    grouped = sorted(report.results, key=lambda r: REGIMES.index(r.regime) if r.regime in REGIMES else len(REGIMES))
    for r in grouped:
        p = "" if not np.isfinite(r.p_healthy_before) else f"{_f(r.p_healthy_before)} -> {_f(r.p_healthy_after)}"
        lines.append(
            f"| {r.regime} | {r.method} | {_with_ci(r.auroc, r.ci['auroc'])} | {_with_ci(r.auprc, r.ci['auprc'])} | "
            f"{_with_ci(r.dice_slice_otsu, r.ci['dice_slice_otsu'])} | "
            f"{_with_ci(r.dice_chosen, r.ci.get('dice_chosen'))} | "
            f"{_with_ci(r.dice_best, r.ci['dice_best'])} | "
            + " | ".join(_f(r.dice_at_fpr[k]) for k in fpr_keys)
            + f" | {_with_ci(r.slice_auroc_max, r.ci.get('slice_auroc_max'))} | {_f(r.slice_auroc_mean)} | {p} |"
        )
    quality = [r for r in report.results if r.quality and any(np.isfinite(v) for v in r.quality.values())]
    if quality:
        lines += [
            "",
            "### Counterfactual quality (mean over volumes; model resolution, normalised units)",
            "",
            "Healthy-tissue change: mean |x - x_healthy| over brain pixels of lesion-free slices, and outside the "
            "lesion dilated by 3 px on diseased slices (lower is better). Lesion removal: the share of the lesion's "
            "contrast to its surrounding ring that the counterfactual removes, in its most hyperintense channel "
            "(1: gone). Lattice: the change's power at the classifier's region-grid period over neighbouring "
            "frequencies (about 1: none).",
            "",
            "| method | change, lesion-free slices | change, healthy tissue of diseased slices | lesion removal | "
            "p(healthy) after, diseased slices | lattice |",
            "|---" * 6 + "|",
        ]
        for r in quality:
            q = r.quality
            lines.append(
                f"| {r.method} | {_f(q['change_clean'])} | {_f(q['change_diseased'])} | "
                f"{_f(q['lesion_removal'])} | {_f(q['p_healthy_diseased'])} | {_f(q['lattice'])} |"
            )
    lines += ["", "Methods: " + "; ".join(f"**{r.method}**: {r.description}" for r in report.results)]
    lines += ["", "Regimes: " + "; ".join(f"**{name}**: {text}" for name, text in REGIME_TEXT.items()), ""]
    lines += [
        "### Per patient (mean over volumes)",
        "",
        "Each metric computed on each volume alone, then averaged; brackets: bootstrap over patients.",
        "",
        "| method | AUROC | AUPRC | Dice (best) | Dice (slice Otsu) | Dice (chosen thr.) | slice AUROC |",
        "|---" * 7 + "|",
    ]
    for r in report.results:
        cells = [_with_ci(r.per_patient.get(k, float("nan")), r.ci.get(f"patient.{k}")) for k in PATIENT_METRICS]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Per volume",
        "",
        "| method | subject | AUROC | AUPRC | Dice (slice Otsu) | Dice (best) | Dice (chosen thr.) | slice AUROC |",
    ]
    lines.append("|---" * 8 + "|")
    for r in report.results:
        for subject, m in r.per_volume.items():
            lines.append(
                f"| {r.method} | {subject} | {_f(m['auroc'])} | {_f(m['auprc'])} | {_f(m['dice_slice_otsu'])} | "
                f"{_f(m['dice_best'])} | {_f(m.get('dice_chosen', float('nan')))} | {_f(m['slice_auroc_max'])} |"
            )
    lines += ["", "### By lesion size per slice (small < 1 cm², medium < 10 cm², large)", ""]
    lines += ["Brackets (small only): bootstrap over patients.", ""]
    lines += ["| method | size | slices | AUROC | AUPRC | Dice (slice Otsu) |", "|---" * 6 + "|"]
    for r in report.results:
        for size, m in r.by_size.items():
            ci_auroc, ci_auprc = (r.ci.get(f"small.{k}") if size == "small" else None for k in ("auroc", "auprc"))
            lines.append(
                f"| {r.method} | {size} | {int(m['slices'])} | {_with_ci(m.get('auroc', float('nan')), ci_auroc)} | "
                f"{_with_ci(m.get('auprc', float('nan')), ci_auprc)} | {_f(m.get('dice_slice_otsu', float('nan')))} |"
            )
    return "\n".join(lines) + "\n"


def flat_metrics(report: EvaluationReport) -> dict[str, float]:
    """'{method}.{metric}' -> value, for MLflow metrics."""
    flat: dict[str, float] = {}
    for r in report.results:
        base = {
            "auroc": r.auroc,
            "auprc": r.auprc,
            "dice_slice_otsu": r.dice_slice_otsu,
            "dice_chosen": r.dice_chosen,
            "dice_best": r.dice_best,
            "slice_auroc_max": r.slice_auroc_max,
            "slice_auroc_mean": r.slice_auroc_mean,
            **{f"dice_fpr_{k.rstrip('%')}pct": v for k, v in r.dice_at_fpr.items()},
            **{f"patient_mean_{k}": v for k, v in r.per_patient.items()},
            "small_auroc": r.by_size.get("small", {}).get("auroc", float("nan")),
            "small_auprc": r.by_size.get("small", {}).get("auprc", float("nan")),
            **{f"quality_{k}": v for k, v in r.quality.items()},
        }
        flat.update({f"{r.method}.{k}": float(v) for k, v in base.items()})
    return flat


def montage_rows(volumes: Sequence[VolumeScores], method: str) -> list[tuple[str, Any]]:
    """Best, median and worst diseased slices of `method` by their Otsu Dice."""
    ranked = []
    for v in volumes:
        for k, d in per_slice_otsu_dice(v.scores[method], v.truth, v.slice_ids).items():
            if k in v.examples:
                ranked.append((d, v.subject, k, v.examples[k]))
    if not ranked:
        return []
    ranked.sort(key=lambda item: item[0])
    picks = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    return [(f"{label} slice (Dice {d:.2f})\n{s}, slice {k}", ex) for label, (d, s, k, ex) in picks.items()]

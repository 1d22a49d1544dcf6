"""Where an anomaly map loses to a reference detector: the diseased slices with the largest Dice deficit.

    python benchmarks/worst_slices.py MANIFEST BUNDLE --method 'chosen:L=100;s=300;K=25' \
        --against 'flair:c=0' --split test --k 6 --out DIR

Scores both detectors on every diffusion-scored voxel of the split's volumes with the package's
own pipeline (`evaluation.scoring.score_volumes`, the voxels `adiff evaluate` scores, with the same
`--median-3d`, `--erode`, `--min-component` post-processing), takes each diseased slice's Dice at
its own Otsu threshold (the paper's per-slice protocol), and ranks the slices by
`Dice(against) - Dice(method)`. Writes:
- DIR/worst.png: input | healthy counterfactual | map | ground truth for the K slices where the
  map loses most (model resolution, channel 0, the map before any median filter; the titles give
  both Dice values, which are on the input grid and filtered, and the lesion area);
- DIR/worst.json: those slices, and per lesion-size bin (< 1 cm², < 10 cm², larger) how many slices
  each detector wins and its mean Dice.
`benchmarks/brats.py` runs this after the test scoring; it is also usable on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.errors import AdiffError, InputError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.methods import bind_methods
from anomaly_diffusion.evaluation.postprocess import PostProcess
from anomaly_diffusion.evaluation.scoring import VolumeScores, score_volumes
from anomaly_diffusion.evaluation.split_metrics import otsu_slice_dice
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.metrics import SIZE_BINS_MM2, size_bin
from anomaly_diffusion.plots import evaluation_montage
from anomaly_diffusion.runtime import prepare_for_inference
from anomaly_diffusion.usecases.common import load_model


@dataclass(frozen=True)
class SliceRow:
    """One diseased slice: lesion area (mm²) and size bin, each detector's Otsu Dice, the map's deficit."""

    subject: str
    slice: int
    lesion_mm2: float
    size: str
    dice_method: float
    dice_against: float

    @property
    def deficit(self) -> float:
        """Dice(against) - Dice(method): > 0 where the map loses."""
        return self.dice_against - self.dice_method


def slice_table(volumes: list[VolumeScores], method: str, against: str, min_component: int = 0) -> list[SliceRow]:
    """Every diseased slice of the volumes, the largest deficit (where `method` loses most) first.

    Dice at each slice's own Otsu threshold as `adiff evaluate` takes it (`otsu_slice_dice`: eroded
    brain rim and components of fewer than `min_component` voxels left out of the binary map).
    """
    rows = []
    for v in volumes:
        ours = otsu_slice_dice(v, method, min_component)
        theirs = otsu_slice_dice(v, against, min_component)
        for k, dice in ours.items():
            area = float(v.truth[v.slice_ids == k].sum()) * v.pixel_area_mm2
            rows.append(SliceRow(v.subject, int(k), area, size_bin(area), float(dice), float(theirs[k])))
    return sorted(rows, key=lambda r: -r.deficit)


def by_size(rows: list[SliceRow]) -> dict[str, dict[str, float]]:
    """Per size bin: slices, slices each detector wins (ties count for neither), mean Dice of each."""
    summary: dict[str, dict[str, float]] = {}
    for name, *_ in SIZE_BINS_MM2:
        group = [r for r in rows if r.size == name]
        if group:
            summary[name] = {
                "slices": len(group),
                "method_wins": sum(r.deficit < 0 for r in group),
                "against_wins": sum(r.deficit > 0 for r in group),
                "mean_dice_method": float(np.mean([r.dice_method for r in group])),
                "mean_dice_against": float(np.mean([r.dice_against for r in group])),
            }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--method", required=True, help="The map's method spec (adiff evaluate grammar, ';' or ',').")
    parser.add_argument("--against", required=True, help="The reference, e.g. 'flair:c=0' or 'flair-m5:c=0;m=5'.")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--k", type=int, default=6, help="Slices in the montage.")
    parser.add_argument("--max-volumes", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--median-3d", type=int, default=0, help="As adiff evaluate's (every map).")
    parser.add_argument("--erode", type=int, default=0, help="As adiff evaluate's.")
    parser.add_argument("--min-component", type=int, default=0, help="As adiff evaluate's.")
    args = parser.parse_args()
    try:
        postprocess = PostProcess(args.median_3d, args.erode, args.min_component)
        bundle, _, _ = load_model(args.bundle, "sqlite:///:memory:")
        bundle = prepare_for_inference(bundle)
        specs = [args.method.replace(";", ","), args.against.replace(";", ",")]
        methods = bind_methods([parse_method(s, bundle.config) for s in specs], bundle)
        if methods[0].kind != "diffusion":
            raise InputError(f"--method {args.method!r} must be a diffusion method (its map is shown)")
        rows = [r for r in read_manifest(args.manifest) if r.split == args.split][: args.max_volumes]
        if not rows:
            raise InputError(f"{args.manifest}: no subjects in the {args.split} split")
        volumes = score_volumes(bundle, rows, methods, postprocess=postprocess)
    except AdiffError as exc:
        sys.exit(f"error: {exc}")
    method, against = methods[0].name, methods[1].name
    table = slice_table(volumes, method, against, postprocess.min_component)
    examples = {(v.subject, k): ex for v in volumes for k, ex in v.examples.items()}
    worst = [r for r in table if (r.subject, r.slice) in examples][: args.k]
    montage = [
        (
            f"{r.subject}, slice {r.slice} ({r.lesion_mm2 / 100:.2f} cm²)\n"
            f"Dice {method} {r.dice_method:.2f}, {against} {r.dice_against:.2f}",
            examples[(r.subject, r.slice)],
        )
        for r in worst
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    evaluation_montage(montage, args.out / "worst.png")
    report = {
        "method": method,
        "against": against,
        "split": args.split,
        "postprocess": postprocess.describe(),
        "diseased_slices": len(table),
        "method_wins": sum(r.deficit < 0 for r in table),
        "against_wins": sum(r.deficit > 0 for r in table),
        "by_size": by_size(table),
        "worst": [{**asdict(r), "deficit": r.deficit} for r in worst],
    }
    atomic_write_bytes(json.dumps(report, indent=2).encode(), args.out / "worst.json")
    print(f"{args.out / 'worst.png'}: {len(worst)} slices; {method} loses on {report['against_wins']} of {len(table)}")


if __name__ == "__main__":
    main()

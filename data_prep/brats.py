"""BraTS -> dataset manifest: `python data_prep/brats.py ROOT --out manifest.csv [--channels flair,t1c]`.

Layouts recognised (one folder per subject, anywhere below ROOT):
- BraTS 2015 as modified for DeepMedic (../shared/data/brats2015): `Flair_subtrMeanDivStd.nii.gz`,
  `T1c_subtrMeanDivStd.nii.gz`, `OTMultiClass.nii.gz` (lesion = label > 0), `brainmask.nii.gz`;
  subjects under a `train/` or `validation/` folder keep that split.
- BraTS 2020/2021: `<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz` (BraTS20_Training_001,
  BraTS2021_00000); no brain mask (the foreground threshold is used).
Subjects without a split from their folder are split by subject with --val/--test fractions
(seeded). The manifest stores paths relative to itself; nothing is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_diffusion.data.manifest import ManifestRow, Split, assign_splits, split_counts, write_manifest
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.terminal import run_tool

BRATS2015 = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
BRATS2020 = {"flair": "flair", "t1c": "t1ce", "t1": "t1", "t2": "t2"}
FOLDER_SPLITS: dict[str, Split] = {
    "train": "train",
    "training": "train",
    "validation": "val",
    "val": "val",
    "test": "test",
}


def find_subjects(
    root: Path, channels: list[str]
) -> list[tuple[str, tuple[Path, ...], Path, Path | None, Split | None]]:
    """(subject, channel files, lesion mask, brain mask, split from folder or None) for every subject folder."""
    found = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        split = next(
            (FOLDER_SPLITS[part.lower()] for part in folder.relative_to(root).parts if part.lower() in FOLDER_SPLITS),
            None,
        )
        if (folder / "OTMultiClass.nii.gz").is_file():
            missing = [c for c in channels if c not in BRATS2015]
            if missing:
                raise InputError(f"BraTS 2015 has channels {sorted(BRATS2015)}, not {missing}")
            images = tuple(folder / BRATS2015[c] for c in channels)
            brain = folder / "brainmask.nii.gz"
            found.append(
                (folder.name, images, folder / "OTMultiClass.nii.gz", brain if brain.is_file() else None, split)
            )
        elif (folder / f"{folder.name}_seg.nii.gz").is_file():
            missing = [c for c in channels if c not in BRATS2020]
            if missing:
                raise InputError(f"BraTS 2020/2021 has channels {sorted(BRATS2020)}, not {missing}")
            images = tuple(folder / f"{folder.name}_{BRATS2020[c]}.nii.gz" for c in channels)
            found.append((folder.name, images, folder / f"{folder.name}_seg.nii.gz", None, split))
    for subject, images, *_ in found:
        for image in images:
            if not image.is_file():
                raise InputError(f"{subject}: missing channel file {image}")
    return found


def main(
    root: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder holding the subject folders.")],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    channels: Annotated[str, typer.Option("--channels", help="Comma-separated, in model channel order.")] = "flair",
    val: Annotated[float, typer.Option("--val", min=0, max=1, help="Validation fraction (unsplit subjects).")] = 0.15,
    test: Annotated[float, typer.Option("--test", min=0, max=1, help="Test fraction (unsplit subjects).")] = 0.15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a manifest for a BraTS folder."""
    subjects = find_subjects(root, [c.strip().lower() for c in channels.split(",") if c.strip()])
    if not subjects:
        raise InputError(f"{root}: no BraTS subject folders found")
    assigned = assign_splits([s[0] for s in subjects if s[4] is None], val, test, seed)
    rows = [
        ManifestRow(subject=name, split=split or assigned.get(name, "train"), images=images, mask=mask, brainmask=brain)
        for name, images, mask, brain, split in subjects
    ]
    write_manifest(rows, out)
    typer.echo(f"{out}: {len(rows)} subjects ({split_counts(rows)}), channels {channels}")


if __name__ == "__main__":
    run_tool(main)

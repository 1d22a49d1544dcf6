"""BraTS -> dataset manifest: `python data_prep/brats.py ROOT --out manifest.csv [--channels flair,t1c]`.

Layouts recognised (one folder per subject, anywhere below ROOT):
- BraTS 2015 as modified for DeepMedic (../shared/data/brats2015): `Flair_subtrMeanDivStd.nii.gz`,
  `T1c_subtrMeanDivStd.nii.gz`, `OTMultiClass.nii.gz` (lesion = label > 0), `brainmask.nii.gz`;
  subjects under a `train/` or `validation/` folder keep that split.
- BraTS 2020/2021: `<ID>/<ID>_{t1,t1ce,t2,flair,seg}.nii.gz` (BraTS20_Training_001,
  BraTS2021_00000); no brain mask (the foreground threshold is used).
Subjects without a split from their folder are split by subject with --val/--test fractions
(seeded). `--splits FILE` (a CSV with `subject,split` columns, e.g. benchmarks/splits/brats20.csv)
sets every subject's split instead: a subject found but not listed is an error, so a split file
is never applied partly. Several roots can be given (e.g. brats2015 and brats2018); with
`--skip-incomplete`, subjects lacking a requested channel (BraTS 2015 has no T1/T2) are left out
and counted instead of refused. The manifest stores paths relative to itself; nothing is copied.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Annotated, cast

import typer

from anomaly_diffusion.data.manifest import SPLITS, ManifestRow, Split, assign_splits, split_counts, write_manifest
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.terminal import FLAG, run_tool

BRATS2015 = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
BRATS2020 = {"flair": "flair", "t1c": "t1ce", "t1": "t1", "t2": "t2"}
FOLDER_SPLITS: dict[str, Split] = {
    "train": "train",
    "training": "train",
    "validation": "val",
    "val": "val",
    "test": "test",
}


Subject = tuple[str, tuple[Path, ...], Path, Path | None, Split | None]


def find_subjects(root: Path, channels: list[str], skip_incomplete: bool = False) -> tuple[list[Subject], list[str]]:
    """((subject, channel files, lesion mask, brain mask, split from folder or None) per subject folder, skipped).

    `skipped` names the subjects left out for lacking a channel (only with `skip_incomplete`).
    """
    found: list[Subject] = []
    skipped: list[str] = []
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        split = next(
            (FOLDER_SPLITS[part.lower()] for part in folder.relative_to(root).parts if part.lower() in FOLDER_SPLITS),
            None,
        )
        if (folder / "OTMultiClass.nii.gz").is_file():
            missing = [c for c in channels if c not in BRATS2015]
            if missing and skip_incomplete:
                skipped.append(folder.name)
                continue
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
    return found, skipped


def read_split_file(path: Path) -> dict[str, Split]:
    """subject -> split from a CSV with `subject` and `split` columns (other columns ignored)."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the split file ({exc.strerror})") from exc
    if not rows or not {"subject", "split"} <= set(rows[0]):
        raise InputError(f"{path}: a split file needs 'subject' and 'split' columns")
    splits: dict[str, Split] = {}
    for row in rows:
        split = row["split"].strip()
        if split not in SPLITS:
            raise InputError(f"{path}: subject {row['subject']}: split {split!r} is not one of {', '.join(SPLITS)}")
        splits[row["subject"].strip()] = cast(Split, split)
    return splits


def main(
    roots: Annotated[
        list[Path], typer.Argument(exists=True, file_okay=False, help="Folders holding the subject folders.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    channels: Annotated[str, typer.Option("--channels", help="Comma-separated, in model channel order.")] = "flair",
    val: Annotated[float, typer.Option("--val", min=0, max=1, help="Validation fraction (unsplit subjects).")] = 0.15,
    test: Annotated[float, typer.Option("--test", min=0, max=1, help="Test fraction (unsplit subjects).")] = 0.15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    splits: Annotated[
        Path | None, typer.Option("--splits", help="CSV subject,split giving every subject's split.")
    ] = None,
    skip_incomplete: Annotated[
        bool, typer.Option("--skip-incomplete", help="Leave out subjects lacking a channel instead of failing.", **FLAG)
    ] = False,
) -> None:
    """Write a manifest for one or more BraTS folders."""
    wanted = [c.strip().lower() for c in channels.split(",") if c.strip()]
    subjects: list[Subject] = []
    skipped: list[str] = []
    for root in roots:
        found, left_out = find_subjects(root, wanted, skip_incomplete)
        subjects += found
        skipped += left_out
    if not subjects:
        raise InputError(f"{', '.join(map(str, roots))}: no BraTS subject folders found")
    names = [s[0] for s in subjects]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError(f"subject ids found twice: {', '.join(duplicated)}")
    if splits is not None:
        table = read_split_file(splits)
        unlisted = [n for n in names if n not in table]
        if unlisted:
            raise InputError(f"{splits}: no split for {len(unlisted)} subjects found: {', '.join(unlisted[:5])}")
        subjects = [(n, i, m, b, table[n]) for n, i, m, b, _ in subjects]
    assigned = assign_splits([s[0] for s in subjects if s[4] is None], val, test, seed)
    rows = [
        ManifestRow(subject=name, split=split or assigned.get(name, "train"), images=images, mask=mask, brainmask=brain)
        for name, images, mask, brain, split in subjects
    ]
    write_manifest(rows, out)
    note = f"; left out {len(skipped)} without every channel ({', '.join(skipped)})" if skipped else ""
    typer.echo(f"{out}: {len(rows)} subjects ({split_counts(rows)}), channels {channels}{note}")


if __name__ == "__main__":
    run_tool(main)

"""A folder of scans (NIfTI files or DICOM series folders) -> dataset manifest.

    python data_prep/folder.py ROOT --out manifest.csv --channel "{id}_flair.nii.gz" \
        [--channel "{id}_t1.nii.gz"] [--mask "{id}_lesion.nii.gz"] [--brainmask "{id}_brain.nii.gz"] \
        [--label 1] [--val 0.15 --test 0.15 --seed 0]

Patterns are paths relative to ROOT in which `{id}` stands for the subject id (it may not
contain '/'; e.g. "{id}/flair.nii.gz" for one folder per subject, or "{id}/dicom" for DICOM
series folders). Subjects are found with the first --channel pattern; every other pattern must
match for every subject. Without --mask, give --label (0 healthy, 1 pathological) for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly_diffusion.data.manifest import ManifestRow, assign_splits, split_counts, write_manifest
from anomaly_diffusion.data.patterns import find_subjects, pattern_regex, resolve_pattern
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.terminal import run_tool


def _resolve(root: Path, pattern: str, subject: str) -> Path:
    path = resolve_pattern(root, pattern, subject)
    if not path.exists():
        raise InputError(f"subject {subject}: {path} not found")
    return path


def main(
    root: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Dataset folder.")],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    channel: Annotated[list[str], typer.Option("--channel", help="Channel file pattern with {id}, in order.")],
    mask: Annotated[str | None, typer.Option("--mask", help="Lesion mask pattern with {id}.")] = None,
    brainmask: Annotated[str | None, typer.Option("--brainmask", help="Brain mask pattern with {id}.")] = None,
    label: Annotated[int | None, typer.Option("--label", min=0, max=1, help="Image label when no mask.")] = None,
    val: Annotated[float, typer.Option("--val", min=0, max=1)] = 0.15,
    test: Annotated[float, typer.Option("--test", min=0, max=1)] = 0.15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a manifest for a folder of scans."""
    if mask is None and label is None:
        raise InputError("give --mask (slice labels from masks) or --label (one label for all scans)")
    for pattern in (*channel, mask, brainmask):
        if pattern is not None:
            pattern_regex(pattern)
    subjects = find_subjects(root, [channel[0]])
    if not subjects:
        raise InputError(f"{root}: nothing matches {channel[0]!r}")
    splits = assign_splits(subjects, val, test, seed)
    rows = [
        ManifestRow(
            subject=s,
            split=splits[s],
            images=tuple(_resolve(root, p, s) for p in channel),
            mask=_resolve(root, mask, s) if mask else None,
            brainmask=_resolve(root, brainmask, s) if brainmask else None,
            label=label if mask is None else None,
        )
        for s in subjects
    ]
    write_manifest(rows, out)
    typer.echo(f"{out}: {len(rows)} subjects ({split_counts(rows)})")


if __name__ == "__main__":
    run_tool(main)

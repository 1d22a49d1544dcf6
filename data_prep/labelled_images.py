"""2D images with image-level labels (e.g. CheXpert-style chest X-rays) -> dataset manifest.

    python data_prep/labelled_images.py ROOT --out manifest.csv [--subject-regex "^(patient\\d+)_"]

ROOT holds `healthy/` and `diseased/` (or `pathological/`, `abnormal/`) folders of PNG, JPEG,
NPY or DICOM files. Each image becomes one row with label 0 (healthy) or 1 (pathological).
Images of one patient must stay in one split: --subject-regex extracts the subject id from the
file name (its first group); by default each file is its own subject.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from anomaly_diffusion.data.manifest import ManifestRow, assign_splits, split_counts, write_manifest
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL
from anomaly_diffusion.terminal import run_tool

FOLDERS = {"healthy": HEALTHY, "normal": HEALTHY, "diseased": PATHOLOGICAL, "pathological": PATHOLOGICAL}
FOLDERS["abnormal"] = PATHOLOGICAL
SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".dcm"}


def main(
    root: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder with healthy/ and diseased/.")],
    out: Annotated[Path, typer.Option("--out", help="Manifest CSV to write.")],
    subject_regex: Annotated[str | None, typer.Option("--subject-regex", help="Subject id from file name.")] = None,
    val: Annotated[float, typer.Option("--val", min=0, max=1)] = 0.15,
    test: Annotated[float, typer.Option("--test", min=0, max=1)] = 0.15,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Write a manifest for labelled 2D images."""
    regex = re.compile(subject_regex) if subject_regex else None
    images: list[tuple[str, Path, int]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in FOLDERS):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in SUFFIXES or path.name.startswith("."):
                continue
            match = regex.search(path.name) if regex else None
            if regex and not match:
                raise InputError(f"{path.name} does not match --subject-regex")
            subject = match.group(1) if match else f"{folder.name}/{path.stem}"
            images.append((subject, path, FOLDERS[folder.name.lower()]))
    if not images:
        raise InputError(f"{root}: no images in healthy/ or diseased/ folders")
    labels = {label for _, _, label in images}
    if labels != {HEALTHY, PATHOLOGICAL}:
        raise InputError(f"{root}: need both healthy and diseased images")
    splits = assign_splits([s for s, _, _ in images], val, test, seed)
    rows = [
        ManifestRow(subject=f"{s}#{i}" if regex else s, split=splits[s], images=(p,), label=label)
        for i, (s, p, label) in enumerate(images)
    ]
    write_manifest(rows, out)
    typer.echo(f"{out}: {len(rows)} images from {len(splits)} subjects ({split_counts(rows)})")


if __name__ == "__main__":
    run_tool(main)

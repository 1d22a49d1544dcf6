"""The dataset manifest: one CSV row per volume (or 2D image) that training and evaluation read.

Columns (header required, order free):
    subject    subject identifier (splits are by subject, never by slice)
    split      train | val | test
    images     channel files in channel order, separated by ';' (paths relative to the manifest)
    mask       optional lesion mask file; slice labels are derived from it at load time
    brainmask  optional brain/foreground mask file
    label      optional image-level label (0 healthy, 1 pathological) for data without masks

Relative paths are resolved against the manifest's folder, so a dataset folder can be moved.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from anomaly_diffusion.errors import InputError
from anomaly_diffusion.labels import check_labels

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
COLUMNS = ("subject", "split", "images", "mask", "brainmask", "label")


@dataclass(frozen=True)
class ManifestRow:
    """One volume of a dataset, with absolute paths."""

    subject: str
    split: Split
    images: tuple[Path, ...]
    mask: Path | None = None
    brainmask: Path | None = None
    label: int | None = None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _relative(base: Path, path: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def read_manifest(path: Path, splits: Sequence[Split] | None = None, strict: bool = True) -> list[ManifestRow]:
    """Read and check a manifest CSV.

    Args:
        path: the manifest file.
        splits: keep only these splits (all when None).
        strict: refuse the whole manifest for a missing file or rows with different numbers of
            channels; False leaves both to the caller (a cohort records them per study and goes on).

    Raises:
        InputError: missing file or column, unknown split, bad label, no rows, a subject in two
            splits, or a referenced file that does not exist.
    """
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    base = path.parent
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"subject", "split", "images"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path}: manifest lacks column(s) {sorted(missing)}")
        rows: list[ManifestRow] = []
        for line, record in enumerate(reader, start=2):
            split = (record.get("split") or "").strip()
            if split not in SPLITS:
                raise InputError(f"{path}:{line}: split must be one of {SPLITS}, got {split!r}")
            images = tuple(_resolve(base, p.strip()) for p in (record["images"] or "").split(";") if p.strip())
            if not images:
                raise InputError(f"{path}:{line}: no image files")
            mask = (record.get("mask") or "").strip()
            brainmask = (record.get("brainmask") or "").strip()
            label_text = (record.get("label") or "").strip()
            label = None
            if label_text:
                try:
                    label = int(check_labels([int(label_text)], f"{path}:{line}")[0])
                except ValueError as exc:
                    raise InputError(f"{path}:{line}: label must be 0 or 1, got {label_text!r}") from exc
            row = ManifestRow(
                subject=(record.get("subject") or "").strip() or f"row{line}",
                split=cast(Split, split),
                images=images,
                mask=_resolve(base, mask) if mask else None,
                brainmask=_resolve(base, brainmask) if brainmask else None,
                label=label,
            )
            for file in (*row.images, row.mask, row.brainmask) if strict else ():
                if file is not None and not file.exists():
                    raise InputError(f"{path}:{line}: file not found: {file}")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: manifest has no rows")
    split_of: dict[str, str] = {}
    for row in rows:
        if split_of.setdefault(row.subject, row.split) != row.split:
            raise InputError(f"{path}: subject {row.subject!r} is in two splits; splits must be by subject")
    channels = {len(row.images) for row in rows}
    if strict and len(channels) > 1:
        raise InputError(f"{path}: rows have different numbers of channels {sorted(channels)}")
    return [row for row in rows if splits is None or row.split in splits]


def write_manifest(rows: Iterable[ManifestRow], path: Path) -> Path:
    """Write rows as a manifest CSV with paths relative to the manifest's folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    "subject": row.subject,
                    "split": row.split,
                    "images": ";".join(_relative(base, p) for p in row.images),
                    "mask": _relative(base, row.mask) if row.mask else "",
                    "brainmask": _relative(base, row.brainmask) if row.brainmask else "",
                    "label": "" if row.label is None else str(row.label),
                }
            )
    tmp.replace(path)
    return path


def assign_splits(subjects: Sequence[str], val: float, test: float, seed: int = 0) -> dict[str, Split]:
    """Split subjects (never slices) into train/val/test with seeded shuffling.

    With at least 3 subjects and non-zero fractions, val and test get at least one subject each.

    Raises:
        InputError: fractions outside [0, 1) or summing to 1 or more.
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise InputError(f"split fractions must be in [0, 1) and sum below 1, got val={val}, test={test}")
    order = sorted(set(subjects))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_val = max(round(n * val), 1 if val > 0 and n >= 3 else 0)
    n_test = max(round(n * test), 1 if test > 0 and n >= 3 else 0)
    splits: dict[str, Split] = {s: "val" for s in order[:n_val]}
    splits |= {s: "test" for s in order[n_val : n_val + n_test]}
    splits |= {s: "train" for s in order[n_val + n_test :]}
    return splits


def split_counts(rows: Iterable[ManifestRow]) -> str:
    """'train=12, val=2, test=2' for summaries."""
    listed = list(rows)
    return ", ".join(f"{split}={sum(r.split == split for r in listed)}" for split in SPLITS)

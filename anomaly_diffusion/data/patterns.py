"""Channel file patterns with `{id}`: how a folder of studies names each subject's files.

A pattern is a path relative to the folder's root in which `{id}` stands for the subject id,
once (the id may not contain '/'): "{id}_flair.nii.gz" for flat folders, "{id}/t1.nii.gz" for one
folder per subject, "{id}/dicom" for DICOM series folders. Shared by `data_prep/folder.py`
(folder -> manifest) and the cohort form of `adiff explain`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from anomaly_diffusion.errors import InputError

ID = "{id}"


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression of a pattern, the subject id in group 'id'.

    Raises:
        InputError: the pattern does not contain `{id}` exactly once.
    """
    if pattern.count(ID) != 1:
        raise InputError(f"pattern {pattern!r} must contain {ID} exactly once")
    return re.compile("^" + re.escape(pattern).replace(re.escape(ID), "(?P<id>[^/]+)") + "$")


def find_subjects(root: Path, patterns: Iterable[str], exclude: Path | None = None) -> list[str]:
    """Sorted subject ids whose path under root matches any of the patterns (files or folders).

    Args:
        root: the dataset folder.
        patterns: `{id}` patterns; a subject found by one of them need not match the others.
        exclude: a folder under root whose contents are never matched (e.g. the output folder).
    """
    regexes = [pattern_regex(p) for p in patterns]
    skip = None
    if exclude is not None and exclude.resolve().is_relative_to(root.resolve()):
        skip = exclude.resolve().relative_to(root.resolve()).as_posix()
    ids: set[str] = set()
    for path in root.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if skip is not None and (relative == skip or relative.startswith(skip + "/")):
            continue
        for regex in regexes:
            if m := regex.match(relative):
                ids.add(m.group("id"))
    return sorted(ids)


def resolve_pattern(root: Path, pattern: str, subject: str) -> Path:
    """The path a pattern names for one subject (it may not exist)."""
    return root / pattern.replace(ID, subject)

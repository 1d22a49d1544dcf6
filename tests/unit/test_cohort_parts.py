"""Cohort explain without a model: ordering, CSV, peak slice, patterns, the folder lock, lock patience."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from model_support import TINY

from anomaly_diffusion import tracking
from anomaly_diffusion.config import load_config
from anomaly_diffusion.data.patterns import find_subjects, pattern_regex
from anomaly_diffusion.data.transforms import fit_preprocess
from anomaly_diffusion.errors import InputError, OutputError, TrackingError
from anomaly_diffusion.folder_lock import LOCK_NAME, folder_lock
from anomaly_diffusion.usecases.cohort import (
    FolderCohort,
    ManifestCohort,
    StudyRow,
    cohort_source,
    most_abnormal_first,
    summary_csv,
)
from anomaly_diffusion.usecases.explain import peak_slice

NAN = float("nan")


def _row(study: str, score: float, p: float = 0.5, status: str = "done") -> StudyRow:
    return StudyRow(study, status, p, p, score, 1.0, 3.0, 2.0, NAN, "run", "" if status == "done" else "bad file")


def test_most_abnormal_first_by_max_score_then_lowest_p_healthy_failed_last() -> None:
    rows = [_row("a", 0.2), _row("b", NAN, status="failed"), _row("c", 0.9), _row("d", 0.2, p=0.1), _row("e", NAN)]
    assert [r.study for r in most_abnormal_first(rows)] == ["c", "d", "a", "e", "b"]


def test_summary_csv_leaves_numbers_that_do_not_apply_empty() -> None:
    text = summary_csv([_row("a", 0.25), _row("b", NAN, status="failed")])
    header, first, second = text.splitlines()
    assert header.split(",")[:3] == ["study", "status", "p_healthy_before_min"]
    assert first == "a,done,0.5,0.5,0.25,1,3,2,,run,"
    assert second == "b,failed,0.5,0.5,,1,3,2,,run,bad file"


def test_peak_slice_is_the_input_index_along_the_sliced_axis() -> None:
    """Voxel axis 0 of this grid points along world z, so axial slices are indexed by the first voxel index."""
    cfg = load_config(TINY).data  # slice_axis: axial
    affine = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    data = np.zeros((1, 10, 12, 14), np.float32)
    data[0, 2:8, 2:10, 2:12] = 1 + np.random.default_rng(0).random((6, 8, 10))
    state = fit_preprocess(data, affine, cfg)
    anomaly = np.zeros((10, 12, 14), np.float32)
    anomaly[6, 3, 9] = 2.0
    assert peak_slice(anomaly, state) == 6.0
    assert math.isnan(peak_slice(np.zeros_like(anomaly), state))


def test_find_subjects_is_the_union_over_patterns_and_skips_the_output_folder(tmp_path: Path) -> None:
    for name in ("a_t1.nii.gz", "a_t2.nii.gz", "b_t2.nii.gz", "out/c_t1.nii.gz", "d/t1.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert find_subjects(tmp_path, ["{id}_t1.nii.gz", "{id}_t2.nii.gz"], exclude=tmp_path / "out") == ["a", "b"]
    assert find_subjects(tmp_path, ["{id}/t1.nii.gz"]) == ["d"]
    with pytest.raises(InputError, match="exactly once"):
        pattern_regex("{id}_{id}.nii.gz")


def test_cohort_source_tells_a_cohort_from_a_scan(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "IM0001").write_bytes(b"")
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "a_t1.nii.gz").write_bytes(b"")
    scan = tmp_path / "a.nii.gz"
    assert cohort_source([scan], []) is None
    assert cohort_source([tmp_path / "series"], []) is None  # a DICOM series folder is one scan
    assert cohort_source([tmp_path / "m.csv"], []) == ManifestCohort(tmp_path / "m.csv")
    folder = cohort_source([tmp_path / "studies"], ["{id}_t1.nii.gz"], Path("{id}_mask.nii.gz"))
    assert folder == FolderCohort(tmp_path / "studies", ("{id}_t1.nii.gz",), "{id}_mask.nii.gz", None)
    with pytest.raises(InputError, match="must contain"):
        cohort_source([tmp_path / "studies"], ["{id}_t1.nii.gz"], Path("mask.nii.gz"))
    with pytest.raises(InputError, match="name the channel files with --channel"):
        cohort_source([tmp_path / "studies"], [])


def test_folder_lock_excludes_a_second_writer_and_notes_a_lock_left_by_a_dead_one(tmp_path: Path) -> None:
    notes: list[str] = []
    with folder_lock(tmp_path / "out", "first") as path:
        info = json.loads(path.read_text())
        refused = rf"another adiff run is writing to this folder \(pid {info['pid']} "
        with pytest.raises(OutputError, match=refused), folder_lock(tmp_path / "out", "second"):
            pass
    assert not path.exists()
    (tmp_path / "out" / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "since": 0, "what": "x"}))
    with folder_lock(tmp_path / "out", "third", notes.append):
        pass
    assert len(notes) == 1 and "taking over the lock left by pid 999999 on host h" in notes[0]


def test_tracking_calls_wait_out_a_locked_store_then_give_up_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    failures = iter([RuntimeError("(sqlite3.OperationalError) database is locked")] * 2)

    def flaky() -> str:
        for failure in failures:
            raise failure
        return "ok"

    assert tracking._patiently("sqlite:///x.db", flaky) == "ok"
    monkeypatch.setattr(tracking, "LOCK_PATIENCE_S", 0.0)
    with pytest.raises(TrackingError, match=r"sqlite:///x.db is locked by another writer"):
        tracking._patiently("sqlite:///x.db", lambda: (_ for _ in ()).throw(RuntimeError("database is locked")))
    with pytest.raises(ValueError, match="other"):  # anything else is not waited for
        tracking._patiently("sqlite:///x.db", lambda: (_ for _ in ()).throw(ValueError("other")))

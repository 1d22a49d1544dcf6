"""data_prep/brats.py on synthetic BraTS 2015 and 2020 folders made in tmp_path."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from anomaly_diffusion.config import DataConfig
from anomaly_diffusion.data.datasets import load_slices
from anomaly_diffusion.data.manifest import read_manifest
from anomaly_diffusion.labels import HEALTHY, PATHOLOGICAL

SCRIPT = Path(__file__).parents[3] / "data_prep" / "brats.py"


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _subject(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((16, 16, 8), np.float32)
    image[2:14, 2:14, 1:7] = rng.random((12, 12, 6)) + 1
    seg = np.zeros((16, 16, 8), np.uint8)
    seg[6:9, 6:9, 3:5] = 2  # tumour in slices 3 and 4 only
    return image, seg


def _run(root: Path, out: Path, channels: str) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(root), "--out", str(out), "--channels", channels],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_brats2015_layout_keeps_folder_splits_and_labels_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, name in [("train", "pat1"), ("train", "pat2"), ("validation", "pat3")]:
        image, seg = _subject(rng)
        folder = tmp_path / "raw" / split / name
        _write(folder / "Flair_subtrMeanDivStd.nii.gz", image)
        _write(folder / "T1c_subtrMeanDivStd.nii.gz", image * 2)
        _write(folder / "OTMultiClass.nii.gz", seg)
        _write(folder / "brainmask.nii.gz", (image > 0).astype(np.uint8))
    out = tmp_path / "m" / "manifest.csv"
    assert "3 subjects (train=2, val=1, test=0)" in _run(tmp_path / "raw", out, "flair,t1c")
    rows = read_manifest(out)
    assert {r.subject: r.split for r in rows} == {"pat1": "train", "pat2": "train", "pat3": "val"}
    assert [p.name for p in rows[0].images] == ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]
    data = load_slices(rows[:1], DataConfig(image_channels=2, image_size=16, min_foreground_fraction=0.0))
    assert data.images.shape == (8, 2, 16, 16)
    assert data.labels.tolist() == [HEALTHY] * 3 + [PATHOLOGICAL] * 2 + [HEALTHY] * 3


def test_brats2020_layout_is_split_by_subject(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(10):
        sid = f"BraTS20_Training_{i:03d}"
        image, seg = _subject(rng)
        for suffix in ("t1", "t1ce", "t2", "flair"):
            _write(tmp_path / "raw" / sid / f"{sid}_{suffix}.nii.gz", image)
        _write(tmp_path / "raw" / sid / f"{sid}_seg.nii.gz", seg)
    out = tmp_path / "manifest.csv"
    _run(tmp_path / "raw", out, "t1c")
    rows = read_manifest(out)
    assert len(rows) == 10 and all(r.images[0].name.endswith("_t1ce.nii.gz") for r in rows)
    splits = [r.split for r in rows]
    assert splits.count("val") >= 1 and splits.count("test") >= 1 and splits.count("train") >= 6


def test_two_roots_with_a_split_file_and_subjects_lacking_a_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image, seg = _subject(rng)
    old = tmp_path / "b2015" / "train" / "pat1"
    for name in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"):
        _write(old / name, image)
    _write(old / "OTMultiClass.nii.gz", seg)
    for i in range(3):
        sid = f"Brats18_X_{i}_1"
        for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
            _write(tmp_path / "b2018" / "train" / sid / f"{sid}_{suffix}.nii.gz", seg if suffix == "seg" else image)
    splits = tmp_path / "splits.csv"
    splits.write_text(
        "subject,split,source\npat1,val,x\nBrats18_X_0_1,test,x\nBrats18_X_1_1,train,x\nBrats18_X_2_1,val,x\n"
    )
    roots = [str(tmp_path / "b2015"), str(tmp_path / "b2018")]
    out = tmp_path / "m.csv"
    base = [sys.executable, str(SCRIPT), *roots, "--out", str(out), "--splits", str(splits)]
    subprocess.run([*base, "--channels", "flair"], capture_output=True, text=True, check=True)
    assert {r.subject: r.split for r in read_manifest(out)} == {
        "pat1": "val",
        "Brats18_X_0_1": "test",
        "Brats18_X_1_1": "train",
        "Brats18_X_2_1": "val",
    }
    refused = subprocess.run([*base, "--channels", "t2"], capture_output=True, text=True, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: BraTS 2015 has channels ['flair', 't1c'], not ['t2']"
    ]
    kept = subprocess.run([*base, "--channels", "t2", "--skip-incomplete"], capture_output=True, text=True, check=True)
    assert (
        "3 subjects (train=1, val=1, test=1)" in kept.stdout
        and "left out 1 without every channel (pat1)" in kept.stdout
    )
    splits.write_text("subject,split\npat1,val\nBrats18_X_0_1,test\n")
    unlisted = subprocess.run([*base, "--channels", "flair"], capture_output=True, text=True, check=False)
    assert unlisted.returncode == 1 and "no split for 2 subjects found" in unlisted.stderr


def test_values_the_parser_refuses_get_one_error_line_and_help_shows_no_bool(tmp_path: Path) -> None:
    """A data_prep tool is a one-command typer app, run without adiff's group: its refusals are still one line."""
    env = {"COLUMNS": "200", "TERMINAL_WIDTH": "200", "PATH": "/usr/bin:/bin"}
    missing = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing"), "--out", str(tmp_path / "m.csv")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 1
    lines = [line for line in (missing.stdout + missing.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ROOTS:") and "does not exist" in lines[0], lines
    wrong = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--out", "m.csv", "--val", "x"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert wrong.returncode == 1 and (wrong.stdout + wrong.stderr).strip().startswith("error: --val"), wrong.stderr
    assert not (tmp_path / "m.csv").exists()
    shown = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, env=env, check=True)
    assert "--skip-incomplete" in shown.stdout and "<bool>" not in shown.stdout

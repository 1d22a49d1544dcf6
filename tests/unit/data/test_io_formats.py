"""Input formats users have (.nii, .nii.gz, NIfTI pairs) and outputs colleagues can read (the umask's mode)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly_diffusion.data.io import load_scan, save_like
from anomaly_diffusion.errors import InputError
from anomaly_diffusion.files import atomic_write_bytes
from anomaly_diffusion.usecases.common import output_stem

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


@pytest.mark.parametrize(
    ("name", "kind"), [("s.nii.gz", nib.Nifti1Image), ("s.nii", nib.Nifti1Image), ("s.hdr", nib.Nifti1Pair)]
)
def test_nifti_files_and_pairs_read_alike(tmp_path: Path, name: str, kind: type) -> None:
    data = np.random.default_rng(0).random((20, 18, 5)).astype(np.float32)
    nib.save(kind(data, AFFINE), tmp_path / name)
    for path in [tmp_path / name] + ([tmp_path / "s.img"] if name.endswith(".hdr") else []):
        scan = load_scan([path])
        assert scan.data.shape == (1, 20, 18, 5)
        np.testing.assert_allclose(scan.data[0], data, rtol=1e-6)
        np.testing.assert_allclose(scan.affine, AFFINE)
        assert output_stem(path) == "s"
        out = save_like(scan.data[0], scan, tmp_path / "out" / "map.nii.gz")  # outputs are .nii.gz whatever came in
        np.testing.assert_allclose(nib.load(out).affine, AFFINE)


def test_an_analyze_pair_is_refused_with_one_line(tmp_path: Path) -> None:
    nib.save(nib.AnalyzeImage(np.ones((10, 10, 3), np.float32), AFFINE), tmp_path / "a.hdr")
    with pytest.raises(InputError, match="not a NIfTI image"):
        load_scan([tmp_path / "a.hdr"])


def test_outputs_get_the_umask_mode_not_the_temporary_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = atomic_write_bytes(b"x", tmp_path / "shared" / "result.json")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert atomic_write_bytes(b"y", tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not list((tmp_path / "shared").glob(".*.tmp"))  # no temporary file left beside it

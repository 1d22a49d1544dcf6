"""Randomly corrupted NIfTI bytes never escape as anything but a one-line InputError."""

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anomaly_diffusion.data.io import Scan, load_scan
from anomaly_diffusion.errors import InputError


def _valid_bytes(suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{suffix}"
        data = np.random.default_rng(0).random((10, 9, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
        return path.read_bytes()


VALID = {".nii": _valid_bytes(".nii"), ".nii.gz": _valid_bytes(".nii.gz")}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from(sorted(VALID)),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_corrupted_nifti_gives_input_error_or_a_valid_scan(
    suffix: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(VALID[suffix])
    for position, value in flips:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"scan{suffix}"
        path.write_bytes(bytes(data))
        try:
            scan = load_scan([path])
        except InputError as error:
            assert "\n" not in str(error) and str(path) in str(error)
        else:
            assert isinstance(scan, Scan) and np.isfinite(scan.data).all()

"""A full disk, a quota or a read-only file system: the atomic writers raise one line naming the folder (and
the bytes needed where known) and leave nothing behind; an earlier output stays as it was."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from anomaly_diffusion import files
from anomaly_diffusion.errors import NoSpaceError
from anomaly_diffusion.files import atomic_write, atomic_write_bytes, atomic_write_folder
from anomaly_diffusion.models.bundle import atomic_torch_save

REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}


def _half_then(code: int) -> Callable[[Path], None]:
    """A writer that writes part of its output, then fails as the file system does."""

    def write(tmp: Path) -> None:
        target = tmp / "IM00001.dcm" if tmp.is_dir() else tmp
        target.write_bytes(b"half a file")
        raise OSError(code, os.strerror(code), str(target))

    return write


@pytest.mark.parametrize("code", sorted(REASONS))
def test_a_file_write_that_runs_out_of_space_is_one_line_and_leaves_the_old_file(tmp_path: Path, code: int) -> None:
    path = tmp_path / "map.nii.gz"
    path.write_bytes(b"an earlier result")

    with pytest.raises(NoSpaceError) as caught:
        atomic_write(path, _half_then(code), suffix=".nii.gz")

    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: {REASONS[code]}") and message.endswith("; free space there and rerun")
    assert "\n" not in message
    assert path.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == ["map.nii.gz"]


@pytest.mark.parametrize("code", sorted(REASONS))
def test_a_folder_write_that_runs_out_of_space_is_one_line_and_leaves_the_old_folder(tmp_path: Path, code: int) -> None:
    folder = tmp_path / "series_healthy_dcm"
    folder.mkdir()
    (folder / "IM00001.dcm").write_bytes(b"an earlier result")

    with pytest.raises(NoSpaceError, match=rf"^{tmp_path}: {REASONS[code]}"):
        atomic_write_folder(folder, _half_then(code))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["series_healthy_dcm"]
    assert (folder / "IM00001.dcm").read_bytes() == b"an earlier result"


def test_the_bytes_needed_are_named_where_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(write: Callable[[Path], object], tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(files, "_fill", full)
    with pytest.raises(NoSpaceError, match=r"; the step needed 2\.5 MB; free space there and rerun$"):
        atomic_write_bytes(b"x" * 2_500_000, tmp_path / "results.json")
    with pytest.raises(NoSpaceError, match=r"; the step needed 1234 bytes;"):
        atomic_write_bytes(b"x" * 1234, tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_on_a_full_disk_is_one_line_with_its_size_and_the_last_one_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save's own writer turns ENOSPC into RuntimeError('unexpected pos ...'); ours names the folder."""
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"step": 10}, path)
    real = files._fill

    def full(write: Callable[[Path], object], tmp: Path) -> None:
        real(write, tmp)  # the bytes reach the file system, which then refuses them
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(files, "_fill", full)
    with pytest.raises(NoSpaceError, match=rf"^{tmp_path}: no space left on device.*; the step needed \d+ bytes;"):
        atomic_torch_save({"step": 20, "weights": torch.zeros(10)}, path)
    assert torch.load(path, weights_only=True) == {"step": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_other_write_errors_pass_through_unchanged(tmp_path: Path) -> None:
    with pytest.raises(PermissionError):
        atomic_write(tmp_path / "a", _half_then(errno.EACCES))
    with pytest.raises(ValueError, match="a bug"):
        atomic_write(tmp_path / "a", lambda tmp: (_ for _ in ()).throw(ValueError("a bug")))
    assert list(tmp_path.iterdir()) == []

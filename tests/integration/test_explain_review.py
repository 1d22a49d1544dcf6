"""`adiff explain` logs a per-slice review into its MLflow run (one image series per view, one step per
explained slice, at the input's resolution) and declares the experiment a model-training one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from cli_support import runner
from mlflow.tracking import MlflowClient
from PIL import Image

from anomaly_diffusion.cli import app
from anomaly_diffusion.plots import OUTLINE_RGB, outline
from anomaly_diffusion.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from anomaly_diffusion.usecases.explain import REVIEW_KEYS

_IMAGE = re.compile(r"images/(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+(?P<small>\+compressed)?\.")


def _explain(scan: Path, bundle: Path, out: Path, uri: str, *extra: str) -> str:
    result = runner.invoke(
        app, ["explain", str(scan), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", uri, *extra]
    )
    assert result.exit_code == 0, result.output
    return re.search(r"mlflow run: ([0-9a-f]{32})", result.output).group(1)  # type: ignore[union-attr]


def _series(client: MlflowClient, run_id: str) -> dict[str, dict[int, list[str]]]:
    """key -> step -> the artifact paths (full size and compressed) of a run's logged images."""
    series: dict[str, dict[int, list[str]]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        found = _IMAGE.match(artifact.path)
        assert found, artifact.path
        key = found["key"].replace("~", "/")
        series.setdefault(key, {}).setdefault(int(found["step"]), []).append(artifact.path)
    return series


def test_explain_logs_a_review_image_per_view_and_slice_at_the_input_resolution(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    data = tiny_dataset.parent
    run_id = _explain(
        data / "s5_t1.nii.gz", bundle, tmp_path / "a", tracking_uri, "--mask", str(data / "s5_mask.nii.gz")
    )
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    run = client.get_run(run_id)
    assert run.data.tags["mlflow.loggedImages"] == "True"
    series = _series(client, run_id)
    assert sorted(series) == sorted(REVIEW_KEYS)
    # every explained slice, numbered as in the file: this affine keeps the slice axis (z) unflipped
    explained = int(run.data.metrics["slices_explained"])
    steps = sorted(series[REVIEW_KEYS[0]])
    assert len(steps) == explained and all(sorted(s) == steps for s in series.values())
    assert all(len(paths) == 2 for s in series.values() for paths in s.values())  # full size + thumbnail
    scan = nib.load(str(data / "s5_t1.nii.gz"))
    mask = np.asarray(nib.load(str(data / "s5_mask.nii.gz")).dataobj)
    assert set(steps) <= set(range(scan.shape[2]))
    # full-size images at the input's in-plane resolution (24 x 20 voxels here; the model works at 16 x 16)
    lesion_slice = int(np.argmax(mask.sum(axis=(0, 1))))
    assert lesion_slice in steps
    full = {key: next(p for p in series[key][lesion_slice] if "+compressed" not in p) for key in REVIEW_KEYS}
    folder = tmp_path / "download"
    files = {key: Image.open(client.download_artifacts(run_id, p, str(folder))) for key, p in full.items()}
    assert files[REVIEW_KEYS[0]].mode == "L"  # the grey views are stored as one channel
    images = {key: np.asarray(image.convert("RGB")) for key, image in files.items()}
    for image in images.values():  # (Y, X) rows: anterior up; the model's crop window, cut to the image
        assert image.shape[0] == scan.shape[1] and 16 < image.shape[1] <= scan.shape[0] and image.shape[2] == 3
    overlay = images[REVIEW_KEYS[2]]
    cyan = (overlay == OUTLINE_RGB).all(axis=-1).sum()
    assert cyan == outline(mask[:, :, lesion_slice] > 0).sum() > 0  # the lesion's outline, voxel for pixel
    assert not (images[REVIEW_KEYS[0]] == OUTLINE_RGB).all(axis=-1).any()
    # the run page's description sends the reviewer there first, and shows the montage
    description = run.data.tags["mlflow.note.content"]
    assert description.startswith("**Slice review**: tab *Model metrics*, section *review*")
    assert f"{explained} explained slices" in description
    assert f"![montage](get-artifact?path=explain/s5_t1_montage.png&run_uuid={run_id})" in description


def test_review_slices_caps_the_logged_slices_and_zero_logs_none(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    client = MlflowClient(tracking_uri)
    capped = _explain(scan, bundle, tmp_path / "a", tracking_uri, "--review-slices", "3")
    explained = int(client.get_run(capped).data.metrics["slices_explained"])
    stride = -(-explained // 3)
    series = _series(client, capped)
    assert all(len(s) == len(range(0, explained, stride)) for s in series.values())
    assert f"(one in {stride} of {explained})" in client.get_run(capped).data.tags["mlflow.note.content"]
    none = _explain(scan, bundle, tmp_path / "b", tracking_uri, "--review-slices", "0")
    assert _series(client, none) == {}
    run = client.get_run(none)
    assert "Slice review" not in run.data.tags["mlflow.note.content"]
    summary = json.loads((tmp_path / "b" / "s5_t1_explain.json").read_text())
    assert summary["outputs"]["montage"].endswith("s5_t1_montage.png")

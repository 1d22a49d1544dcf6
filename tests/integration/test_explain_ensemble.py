"""`adiff explain` with an ensemble, stochastic encodings and THOR's decoding, and `adiff evaluate` with the
new method keys and 3D post-processing, through the real CLI on a tiny saved bundle and a SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import one_line_error, runner
from mlflow.tracking import MlflowClient
from model_support import tiny_bundle

from anomaly_diffusion.cli import app
from anomaly_diffusion.models.bundle import save_bundle

pytestmark = pytest.mark.slow


@pytest.fixture
def saved_bundle(tmp_path: Path) -> Path:
    b = tiny_bundle()
    return save_bundle(
        tmp_path / "bundle.pt", config=b.config, schedule=b.schedule, unet=b.unet, classifier=b.classifier
    )


@pytest.fixture
def scan(tmp_path: Path, tiny_dataset: Path) -> tuple[Path, Path]:
    """The tiny dataset's test subject (a textured ellipsoid 'brain' with a bright lesion) as case.nii.gz."""
    folder = tiny_dataset.parent
    case = tmp_path / "case.nii.gz"
    case.write_bytes((folder / "s5_t1.nii.gz").read_bytes())
    return case, folder / "s5_brain.nii.gz"


def _explain(bundle: Path, scan: tuple[Path, Path], out: Path, uri: str, *extra: str):  # type: ignore[no-untyped-def]
    args = ["explain", str(scan[0]), "--brainmask", str(scan[1]), "--checkpoint", str(bundle), "--out", str(out)]
    return runner.invoke(app, [*args, "--steps", "5", "--tracking-uri", uri, *extra])


def test_identical_members_have_zero_uncertainty_in_the_maps_geometry(
    tmp_path: Path, saved_bundle: Path, scan: tuple[Path, Path], tracking_uri: str
) -> None:
    out = tmp_path / "same"
    result = _explain(saved_bundle, scan, out, tracking_uri, "--ensemble", "10+10")
    assert result.exit_code == 0, result.output
    uncertainty = nib.load(str(out / "case_uncertainty.nii.gz"))
    anomaly = nib.load(str(out / "case_anomaly_map.nii.gz"))
    assert uncertainty.shape == anomaly.shape == nib.load(str(scan[0])).shape
    assert np.allclose(uncertainty.affine, anomaly.affine)
    assert np.asarray(uncertainty.dataobj).max() == 0.0  # a deterministic DDIM ensemble of one level agrees
    assert np.asarray(anomaly.dataobj).max() > 0
    summary = json.loads((out / "case_explain.json").read_text())
    assert summary["params"]["ensemble_levels"] == "10" and summary["params"]["ensemble_members"] == 2
    assert summary["metrics"]["uncertainty_max"] == 0.0


def test_draws_of_a_stochastic_encoding_give_a_spread_logged_to_mlflow(
    tmp_path: Path, saved_bundle: Path, scan: tuple[Path, Path], tracking_uri: str
) -> None:
    out = tmp_path / "draws"
    extra = ("-L", "10", "--encoding", "coarse", "--draws", "3", "--decoding", "thor", "--scale", "0")
    result = _explain(saved_bundle, scan, out, tracking_uri, *extra)
    assert result.exit_code == 0, result.output
    spread = np.asarray(nib.load(str(out / "case_uncertainty.nii.gz")).dataobj)
    brain = np.asarray(nib.load(str(scan[1])).dataobj) > 0
    assert (spread >= 0).all() and spread.max() > 0
    assert spread[~brain].max() == 0  # nothing outside the foreground, as the anomaly map
    assert "uncertainty: " in result.output
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("anomaly_diffusion").experiment_id], "tags.`adiff.kind` = 'explain'"
    )
    params = run.data.params
    assert (params["encoding"], params["decoding"], params["ensemble_members"]) == ("coarse", "thor", "3")
    assert params["harmonise_levels"] == "4" and "noise_cell" in params
    assert run.data.metrics["uncertainty_max"] == pytest.approx(float(spread.max()), rel=1e-5)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "explain")}
    assert "explain/case_uncertainty.nii.gz" in logged
    # a single map writes no uncertainty file
    single = tmp_path / "single"
    assert _explain(saved_bundle, scan, single, tracking_uri, "-L", "10").exit_code == 0
    assert not (single / "case_uncertainty.nii.gz").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--draws", "2"], "needs a stochastic --encoding"),
        (["--ensemble", "10+20", "-L", "10"], "leave out --noise-level"),
        (["--ensemble", "10x"], "--ensemble must be noise levels"),
        (["--ensemble", "10+500"], "noise level must be in"),
        (["--encoding", "sde"], "--encoding must be one of ddim, noise, coarse, simplex"),
        (["--decoding", "nope"], "--decoding must be one of ddim, thor"),
    ],
)
def test_bad_ensemble_options_give_one_line(
    tmp_path: Path, saved_bundle: Path, scan: tuple[Path, Path], tracking_uri: str, extra: list[str], expected: str
) -> None:
    line = one_line_error(_explain(saved_bundle, scan, tmp_path / "bad", tracking_uri, *extra))
    assert expected in line
    assert not (tmp_path / "bad").exists()


def test_evaluate_with_thor_low_frequency_noise_and_3d_postprocessing(
    tmp_path: Path, tiny_dataset: Path, saved_bundle: Path, tracking_uri: str
) -> None:
    out = tmp_path / "evaluation"
    methods = (
        "thor:L=10;K=5;s=0;dec=thor;hl=2;ht=0.3,coarse:L=10;K=5;s=0;enc=coarse;n=2;f=2,"
        "simplex:L=10;K=5;s=0;enc=simplex,intensity"
    )
    args = ["evaluate", str(tiny_dataset), "--split", "train", "--threshold-split", "val", "--checkpoint"]
    args += [str(saved_bundle), "--methods", methods, "--bootstrap", "20", "--median-3d", "3", "--erode", "1"]
    args += ["--min-component", "3", "--out", str(out), "--tracking-uri", tracking_uri]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["postprocess"] == "3D median 3, brain mask eroded by 1 voxel(s), binary components < 3 voxels dropped"
    by = {r["method"]: r for r in report["results"]}
    assert by["thor"]["description"] == (
        "unguided reconstruction, L=10, K=5, THOR-harmonised at 2 level(s), threshold 0.3, dilation 1"
    )
    assert "coarse noise (cell 2 px), mean of 2 draw(s)" in by["coarse"]["description"]
    assert "simplex noise (cell 4 px)" in by["simplex"]["description"]
    for r in by.values():
        assert set(r["per_patient"]) >= {"auroc", "auprc", "dice_best", "dice_chosen"}
        assert len(r["per_volume"]) == 4
        for key in ("dice_chosen", "slice_auroc_max", "patient.auroc", "small.auprc"):
            assert key in r["ci"], key
        assert r["dice_best"] >= r["dice_chosen"] - 1e-9
    assert by["intensity"]["auroc"] > 0.9
    assert "### Per patient (mean over volumes)" in result.output
    assert "3D post-processing: 3D median 3" in result.output
    # --median-filter (in-plane) and --median-3d exclude each other
    line = one_line_error(runner.invoke(app, [*args, "--median-filter", "3", "--overwrite"]))
    assert "exclude each other" in line

"""The real CLI (typer's CliRunner) on tiny synthetic scans, with a real SQLite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from cli_support import one_line_error, runner, train_tiny
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app


def test_train_then_explain_writes_outputs_in_input_space_and_tracks_both_runs(
    tmp_path: Path, tiny_dataset: Path, tracking_uri: str, bundle: Path
) -> None:
    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        [
            "explain",
            str(scan),
            "--checkpoint",
            str(bundle),
            "--noise-level",
            "30",
            "--steps",
            "6",
            "--scale",
            "20",
            "--out",
            str(out),
            "--mask",
            str(tiny_dataset.parent / "s5_mask.nii.gz"),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    source = nib.load(str(scan))
    for name in ("s5_t1_anomaly_map.nii.gz", "s5_t1_healthy.nii.gz"):
        image = nib.load(str(out / name))
        assert image.shape == source.shape
        assert np.allclose(image.affine, source.affine)
        assert np.isfinite(image.get_fdata()).all()
    anomaly = nib.load(str(out / "s5_t1_anomaly_map.nii.gz")).get_fdata()
    assert anomaly.min() >= 0 and anomaly.max() > 0
    assert not anomaly[source.get_fdata() == 0].any()  # scores live in the foreground only
    assert (out / "s5_t1_montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "AUPRC" in result.output and "p(healthy)" in result.output

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    train, explain = runs["tiny-train"], runs["explain-s5_t1"]
    assert train.info.status == "FINISHED" and explain.info.status == "FINISHED"
    assert train.data.params["train.ddpm_steps"] == "4"
    assert {"ddpm_loss", "classifier_loss", "classifier_acc_q1", "classifier_acc_q4"} <= set(train.data.metrics)
    assert len(client.get_metric_history(train.info.run_id, "ddpm_loss")) == 2  # a curve, logged every 2 steps
    assert [a.path for a in client.list_artifacts(train.info.run_id, "model")] == ["model/bundle.pt"]
    snapshots = [a.path for a in client.list_artifacts(train.info.run_id, "snapshots")]
    assert snapshots == ["snapshots/step_0000002.png", "snapshots/step_0000004.png"]  # each DDPM checkpoint
    assert {a.path for a in client.list_artifacts(train.info.run_id)} >= {"config.yaml", "dataset_summary.json"}
    assert train.data.tags["adiff.version"] and "mlflow.source.git.commit" in train.data.tags
    description = train.data.tags["mlflow.note.content"]  # the run page's description, not "No description"
    assert "Trained the DDPM (4 steps" in description and "classifier accuracy by quarter" in description
    assert train.data.params["train.precision"].split(" (")[0] in ("bfloat16", "float32")
    assert explain.data.params["noise_level"] == "30" and explain.data.params["steps"] == "6"
    assert 0 <= explain.data.metrics["p_healthy_before_mean"] <= 1
    assert explain.data.metrics["anomaly_volume_ml"] >= 0 and "anomaly_threshold" in explain.data.metrics
    assert "mL above the threshold" in explain.data.tags["mlflow.note.content"]
    assert "pixel_auprc" in explain.data.metrics and "intensity_baseline_auprc" in explain.data.metrics
    assert explain.data.tags["adiff.train_run_id"] == train.info.run_id
    artifacts = {a.path for a in client.list_artifacts(explain.info.run_id, "explain")}
    assert {"explain/s5_t1_anomaly_map.nii.gz", "explain/s5_t1_montage.png"} <= artifacts
    # the run is opened after the outputs exist, but its duration covers the work that made them
    assert explain.info.start_time <= (out / "s5_t1_anomaly_map.nii.gz").stat().st_mtime * 1000
    precision, reason = explain.data.params["precision"].split(" (")  # e.g. 'bfloat16 (avx512_bf16)'
    assert precision in ("float32", "bfloat16") and reason.endswith(")")


def test_explain_errors_are_one_line_and_leave_outputs_untouched(
    tmp_path: Path, tiny_dataset: Path, tracking_uri: str, bundle: Path
) -> None:
    scan = str(tiny_dataset.parent / "s5_t1.nii.gz")
    out = tmp_path / "explain"
    out.mkdir()
    existing = out / "s5_t1_anomaly_map.nii.gz"
    existing.write_bytes(b"an earlier result")
    base = ["--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]
    cases = {
        "file not found": ["explain", str(tmp_path / "nope.nii.gz"), *base],
        "noise level must be in 1..99": ["explain", scan, "--noise-level", "100", *base],
        "noise level must be in 1..99 ": ["explain", scan, "--noise-level", "0", *base],
        "steps must be in": ["explain", scan, "--noise-level", "10", "--steps", "11", *base],
        "scale must be": ["explain", scan, "--scale", "-1", *base],
        "--residual must be one of abs, positive, negative": ["explain", scan, "--residual", "both", *base],
        "checkpoint not found": ["explain", scan, "--checkpoint", str(tmp_path / "none.pt"), "--out", str(out)],
        "already exists": ["explain", scan, *base],
        "expects 1 channel": ["explain", scan, scan, *base],
    }
    for message, args in cases.items():
        line = one_line_error(runner.invoke(app, args))
        assert message.strip() in line, (message, line)
        assert existing.read_bytes() == b"an earlier result"
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny-train"]  # no half-made explain runs


def test_train_errors(tmp_path: Path, tracking_uri: str) -> None:
    line = one_line_error(runner.invoke(app, ["train", "--config", "tiny", "--tracking-uri", tracking_uri]))
    assert "data.manifest is not set" in line
    line = one_line_error(runner.invoke(app, ["train", "--config", str(tmp_path / "x.yaml")]))
    assert "config file not found" in line
    line = one_line_error(runner.invoke(app, ["train", "--config", "tiny", "--set", "unet.channels=[7]"]))
    assert "unet" in line


def test_data_without_both_classes_is_refused_before_training(tmp_path: Path, tiny_dataset: Path) -> None:
    healthy = tiny_dataset.parent / "healthy.csv"
    text = tiny_dataset.read_text().splitlines()
    healthy.write_text("\n".join(line.replace("_mask", "_empty") for line in text) + "\n")
    for line in text[1:]:
        src = tiny_dataset.parent / line.split(",")[3]
        empty = np.zeros(nib.load(str(src)).shape, np.uint8)
        nib.save(nib.Nifti1Image(empty, nib.load(str(src)).affine), str(src).replace("_mask", "_empty"))
    uri = f"sqlite:///{tmp_path / 'other.db'}"
    result = runner.invoke(
        app, ["train", "--config", "tiny", "--set", f"data.manifest={healthy}", "--tracking-uri", uri]
    )
    assert "needs both classes" in one_line_error(result)
    assert not (tmp_path / "other.db").exists() or not MlflowClient(uri).search_runs(["0"])


def test_a_crashing_run_is_marked_failed_and_keeps_its_checkpoint(
    tmp_path: Path, tiny_dataset: Path, tracking_uri: str
) -> None:
    # an absurd learning rate makes the DDPM loss non-finite: the numerical guard stops the run
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            "tiny",
            "--set",
            f"data.manifest={tiny_dataset}",
            "--set",
            "train.ddpm_lr=1e30",
            "--set",
            "train.ddpm_steps=50",
            "--set",
            "train.checkpoint_every=1",
            "--out",
            str(tmp_path / "r"),
            "--tracking-uri",
            tracking_uri,
            "--run-name",
            "doomed",
        ],
    )
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error:") and "loss became" in last and "Traceback" not in result.output
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
    assert run.info.run_name == "doomed" and run.info.status == "FAILED"
    assert (tmp_path / "r" / "checkpoint.pt").is_file() and not (tmp_path / "r" / "bundle.pt").exists()


def test_explain_a_dicom_series_folder_writes_nifti_in_its_geometry(
    tmp_path: Path, tracking_uri: str, bundle: Path
) -> None:
    from dicom_series import PATIENT_ID, PATIENT_NAME, _write_series

    from anomaly_diffusion.data.dicom import read_dicom_series

    rng = np.random.default_rng(3)
    stored = np.zeros((24, 20, 8), np.int16)
    stored[3:21, 3:17, 1:7] = rng.integers(500, 900, (18, 14, 6))
    folder = tmp_path / "series"
    _write_series(folder, stored)
    out = tmp_path / "explain"
    result = runner.invoke(
        app, ["explain", str(folder), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", tracking_uri]
    )
    assert result.exit_code == 0, result.output
    reference = read_dicom_series(folder)
    for name in ("series_anomaly_map.nii.gz", "series_healthy.nii.gz"):
        image = nib.load(str(out / name))
        assert image.shape == reference.data.shape
        assert np.allclose(image.affine, reference.affine, atol=1e-4)
        header_bytes = image.header.binaryblock
        assert PATIENT_NAME.encode() not in header_bytes and PATIENT_ID.encode() not in header_bytes
    assert PATIENT_NAME not in result.output and PATIENT_ID not in result.output


def test_inspect_summarises_and_refuses_inconsistent_data(tiny_dataset: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tiny_dataset), "--config", "tiny"])
    assert result.exit_code == 0, result.output
    assert "train: subjects=4" in result.output and "val: subjects=1" in result.output
    assert "s0 (train): shape (24, 20, 10), spacing (1.5, 1.5, 2.0) mm" in result.output
    bad_mask = tiny_dataset.parent / "s0_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 9), np.uint8), np.eye(4)), str(bad_mask))
    line = one_line_error(runner.invoke(app, ["inspect", str(tiny_dataset), "--config", "tiny"]))
    assert "mask shape (24, 20, 9) differs from image shape (24, 20, 10)" in line


def test_explain_a_2d_png(tmp_path: Path, tracking_uri: str, bundle_2d: Path) -> None:
    bundle = bundle_2d  # a model of 2D images: one of 3D volumes refuses a PNG (test_dicom_explain.py)
    from skimage import io as skio

    image = np.zeros((30, 26), np.uint8)
    image[5:25, 4:22] = np.random.default_rng(0).integers(80, 200, (20, 18))
    skio.imsave(tmp_path / "xray.png", image, check_contrast=False)
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        [
            "explain",
            str(tmp_path / "xray.png"),
            "--checkpoint",
            str(bundle),
            "--out",
            str(out),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    anomaly = nib.load(str(out / "xray_anomaly_map.nii.gz"))
    assert anomaly.shape == (26, 30)  # (X = columns, Y = rows) of the PNG
    assert np.allclose(anomaly.affine, np.eye(4))

    # the positive residual keeps only where the image is brighter than its counterfactual
    positive_out = tmp_path / "positive"
    args = ["explain", str(tmp_path / "xray.png"), "--checkpoint", str(bundle), "--out", str(positive_out)]
    result = runner.invoke(app, [*args, "--residual", "positive", "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    positive = np.asarray(nib.load(str(positive_out / "xray_anomaly_map.nii.gz")).dataobj)
    both = np.asarray(anomaly.dataobj)
    assert (positive >= 0).all() and (positive <= both + 1e-5).all()
    assert 0 < positive.sum() < both.sum()
    summary = json.loads((positive_out / "xray_explain.json").read_text())
    assert summary["params"]["residual"] == "positive"


def test_explain_with_region_guidance_of_a_multiple_instance_classifier(
    tmp_path: Path, tiny_dataset: Path, tracking_uri: str
) -> None:
    bundle = train_tiny(tmp_path, tiny_dataset, tracking_uri, "--set", "classifier.pooling=lse")
    scan = str(tiny_dataset.parent / "s5_t1.nii.gz")
    maps = {}
    for guidance in ("slice", "regions"):
        out = tmp_path / guidance
        args = ["explain", scan, "--checkpoint", str(bundle), "--out", str(out), "--scale", "50"]
        result = runner.invoke(app, [*args, "--guidance", guidance, "--tracking-uri", tracking_uri])
        assert result.exit_code == 0, result.output
        maps[guidance] = np.asarray(nib.load(str(out / "s5_t1_anomaly_map.nii.gz")).dataobj)
        assert json.loads((out / "s5_t1_explain.json").read_text())["params"]["guidance"] == guidance
    assert np.isfinite(maps["regions"]).all() and maps["regions"].max() > 0
    assert not np.allclose(maps["slice"], maps["regions"])  # a different push, a different counterfactual
    # the counterfactual options through --set: masked decoding, paired with the plain reconstruction, a gate
    out = tmp_path / "masked"
    args = ["explain", scan, "--checkpoint", str(bundle), "--out", str(out), "--scale", "50", "--guidance", "regions"]
    options = ["explain.pairing=reconstruction", "explain.decoding=masked", "explain.mask.threshold=0.2"]
    result = runner.invoke(app, [*args, *(x for o in options for x in ("--set", o)), "--tracking-uri", tracking_uri])
    assert result.exit_code == 0, result.output
    params = json.loads((out / "s5_t1_explain.json").read_text())["params"]
    assert (params["decoding"], params["pairing"], params["mask_threshold"]) == ("masked", "reconstruction", 0.2)
    masked = np.asarray(nib.load(str(out / "s5_t1_anomaly_map.nii.gz")).dataobj)
    assert np.isfinite(masked).all() and not np.allclose(masked, maps["regions"])
    bad = runner.invoke(app, [*args, "--set", "explain.gate=2", "--overwrite", "--tracking-uri", tracking_uri])
    assert bad.exit_code == 1 and "explain.gate" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_registry_flow_train_register_then_explain_by_model_uri(tmp_path: Path, tiny_dataset: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    train_tiny(tmp_path, tiny_dataset, uri, "--register", "brain-ad")
    client = MlflowClient(uri)
    (version,) = client.search_model_versions("name='brain-ad'")
    assert str(version.version) == "1" and version.source == f"runs:/{version.run_id}/model"
    train_run = client.get_run(version.run_id)
    assert train_run.data.tags["adiff.registered_model"] == "brain-ad/1"
    result = runner.invoke(app, ["register", version.run_id, "brain-ad", "--alias", "champion", "--tracking-uri", uri])
    assert result.exit_code == 0 and "registered models:/brain-ad/2 (alias @champion)" in result.output
    scan = str(tiny_dataset.parent / "s5_t1.nii.gz")
    for model_uri, expected in (("models:/brain-ad/1", "brain-ad/1"), ("models:/brain-ad@champion", "brain-ad/2")):
        out = tmp_path / expected.replace("/", "_")
        result = runner.invoke(app, ["explain", scan, "--model", model_uri, "--out", str(out), "--tracking-uri", uri])
        assert result.exit_code == 0, result.output
        explain = client.search_runs([train_run.info.experiment_id], f"tags.`adiff.model` = '{expected}'")
        assert len(explain) == 1 and explain[0].data.tags["adiff.train_run_id"] == version.run_id
    line = one_line_error(
        runner.invoke(
            app, ["explain", scan, "--model", "models:/brain-ad/9", "--out", str(tmp_path / "x"), "--tracking-uri", uri]
        )
    )
    assert "models:/brain-ad/9: not found in the registry" in line
    line = one_line_error(runner.invoke(app, ["register", "0" * 32, "x", "--tracking-uri", uri]))
    assert "is not in" in line


def test_help_names_the_model_defaults_and_flags_take_no_value() -> None:
    result = runner.invoke(app, ["explain", "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for key in ("noise_level", "scale", "steps", "guidance", "residual"):
        assert f"the model's explain.{key}" in text, key
    assert "cfg" in text  # the classifier-free target is a --guidance choice
    flags = [line for line in result.output.splitlines() if "--overwrite" in line or "--fp32" in line]
    assert len(flags) == 2 and not any("<bool>" in line for line in flags)
    # no command's own --help row (nor the group's) shows a value either
    for command in ([], ["train"], ["explain"], ["evaluate"], ["demo"], ["ui"]):
        output = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"}).output
        rows = [line for line in output.splitlines() if "Show this message and exit" in line]
        assert len(rows) == 1 and "<bool>" not in output, (command, rows)

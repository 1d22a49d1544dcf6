"""Classifier-free guidance through the real CLI: tiny train -> bundle -> explain and evaluate, with the
method, w and label dropout in MLflow and one-line refusals of options that do not apply."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from cli_support import one_line_error, runner, train_tiny
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.models.bundle import load_bundle


def _explain(scan: Path, bundle: Path, out: Path, uri: str, *extra: str) -> list[str]:
    return ["explain", str(scan), "--checkpoint", str(bundle), "--out", str(out), "--tracking-uri", uri, *extra]


def test_classifier_free_train_explain_and_evaluate(tmp_path: Path, tiny_dataset: Path, tracking_uri: str) -> None:
    bundle_path = train_tiny(
        tmp_path, tiny_dataset, tracking_uri, "--set", "method=classifier_free", "--set", "cfg.label_dropout=0.2"
    )
    bundle = load_bundle(bundle_path)
    assert bundle.config.method == "classifier_free" and bundle.classifier is None
    assert torch.load(bundle_path, weights_only=True)["classifier"] is None  # the bundle holds no classifier

    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    out = tmp_path / "explain"
    result = runner.invoke(
        app,
        _explain(
            scan,
            bundle_path,
            out,
            tracking_uri,
            "--scale",
            "2.5",
            "--mask",
            str(tiny_dataset.parent / "s5_mask.nii.gz"),
        ),
    )
    assert result.exit_code == 0, result.output
    assert "classifier-free model, no p(healthy)" in result.output and "AUPRC" in result.output
    summary = json.loads((out / "s5_t1_explain.json").read_text())
    assert summary["params"]["guidance"] == "cfg" and summary["params"]["cfg_weight"] == 2.5
    assert "p_healthy_before_mean" not in summary["metrics"]

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    train, explain = runs["tiny-train"], runs["explain-s5_t1"]
    assert train.data.params["method"] == "classifier_free" and train.data.params["cfg.label_dropout"] == "0.2"
    assert "classifier_loss" not in train.data.metrics
    assert "label-conditional DDPM for classifier-free guidance" in train.data.tags["mlflow.note.content"]
    params = explain.data.params
    assert (params["method"], params["guidance"], params["cfg_weight"], params["cfg_label_dropout"]) == (
        "classifier_free",
        "cfg",
        "2.5",
        "0.2",
    )
    assert "classifier-free guidance towards healthy, w=2.5" in explain.data.tags["mlflow.note.content"]

    # options that need a classifier are refused with one line, before any output is written
    refused = runner.invoke(app, _explain(scan, bundle_path, tmp_path / "no", tracking_uri, "--guidance", "slice"))
    assert "guidance=slice needs a classifier; this model is classifier-free" in one_line_error(refused)
    assert not (tmp_path / "no").exists()

    evaluation = tmp_path / "evaluation"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_dataset),
            "--split",
            "test",
            "--checkpoint",
            str(bundle_path),
            "--methods",
            "cfg-w2:g=cfg;s=2,cfg-w5:s=5,unguided,intensity",
            "--bootstrap",
            "0",
            "--out",
            str(evaluation),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    methods = [r["method"] for r in json.loads((evaluation / "results.json").read_text())["results"]]
    assert methods == ["cfg-w2", "cfg-w5", "unguided", "intensity"]


def test_a_classifier_model_refuses_cfg_guidance(tmp_path: Path, tiny_dataset: Path, tracking_uri: str) -> None:
    bundle_path = train_tiny(tmp_path, tiny_dataset, tracking_uri)
    scan = tiny_dataset.parent / "s5_t1.nii.gz"
    refused = runner.invoke(app, _explain(scan, bundle_path, tmp_path / "out", tracking_uri, "--guidance", "cfg"))
    assert "guidance=cfg needs a classifier-free model" in one_line_error(refused)

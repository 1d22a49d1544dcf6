"""`adiff evaluate` through the real CLI on planted lesions, tracked in a SQLite MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from cli_support import one_line_error, runner
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.config import load_config
from anomaly_diffusion.evaluation.grammar import parse_method

pytestmark = pytest.mark.slow


def test_evaluate_writes_tables_plots_and_an_mlflow_run(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    out = tmp_path / "evaluation"
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tiny_dataset),
            "--split",
            "test",
            "--threshold-split",
            "val",
            "--checkpoint",
            str(bundle),
            "--methods",
            "guided,unguided,intensity,strong:L=10;s=30;K=5,mix:L=10+20;K=5;enc=noise;n=2;m=0,bright:L=10;s=30;K=5;r=pos,"
            "paired:L=10;s=30;K=5;r=pos;p=rec",
            "--bootstrap",
            "20",
            "--median-filter",
            "3",
            "--out",
            str(out),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| guided |" in result.output and "| intensity |" in result.output
    for name in ("results.md", "results.json", "roc_pr.png", "dice_threshold.png", "montage.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "results.json").read_text())
    by_method = {r["method"]: r for r in report["results"]}
    assert list(by_method) == ["guided", "unguided", "intensity", "strong", "mix", "bright", "paired"]
    assert report["threshold_source"] == "best Dice on the val split"
    assert report["lesion_voxels"] > 0 and report["pathological_slices"] > 0 and report["healthy_slices"] > 0
    # the planted lesions are +80 on a brain of 100 +- 10: intensity alone must find them
    intensity = by_method["intensity"]
    assert intensity["auroc"] > 0.95 and intensity["dice_best"] > 0.6
    for r in by_method.values():
        assert 0 <= r["auroc"] <= 1 and 0 < r["auprc"] <= 1
        assert 0 <= r["dice_best"] <= 1 and r["dice_best"] >= r["dice_chosen"] - 1e-9
        assert set(r["dice_at_fpr"]) == {"1%", "5%"}
        assert set(r["by_size"]) == {"small", "medium", "large"}
        assert set(r["per_volume"]) == {"s5"}
    assert by_method["strong"]["description"] == "guided s=30, L=10, K=5"
    # same decoding as 'strong', only its brighter-than-healthy part: the planted lesions are bright
    assert by_method["bright"]["description"] == "guided s=30, L=10, K=5, positive residual"
    assert by_method["bright"]["auroc"] != by_method["strong"]["auroc"]
    # the same decoding again, measured against the plain reconstruction of its x_L
    assert by_method["paired"]["description"].endswith("paired with the plain reconstruction, positive residual")
    assert by_method["paired"]["auroc"] != by_method["bright"]["auroc"]
    # counterfactual quality for every diffusion method, none for raw intensity
    assert by_method["intensity"]["quality"] == {}
    for name in ("guided", "unguided", "strong", "paired"):
        q = by_method[name]["quality"]
        assert q["change_clean"] > 0 and q["change_diseased"] > 0 and q["lesion_removal"] < 1, name
        assert 0 <= q["p_healthy_diseased"] <= 1, name
    assert by_method["strong"]["quality"] == by_method["paired"]["quality"]  # one counterfactual, two maps
    assert "### Counterfactual quality" in (out / "results.md").read_text()
    assert (by_method["guided"]["regime"], by_method["intensity"]["regime"]) == ("weak", "none")
    assert "| weak | guided |" in result.output and "| none | intensity |" in result.output
    mix = "guided s=10, L=10+20, K=5, noised to L (DDPM forward), mean of 2 draw(s), median filter 0"
    assert by_method["mix"]["description"] == mix
    client = MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("anomaly_diffusion").experiment_id], "tags.`adiff.kind` = 'evaluate'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["split"] == "test" and run.data.params["threshold_split"] == "val"
    assert run.data.metrics["intensity.auroc"] == pytest.approx(intensity["auroc"])
    strong_change = by_method["strong"]["quality"]["change_clean"]
    assert run.data.metrics["strong.quality_change_clean"] == pytest.approx(strong_change)
    assert "guided.dice_slice_otsu" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/results.md", "evaluate/roc_pr.png", "evaluate/montage.png"} <= logged
    assert run.data.tags["adiff.train_run_id"]


def test_evaluate_leave_one_volume_out_and_bootstrap(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    out = tmp_path / "loo"
    args = ["evaluate", str(tiny_dataset), "--split", "train", "--max-volumes", "3", "--checkpoint", str(bundle)]
    args += ["--methods", "unguided,intensity", "--bootstrap", "50", "--out", str(out), "--tracking-uri", tracking_uri]
    # the trained model's explain defaults replaced: 'unguided' now decodes from L=10 in 2 steps
    args += ["--set", "explain.noise_level=10", "--set", "explain.steps=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["results"][0]["description"] == "unguided reconstruction, L=10, K=2"
    assert report["threshold_source"].startswith("best Dice on the other volumes")
    intensity = report["results"][1]
    assert len(intensity["per_volume"]) == 3
    low, high = intensity["ci"]["auroc"]
    assert low <= high and not math.isnan(low)
    # existing outputs are refused without --overwrite, and left as they were
    before = (out / "results.md").read_bytes()
    line = one_line_error(runner.invoke(app, args))
    assert "exists" in line and (out / "results.md").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--methods", "bogus"], "unknown method"),
        (["--methods", "guided,guided"], "unique"),
        (["--methods", "x:L=5000"], "noise level"),
        (["--methods", "x:L=10+5000"], "noise level"),
        (["--methods", "x:enc=ddpm"], "enc must be ddim, noise, coarse or simplex"),
        (["--methods", "x:n=3"], "only with enc=noise"),
        (["--methods", "x:m=99"], "median filter"),
        (["--methods", "x:q=1"], "expected keys"),
        (["--methods", "x:c=0;L=5"], "takes only c and m"),
        (["--methods", "x:c=7"], "channel must be"),
        (["--methods", "x:r=both"], "r must be abs, pos or neg"),
        (["--methods", "x:g=both"], "g must be slice, regions or cfg"),
        (["--set", "data.image_size=32"], "only explain.* settings can change"),
        (["--set", "explain.guidance=regions"], "guidance=regions needs classifier.pooling=lse"),
        (["--methods", "x:g=regions"], "needs a classifier with pooling=lse"),
        (["--split", "val", "--threshold-split", "val"], "must differ"),
        (["--split", "nope"], "train, val or test"),
        (["--fpr", "2"], "false-positive rates"),
    ],
)
def test_evaluate_bad_options_give_one_line(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str, extra: list[str], expected: str
) -> None:
    args = ["evaluate", str(tiny_dataset), "--checkpoint", str(bundle), "--out", str(tmp_path / "e")]
    line = one_line_error(runner.invoke(app, [*args, "--tracking-uri", tracking_uri, *extra]))
    assert expected in line
    assert not (tmp_path / "e").exists()


def test_parse_method_specs() -> None:
    cfg = load_config(None)
    guided = parse_method("guided", cfg)
    assert (guided.noise_level, guided.scale, guided.steps) == (500, 100.0, None)
    assert parse_method("unguided", cfg).scale == 0.0
    paper = parse_method("paper", cfg)
    assert (paper.noise_level, paper.scale, paper.steps) == (500, 100.0, None)
    custom = parse_method("fast:L=200,s=6,K=20", cfg)
    assert (custom.name, custom.noise_level, custom.scale, custom.steps) == ("fast", 200, 6.0, 20)
    assert parse_method("intensity", cfg).channel == 0
    ensemble = parse_method("ens:L=100+200+300,enc=noise,n=4,m=5", cfg)
    assert ensemble.levels == (100, 200, 300) and ensemble.encoding == "noise" and ensemble.seeds == 4
    assert ensemble.median == 5 and ensemble.scale == 100.0
    assert (guided.regime, parse_method("intensity", cfg).regime) == ("weak", "none")
    unsupervised = load_config(None, ["data.ddpm_train_on=all"])
    assert parse_method("unguided", unsupervised).regime == "unsupervised"
    assert parse_method("unguided", cfg).regime == "weak"  # its DDPM saw only slices labelled healthy
    assert (guided.residual, guided.guidance) == ("abs", "slice")  # the bundle's explain defaults
    signed = parse_method("bright:L=100,s=300,r=pos", cfg)
    assert (signed.residual, parse_method("dark:r=neg", cfg).residual) == ("positive", "negative")
    assert "positive residual" in signed.describe()
    regions = parse_method("r:g=regions", cfg)
    assert regions.guidance == "regions" and "regions guidance" in regions.describe()
    brats = load_config(None, ["classifier.pooling=lse", "explain.guidance=regions", "explain.residual=positive"])
    assert parse_method("guided", brats).describe().endswith("regions guidance, positive residual")
    assert parse_method("paper-ish:g=slice;r=abs".replace(";", ","), brats).describe() == "guided s=100, L=500, K=500"
    smooth = parse_method("flair-m5:c=0,m=5", cfg)
    assert (smooth.kind, smooth.channel, smooth.median) == ("intensity", 0, 5)

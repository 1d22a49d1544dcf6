"""`adiff demo` end to end through the real CLI, with tiny networks: both lesion kinds explained and
each printed beside the raw-intensity baseline, all runs in the SQLite store."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from cli_support import runner
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app

pytestmark = pytest.mark.slow

TINY_NETWORKS = [
    "unet.channels=[8,16]",
    "unet.attention_levels=[false,false]",
    "unet.norm_num_groups=8",
    "unet.num_head_channels=8",
    "classifier.channels=[8,16]",
    "classifier.attention_levels=[false,false]",
    "classifier.norm_num_groups=8",
    "classifier.num_head_channels=8",
    "data.image_size=16",
    "train.ddpm_steps=2",
    "train.classifier_steps=2",
    "train.checkpoint_every=2",
    "train.batch_size=4",
    "explain.noise_level=10",
    "explain.steps=2",
]


def test_demo_explains_one_subject_of_each_lesion_kind(tmp_path: Path, tracking_uri: str) -> None:
    work = tmp_path / "demo"
    args = ["demo", "--work-dir", str(work), "--subjects", "16", "--tracking-uri", tracking_uri, "--threads", "1"]
    for item in TINY_NETWORKS:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "compute: cpu, 1 thread," in out
    assert "grey lesions (masses of grey-matter intensity" in out and "bright lesions (hyperintense" in out
    assert out.count("raw-intensity baseline: AUPRC=") == 2
    assert "demo wall time:" in out
    kinds = dict(line.split(",")[::2] for line in (work / "data" / "lesion_kinds.csv").read_text().splitlines()[1:])
    summaries = sorted((work / "explain").glob("*_explain.json"))
    assert len(summaries) == 2
    explained = {path.name.split("_")[0] for path in summaries}
    assert {kinds[s] for s in explained} == {"grey", "bright"}
    for path in summaries:
        metrics = json.loads(path.read_text())["metrics"]
        assert 0 <= metrics["pixel_auprc"] <= 1 and 0 <= metrics["intensity_baseline_auprc"] <= 1
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("anomaly_diffusion").experiment_id])
    assert sorted(r.data.tags["adiff.kind"] for r in runs) == ["explain", "explain", "train"]
    train_run = next(r for r in runs if r.data.tags["adiff.kind"] == "train")
    assert train_run.data.params["train.threads"] == "1"
    assert train_run.data.params["train.precision"].split(" (")[0] in ("bfloat16", "float32")
    # the demo ends with a command to try next: it runs as printed, from where the user stands
    (line,) = [line for line in out.splitlines() if line.startswith("next, another held-out subject: ")]
    command = shlex.split(line.split(": ", 1)[1])
    assert command[:2] == ["adiff", "explain"] and "--checkpoint" in command and "--brainmask" in command
    assert not Path(command[2]).is_absolute()  # relative to the current folder, where the demo ran
    follow = runner.invoke(app, command[1:])
    assert follow.exit_code == 0, follow.output
    assert ("vs mask: AUPRC=" in follow.output) == ("--mask" in command)
    # and without --checkpoint the store's newest training run (the demo's, outside ./adiff_runs) is found
    default = runner.invoke(app, ["explain", command[2], "--out", "again", "--tracking-uri", tracking_uri])
    assert default.exit_code == 0, default.output
    assert f"the newest training run in {tracking_uri}: demo-train-" in default.output

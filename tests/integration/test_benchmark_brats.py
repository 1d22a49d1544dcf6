"""benchmarks/brats.py end to end on a synthetic BraTS 2018 layout with the tiny config: every stage,
RESULTS.md, the MLflow store, resuming without rerunning, and one-line errors; its pure parts on their own."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from anomaly_diffusion.errors import ConfigError

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "brats.py"
pytestmark = pytest.mark.slow


def _module(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is made
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _brats2018(root: Path, subjects: dict[str, str]) -> Path:
    """BraTS 2018 folders (4 sequences + seg, background 0), a bright lesion in the middle slices; the split file."""
    rng = np.random.default_rng(0)
    shape = (24, 24, 10)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    brain = (grid[0] ** 2 / 0.8 + grid[1] ** 2 / 0.7 + grid[2] ** 2 / 1.2) < 1
    for subject in subjects:
        folder = root / "brats2018" / "train" / subject
        folder.mkdir(parents=True)
        seg = np.zeros(shape, np.uint8)
        cx, cy = 12 + int(rng.integers(-2, 3)), 12 + int(rng.integers(-2, 3))
        seg[cx - 3 : cx + 3, cy - 3 : cy + 3, 3:7] = 2
        seg &= brain.astype(np.uint8) * 255
        for suffix, gain in (("flair", 80), ("t1", -30), ("t1ce", 20), ("t2", 60)):
            image = np.where(brain, 300 + 30 * rng.standard_normal(shape), 0)
            image[seg > 0] += gain * 3
            nib.save(nib.Nifti1Image(image.astype(np.int16), np.eye(4)), str(folder / f"{subject}_{suffix}.nii.gz"))
        nib.save(nib.Nifti1Image(seg, np.eye(4)), str(folder / f"{subject}_seg.nii.gz"))
    splits = root / "splits.csv"
    with splits.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "split", "source"])
        writer.writerows([s, split, "synthetic"] for s, split in subjects.items())
    return splits


def _bench_command(data: Path, work: Path, splits: Path, *more: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--data",
        str(data),
        "--work",
        str(work),
        "--splits",
        str(splits),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--channel-sets",
        "flair",
        "--grid",
        "L=10;s=0,10;K=3;g=slice;r=positive;m=0,3",
        "--bootstrap",
        "10",
        "--worst",
        "2",
        *more,
    ]


def _bench(data: Path, work: Path, splits: Path, *more: str) -> subprocess.CompletedProcess[str]:
    command = _bench_command(data, work, splits, *more)
    return subprocess.run(command, capture_output=True, text=True, check=False, cwd=work.parent)


def test_benchmark_runs_every_stage_then_resumes_without_rerunning(tmp_path: Path) -> None:
    subjects = {f"Brats18_X_{i}_1": split for i, split in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)}
    splits = _brats2018(tmp_path / "data", subjects)
    work = tmp_path / "work"
    done = _bench(tmp_path / "data", work, splits, "--arms", "cg", "--min-component", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cg = work / "flair" / "cg"
    for path in ("bundle.pt", "val/results.json", "test/results.json", "worst/worst.png", "worst/worst.json"):
        assert (cg / path).stat().st_size > 0, path
    choice = json.loads((cg / "choose.json").read_text())
    assert [c["name"] for c in choice["candidates"]] == [
        "L10-s0-K3-pos-m0",
        "L10-s0-K3-pos-m3",
        "L10-s10-K3-slice-pos-m0",
        "L10-s10-K3-slice-pos-m3",
    ]
    val = {r["method"]: r for r in json.loads((cg / "val" / "results.json").read_text())["results"]}
    assert "int-flair" in val and "int-flair" not in choice["ranked"]  # a reference row, never a candidate
    best = max(choice["candidates"], key=lambda c: (round(val[c["name"]]["auprc"], 3), val[c["name"]]["dice_best"]))
    assert choice["chosen"] == choice["ranked"][0]
    assert round(val[best["name"]]["auprc"], 3) == round(val[choice["chosen"]]["auprc"], 3)
    test = json.loads((cg / "test" / "results.json").read_text())
    names = [r["method"] for r in test["results"]]
    assert names[0] == "chosen" and "guided" in names and "int-flair" in names
    assert test["threshold_source"] == "best Dice on the val split"
    assert test["postprocess"] == "binary components < 2 voxels dropped"
    chosen_m = next(c for c in choice["candidates"] if c["name"] == choice["chosen"])["values"]["m"]
    assert ("int-flair-m3" in names) == (chosen_m == "3")
    worst = json.loads((cg / "worst" / "worst.json").read_text())
    assert worst["diseased_slices"] == test["pathological_slices"] and 0 < len(worst["worst"]) <= 2
    assert worst["postprocess"] == test["postprocess"]

    results = (work / "RESULTS.md").read_text()
    for text in ("## Summary (test split)", "### Goals", "### Choice on val", "### Test split", "(chosen)"):
        assert text in results, text
    for goal in ("AUPRC and val-threshold Dice above raw FLAIR", "guided above unguided on every metric"):
        assert f"{goal}: **" in results, goal
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run_names = sorted(r.info.run_name for r in runs)
    assert run_names == ["benchmark-brats-flair", "brats-flair-cg", "evaluate-test", "evaluate-val"]
    bench_run = next(r for r in runs if r.info.run_name == "benchmark-brats-flair")
    assert bench_run.data.params["cg.chosen"] == choice["chosen_spec"]
    assert bench_run.data.metrics["cg.train_seconds"] > 0 and "cg.chosen.auprc" in bench_run.data.metrics

    stamp = (cg / "test" / "results.json").stat().st_mtime_ns
    again = _bench(tmp_path / "data", work, splits, "--arms", "cg", "--min-component", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ " not in again.stdout  # every stage reused: no tool ran
    assert (cg / "test" / "results.json").stat().st_mtime_ns == stamp
    plan = json.loads((work / "flair" / "plan.json").read_text())
    assert set(plan["status"].values()) == {"reused"}

    changed = _bench(
        tmp_path / "data", work, splits, "--arms", "cg", "--arm", "cg=train.ddpm_steps=3", "--min-component", "2"
    )
    assert changed.returncode == 1 and "$ " not in changed.stdout
    assert changed.stderr.strip().startswith("error:") and "--reuse" in changed.stderr
    assert len(changed.stderr.strip().splitlines()) == 1


def test_test_rows_per_arm(tmp_path: Path) -> None:
    brats = _module("brats")
    bench = SimpleNamespace(args=SimpleNamespace(extra_test=["x:L=5;s=1"], paper_steps="4"))
    s = brats.SetRun("all4", ("flair", "t1", "t1c", "t2"), tmp_path, tmp_path / "m.csv", tmp_path / "log.txt")
    grid = brats.candidates(brats.parse_grid("L=100;s=0,300;K=25;g=slice;r=positive;m=5"))
    listed = [{"name": c.name, "values": c.values} for c in grid]
    guided = {"candidates": listed, "chosen": grid[1].name, "guided": grid[1].name, "unguided": grid[0].name}
    plan = brats.test_methods(bench, s, brats.ARMS["cg"], guided, [5], holds_intensity=True)
    by_name = {m["name"]: m["spec"] for m in plan["methods"]}
    assert plan["roles"] == {"chosen": "chosen", "guided": "chosen", "unguided": "best-unguided", "default": "guided"}
    assert by_name["chosen"] == "chosen:L=100;s=300;K=25;g=slice;r=positive;m=5"
    assert by_name["best-unguided"].startswith("best-unguided:L=100;s=0;") and by_name["x"] == "x:L=5;s=1"
    assert plan["intensity"]["t1c"] == ["int-t1c", "int-t1c-m5"] and by_name["int-t1c-m5"] == "int-t1c-m5:c=2;m=5"
    # an unguided choice still gets the best guided row; an arm without the intensity rows scores none
    unguided = {**guided, "chosen": grid[0].name}
    plan = brats.test_methods(bench, s, brats.ARMS["cg"], unguided, [], holds_intensity=False)
    assert plan["roles"]["guided"] == "best-guided" and plan["roles"]["unguided"] == "chosen"
    assert plan["intensity"] == {} and not any(m["name"].startswith("int-") for m in plan["methods"])
    paper = brats.test_methods(bench, s, brats.ARMS["paper"], None, [], holds_intensity=False)
    assert paper["methods"] == [
        {"name": "paper", "role": "the paper's recipe", "spec": "paper:L=500;s=100;K=4;g=slice;r=abs"}
    ]
    # a grid without s=0: the unguided row is the chosen settings with s=0
    only = {"candidates": listed[1:], "chosen": grid[1].name, "guided": grid[1].name, "unguided": None}
    plan = brats.test_methods(bench, s, brats.ARMS["cg"], only, [], holds_intensity=False)
    assert {m["name"]: m["spec"] for m in plan["methods"]}["unguided-at-chosen"].startswith(
        "unguided-at-chosen:L=100;s=0;K=25"
    )


def test_bad_options_fail_with_one_line_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _brats2018(tmp_path / "data", {"Brats18_X_0_1": "train"})
    work = tmp_path / "work"
    brats = _module("brats")
    for more, message in [
        (["--arms", "nope"], "--arms: unknown ['nope']"),
        (["--arms", "paper"], "arm paper: "),  # L=500 is beyond the tiny schedule's 100 steps
        (["--arms", "cg", "--grid", "L=10;q=3"], "expected KEY=V1,V2"),
        (["--arms", "cg", "--redo", "everything"], "--redo: unknown stages"),
        (["--arms", "cg", "--arm-grid", "cg=g=nowhere"], "arm cg: "),
    ]:
        argv = _bench_command(tmp_path / "data", work, splits, *more)[1:]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exited:
            brats.main()
        text = str(exited.value.code)
        assert text.startswith("error:") and message in text and "\n" not in text, text
    assert not (work / "flair" / "manifest-flair.csv").exists()


def test_every_known_arm_fits_the_brats64_config(tmp_path: Path) -> None:
    brats = _module("brats")
    args = SimpleNamespace(overrides=[], grid=brats.DEFAULT_GRID, paper_steps="25", extra_test=[])
    bench = SimpleNamespace(args=args, config=ROOT / "configs" / "brats64.yaml", arm_grids={})
    s = brats.SetRun("all4", ("flair", "t1", "t1c", "t2"), tmp_path, tmp_path / "m.csv", tmp_path / "log.txt")
    for arm in brats.ARMS.values():
        brats.check_arm(bench, s, arm)  # raises ConfigError on a config or method that cannot run
    cfg = brats.arm_grid(bench, brats.ARMS["cfg"])
    assert {c.values["g"] for c in cfg} == {"cfg"} and sorted({c.values["s"] for c in cfg}) == ["0", "1", "3"]
    with pytest.raises(ConfigError, match="needs a classifier"):  # the global grid's g=slice on a CFG model
        brats.check_arm(bench, s, brats.parse_arm("cfg2=method=classifier_free;explain.guidance=cfg"))


def test_grid_candidates_and_the_choice_rule() -> None:
    brats = _module("brats")
    report = _module("brats_report")
    grid = brats.parse_grid("L=100,200;s=0,300;g=slice,regions", brats.parse_grid("L=50;s=1;K=25;r=positive;m=0"))
    names = [c.name for c in brats.candidates(grid)]
    # s=0 ignores the guidance target: one unguided candidate per L, not one per target
    assert names == [
        "L100-s0-K25-pos-m0",
        "L100-s300-K25-slice-pos-m0",
        "L100-s300-K25-regions-pos-m0",
        "L200-s0-K25-pos-m0",
        "L200-s300-K25-slice-pos-m0",
        "L200-s300-K25-regions-pos-m0",
    ]
    assert brats.candidates(grid)[1].spec == "L100-s300-K25-slice-pos-m0:L=100;s=300;K=25;g=slice;r=positive;m=0"
    assert brats.shared_work(brats.candidates(grid)) == (2, 6)
    # the counterfactual keys: dec, sm and gt make new decodings, p and rc only new maps
    paired = brats.candidates(brats.parse_grid("L=100;s=300;K=25;g=regions;r=positive;sm=0,4;p=input,rec;rc=0"))
    assert [c.name for c in paired] == [
        "L100-s300-K25-regions-pos-sm0-pinput-rc0",
        "L100-s300-K25-regions-pos-sm0-prec-rc0",
        "L100-s300-K25-regions-pos-sm4-pinput-rc0",
        "L100-s300-K25-regions-pos-sm4-prec-rc0",
    ]
    assert paired[1].spec.endswith(";sm=0;p=rec;rc=0") and brats.shared_work(paired) == (1, 2)
    listed = [{"name": c.name, "values": c.values} for c in brats.candidates(grid)]
    filtered = [{**c, "values": {**c["values"], "m": "5"}} if i == 4 else c for i, c in enumerate(listed)]
    choices = [
        {"candidates": filtered, "chosen": filtered[4]["name"], "ranked": [c["name"] for c in filtered]},
        {"candidates": listed, "chosen": listed[0]["name"]},
    ]
    assert brats.chosen_medians(choices) == [5]  # intensity is scored with the chosen map's filter too
    rows = {
        "a": {"auprc": 0.5001, "dice_best": 0.40},
        "b": {"auprc": 0.4999, "dice_best": 0.45},  # ties a at 3 decimals, better Dice
        "c": {"auprc": 0.70, "dice_best": float("nan")},
        "d": {"auprc": float("nan"), "dice_best": 0.9},
    }
    assert report.rank_candidates(rows, ["a", "b", "d"]) == ["b", "a", "d"]
    assert report.rank_candidates(rows, ["a", "b", "c", "d"])[0] == "c"


def test_goal_verdicts_follow_the_numbers() -> None:
    report = _module("brats_report")

    def row(name: str, auprc: float, dice: float, small: float | None = None) -> dict[str, object]:
        by_size = {"small": {"slices": 3.0, "auprc": small, "dice_slice_otsu": small}} if small is not None else {}
        metrics = {m: auprc for m in report.EVERY_METRIC}
        return {"method": name, **metrics, "auprc": auprc, "dice_chosen": dice, "by_size": by_size, "dice_at_fpr": {}}

    chosen = {**row("chosen", 0.8, 0.7, small=0.3), "slice_auroc_max": 0.97, "slice_auroc_mean": 0.94}
    unguided = row("best-unguided", 0.2, 0.2)
    flair = {"flair": [row("int-flair", 0.7, 0.75, small=0.1), row("int-flair-m5", 0.75, 0.6, small=0.2)]}
    found = {g.goal: g for g in report.goals(("flair",), chosen, chosen, unguided, flair)}
    assert found["AUPRC and val-threshold Dice above raw FLAIR"].verdict == "missed"  # Dice 0.70 < 0.75
    assert "Dice (val thr.) 0.700 vs 0.750" in found["AUPRC and val-threshold Dice above raw FLAIR"].detail
    assert found["slice AUROC > 0.95 (max score per slice)"].verdict == "met"
    assert found["slice AUROC > 0.95 (mean score per slice)"].verdict == "missed"
    assert found["guided above unguided on every metric"].verdict == "met"
    assert found["small lesions (< 1 cm² slices) above raw FLAIR intensity"].verdict == "met"  # 0.3 vs 0.2
    worse = {**unguided, "slice_auroc_mean": 0.95}
    lost = {g.goal: g for g in report.goals(("flair",), chosen, chosen, worse, flair)}
    assert lost["guided above unguided on every metric"].verdict == "missed"
    assert "slice AUROC (mean) 0.940 vs 0.950" in lost["guided above unguided on every metric"].detail
    t1c = {g.goal: g for g in report.goals(("t1c",), row("chosen", 0.41, 0.3), None, None, {"t1c": [row("i", 1, 1)]})}
    assert t1c["AUPRC > 0.40 (T1C only)"].verdict == "met"
    assert t1c["guided above unguided on every metric"].verdict == "n/a"
    assert t1c["small lesions (< 1 cm² slices) above raw T1C intensity"].verdict == "n/a"

"""BraTS benchmark: prepare, train on the train split, evaluate every method on the validation split.

    python benchmarks/brats.py --data ../shared/data/brats2015 --work adiff_bench_brats

Runs the real tools (data_prep/brats.py, `adiff inspect`, `adiff train`, `adiff evaluate`) for
two channel settings: FLAIR+T1c (where raw FLAIR intensity is a very strong detector) and
T1c-only (where intensity is weak). Every run lands in one MLflow store (WORK/mlruns.db) and the
tables are printed at the end and written to WORK/RESULTS.md. Budget and sizes come from
configs/brats64.yaml; `--set KEY=VALUE` overrides apply to both trainings (e.g. a longer
`train.ddpm_steps=3000` on a GPU). With 4 subjects (2 train, 2 val) the chosen-threshold Dice
is leave-one-volume-out and the bootstrap intervals over 2 volumes are wide: read them as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from anomaly_diffusion.config import load_config

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "flair_t1c": ("flair,t1c", "intensity,intensity-m5:c=0;m=5,intensity:1"),
    "t1c": ("t1c", "intensity,intensity-m5:c=0;m=5"),
}


def run(command: list[str], log: Path) -> str:
    """Run a command, echo and log its output; stop the benchmark if it fails."""
    print("$", shlex.join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    text = result.stdout + result.stderr
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(command)}\n{text}\n")
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {shlex.join(command)}\n{text[-3000:]}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "brats2015")
    parser.add_argument("--work", type=Path, default=Path("adiff_bench_brats"))
    parser.add_argument("--variants", default="flair_t1c,t1c", help="Comma-separated: flair_t1c, t1c.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Config override (both runs).")
    parser.add_argument(
        "--methods",
        default=(
            "guided,guided-m5:m=5,guided-abs:r=abs,regions-s30:g=regions;s=30,regions-s100:g=regions;s=100,"
            "unguided,noise-n4-m5:enc=noise;n=4;m=5,L200:L=200,ens-L100-150:L=100+150,"
            "paper-L500-K25:L=500;s=100;K=25;g=slice;r=abs"
        ),
        help="Diffusion methods for adiff evaluate (intensity baselines are added per variant).",
    )
    parser.add_argument("--median-filter", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="Keep a variant's trained WORK/VARIANT/run/bundle.pt: evaluate only."
    )
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"error: {args.data}: BraTS folder not found (pass --data)")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    adiff = [sys.executable, "-m", "anomaly_diffusion.cli"]
    env_threads = os.environ.get("OMP_NUM_THREADS", "default")
    tables = [f"# BraTS benchmark ({time.strftime('%Y-%m-%d %H:%M')}, torch threads: {env_threads})\n"]
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        channels, baselines = VARIANTS[variant]
        folder = work / variant
        folder.mkdir(exist_ok=True)
        log = folder / "log.txt"
        manifest = folder / "manifest.csv"
        run([sys.executable, "data_prep/brats.py", str(args.data), "--out", str(manifest), "--channels", channels], log)
        n_channels = len(channels.split(","))
        sets = ["--set", f"data.manifest={manifest}", "--set", f"data.image_channels={n_channels}"]
        for override in args.overrides:
            sets += ["--set", override]
        summary = run([*adiff, "inspect", str(manifest), "--config", "configs/brats64.yaml", *sets], log)
        started = time.perf_counter()
        bundle = folder / "run" / "bundle.pt"
        explain_sets: list[str] = []
        reused = args.reuse and bundle.exists()
        if reused:
            trained = f"reused {bundle} (trained earlier; its time is in the MLflow run brats-{variant})"
            # a reused bundle keeps the explain defaults it was trained with: score it with today's
            explain = load_config(ROOT / "configs" / "brats64.yaml", args.overrides).explain.model_dump(mode="json")
            for key, value in explain.items():
                explain_sets += ["--set", f"explain.{key}={json.dumps(value)}"]
        else:
            trained = run(
                [
                    *adiff,
                    "train",
                    "--config",
                    "configs/brats64.yaml",
                    *sets,
                    "--out",
                    str(folder / "run"),
                    "--run-name",
                    f"brats-{variant}",
                    "--tracking-uri",
                    uri,
                ],
                log,
            )
        train_text = "reused" if reused else f"{(time.perf_counter() - started) / 60:.1f} min"
        probe = run([sys.executable, "benchmarks/probe.py", str(manifest), str(bundle)], log)
        started = time.perf_counter()
        evaluated = run(
            [
                *adiff,
                "evaluate",
                str(manifest),
                "--split",
                "val",
                "--checkpoint",
                str(bundle),
                "--methods",
                f"{args.methods},{baselines}",
                "--median-filter",
                str(args.median_filter),
                "--bootstrap",
                str(args.bootstrap),
                "--out",
                str(folder / "evaluation"),
                "--overwrite",
                "--tracking-uri",
                uri,
                *explain_sets,
            ],
            log,
        )
        eval_seconds = time.perf_counter() - started
        table = (folder / "evaluation" / "results.md").read_text()
        tables.append(
            f"# {variant} (channels {channels})\n\n```\n{summary.strip()}\n{trained.strip()}\n```\n\n"
            f"Training {train_text}, evaluation {eval_seconds / 60:.1f} min.\n\n{table}\n"
            f"### Does the classifier read the slice's level? (benchmarks/probe.py)\n\n{probe.strip()}\n"
        )
        print(tables[-1], flush=True)
        del evaluated
    (work / "RESULTS.md").write_text("\n".join(tables))
    print(f"results: {work / 'RESULTS.md'}   MLflow store: {uri}")


if __name__ == "__main__":
    main()

"""Cohort explain throughput: studies/hour with 1 process and with N processes under torchrun.

    python benchmarks/cohort.py                        # 4 demo studies, 1 process x 2 threads vs 2 x 1
    python benchmarks/cohort.py --studies 8 --processes 2 --config demo

Builds a synthetic cohort with the demo's dataset builder (MNI152 template, 2 mm, lesions in
some subjects; every manifest row is a study) and a bundle of the config's networks with
untrained weights (the output layers randomised so nothing is trivially zero: the cost of an
explanation depends on the architecture and the explain settings, not on the weights). Then runs
the real `adiff explain MANIFEST` on it twice into fresh output folders and MLflow stores:

- 1 process with `--threads 1` (one core: the unit N processes scale from),
- 1 process with `--threads C` (C = --cores, all the cores),
- `torchrun --nproc_per_node=N` with OMP_NUM_THREADS = C / N per process,

and prints, for each, the wall time of the command (Python start, model load, MLflow included),
studies/hour from it, studies/hour inside the run (the parent run's `studies_per_hour` metric:
from the cohort's start to its summary), the seconds per study, and N processes against each single-process run. Nothing
here is a test: numbers vary with the machine and its load (look at `uptime` first).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build(work: Path, studies: int, config: str) -> tuple[Path, Path]:
    """The synthetic cohort's manifest and an untrained bundle of the config's networks."""
    from anomaly_diffusion.config import load_config
    from anomaly_diffusion.data.manifest import read_manifest, write_manifest
    from anomaly_diffusion.data.synthetic import build_demo_dataset
    from anomaly_diffusion.diffusion.schedule import make_schedule
    from anomaly_diffusion.models.bundle import save_bundle
    from anomaly_diffusion.models.networks import build_classifier, build_unet
    from anomaly_diffusion.usecases.common import packaged_config

    data = work / "data"
    rows = read_manifest(data / "manifest.csv") if (data / "manifest.csv").is_file() else []
    if len(rows) < studies:
        built = build_demo_dataset(data, n_subjects=max(studies, 4), lesion_kinds=("bright", "grey"))
        rows = read_manifest(built)
    manifest = write_manifest(rows[:studies], data / f"cohort-{studies}.csv")
    cfg = load_config(packaged_config(config) if config in ("default", "demo", "tiny") else Path(config))
    channels = cfg.data.image_channels
    torch.manual_seed(0)
    unet = build_unet(cfg.unet, channels)
    torch.nn.init.normal_(unet.out[-1].conv.weight, std=0.02)  # MONAI zero-initialises it
    classifier = build_classifier(cfg.classifier, channels)
    schedule = make_schedule(cfg.schedule.kind, cfg.schedule.num_timesteps)
    bundle = save_bundle(work / "bundle.pt", config=cfg, schedule=schedule, unet=unet, classifier=classifier)
    return manifest, bundle


def run(name: str, command: list[str], env: dict[str, str], work: Path) -> float:
    """Run one cohort; returns its wall time in seconds (stops the benchmark if it fails)."""
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work, check=False)
    seconds = time.perf_counter() - started
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def in_run_rate(uri: str) -> float:
    """The `studies_per_hour` metric of the store's cohort parent run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    (parent,) = client.search_runs(
        [experiment.experiment_id],
        "tags.`adiff.kind` = 'explain-cohort'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return float(parent.data.metrics["studies_per_hour"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("adiff_bench_cohort"))
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2, help="N for the torchrun run.")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores shared by the processes.")
    parser.add_argument("--config", default="demo", help="Packaged config (demo, default, tiny) or a YAML file.")
    parser.add_argument("--set", dest="options", action="append", default=[], help="Extra `adiff explain` option.")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest, bundle = build(work, args.studies, args.config)
    print(f"cohort: {args.studies} studies in {manifest} ({time.perf_counter() - started:.0f} s to build)", flush=True)
    base_env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    explain = ["-m", "anomaly_diffusion.cli", "explain", str(manifest), "--checkpoint", str(bundle), *args.options]
    results = {}
    per_process = max(args.cores // args.processes, 1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}"]
    setups = {
        "1 process x 1 thread": ([sys.executable, *explain], 1),
        f"1 process x {args.cores} threads": ([sys.executable, *explain], args.cores),
        f"{args.processes} processes x {per_process} thread(s)": ([*torchrun, *explain], per_process),
    }
    for i, (name, (command, threads)) in enumerate(setups.items()):
        (work / f"run{i}.db").unlink(missing_ok=True)  # a fresh store: one cohort parent run in it
        uri = f"sqlite:///{work / f'run{i}.db'}"
        out = work / f"out{i}"
        command = [*command, "--out", str(out), "--tracking-uri", uri, "--overwrite"]
        env = {**base_env, "OMP_NUM_THREADS": str(threads)}
        if "torch.distributed.run" not in command:
            command += ["--threads", str(threads)]
        seconds = run(f"run{i}", command, env, work)
        results[name] = (seconds, in_run_rate(uri))
    print(f"\nstudies/hour on {args.cores} CPU cores ({args.config} config, {args.studies} studies):")
    print(f"{'setup':<28} {'wall s':>7} {'studies/h':>10} {'in-run studies/h':>17} {'s/study':>8}")
    for name, (seconds, rate) in results.items():
        print(f"{name:<28} {seconds:>7.0f} {args.studies / seconds * 3600:>10.1f} {rate:>17.1f} {3600 / rate:>8.1f}")
    *singles, (_, (many_s, many_rate)) = results.items()
    for name, (one_s, one_rate) in singles:
        print(f"{args.processes} processes vs {name}: {one_s / many_s:.2f}x wall, {many_rate / one_rate:.2f}x in-run")


if __name__ == "__main__":
    main()

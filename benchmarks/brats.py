"""The BraTS detection benchmark as one command: prepare -> train -> choose on val -> score on test.

    python benchmarks/brats.py --data ../shared/data --work adiff_bench_brats \
        [--channel-sets all4,flair,t2,t1c,t1] [--arms cg,paper] [--set KEY=VALUE ...]

Protocol (issue 17): three patient-level splits from a split file kept in the repository
(`--splits`, default benchmarks/splits/brats20.csv). For each channel set
(all4 = FLAIR+T1+T1c+T2, the paper's setting, BraTS 2018 patients only; flair; t2; t1c; t1; the
BraTS 2015 patients have no T1/T2 and are left out of the sets that need them):
1. prepare: data_prep/brats.py writes WORK/SET/manifest-SET.csv from the split file; `adiff inspect`
   summarises it.
2. train each *arm* (a named list of config overrides on `--config`, default configs/brats64.yaml,
   plus every `--set`) into WORK/SET/ARM/bundle.pt with `adiff train`. Arms: `cg`, today's
   classifier guidance; `paper`, Wolleb et al. 2022's training (mean-pooled classifier, DDPM on
   tumour-free slices); `cfg`, classifier-free guidance (`method=classifier_free`; its grid's `s` is
   the CFG weight w, `g=cfg;s=0,1,3` unless `--arm-grid 'cfg=...'`), run it with `--arms cg,paper,cfg`.
   More: `--arm 'NAME=KEY=VALUE;KEY=VALUE'` adds an arm or replaces a known arm's overrides.
3. choose on val: one `adiff evaluate --split val` scores the arm's candidate grid (`--grid`, the
   product of L, s, K, g, r, m lists in the `adiff evaluate` method grammar) and picks one by
   `brats_report.RULE` (val pixel AUPRC, ties by best Dice).
4. score on test once: `adiff evaluate --split test --threshold-split val` with the chosen method,
   the best unguided (s=0) candidate, today's default (the bundle's explain defaults), the paper's
   recipe on the `paper` arm (L=500, s=100, K=`--paper-steps`, slice guidance, abs residual), and
   raw intensity of every channel with and without the chosen median filter.
5. worst slices: benchmarks/worst_slices.py montages the test slices where the chosen map loses most
   to raw intensity of channel 0.
Every run goes into one MLflow store (WORK/mlruns.db, plus one `benchmark-brats-SET` run per set
with the stage times); WORK/RESULTS.md (benchmarks/brats_report.py) holds the val choice tables,
the test tables, a summary across channel sets, the goal verdicts and where we lose.

Resuming: a stage whose outputs exist and whose inputs (bundle, methods, settings) are unchanged
is not rerun; `--redo STAGE,...` forces it. A bundle trained with other settings stops the run
unless `--reuse` (keep it) or `--redo train`; an interrupted training resumes from its checkpoint.
`--median-3d`, `--erode` and `--min-component` go to every evaluate run (the same post-processing
for every method, intensity included; with `--median-3d` set the grid's in-plane `m=0`); compare
such settings in separate WORK folders.
For a quick CPU run: `--max-volumes`, `--set train.ddpm_steps=...`, a small `--grid`, `--worst 0`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import brats_report

from anomaly_diffusion.config import Config, load_config
from anomaly_diffusion.diffusion.guidance import check_guidance
from anomaly_diffusion.diffusion.sampling import ddim_grid
from anomaly_diffusion.errors import AdiffError, ConfigError, InputError
from anomaly_diffusion.evaluation.grammar import parse_method
from anomaly_diffusion.evaluation.postprocess import PostProcess

ROOT = Path(__file__).resolve().parent.parent
CHANNEL_SETS: dict[str, tuple[str, ...]] = {
    "all4": ("flair", "t1", "t1c", "t2"),
    "flair": ("flair",),
    "t2": ("t2",),
    "t1c": ("t1c",),
    "t1": ("t1",),
}
STAGES = ("prepare", "train", "choose", "test", "worst")
GRID_KEYS = ("L", "s", "K", "g", "r", "m", "enc", "n", "dec", "sm", "gt", "p", "rc")
"""The `adiff evaluate` method keys a grid may vary (see `anomaly_diffusion.evaluation.methods`)."""
_DECODE_KEYS = ("dec", "sm", "gt")
"""Grid keys that change the decoding (the rest after s only change the map)."""
DEFAULT_GRID = "L=100,200;s=0,100,300;K=25;g=slice;r=positive,abs;m=0,5"
"""CPU-sized: 2 encodings and 6 decodings per val volume; residual and filter are free."""
_RESIDUAL_SHORT = {"positive": "pos", "negative": "neg"}


@dataclass(frozen=True)
class Arm:
    """One training of the benchmark, and how it is scored.

    Attributes:
        name: its folder WORK/SET/NAME and its label in the tables.
        overrides: config overrides on top of `--config` and every `--set`.
        description: what it is, for RESULTS.md.
        chooses: whether a candidate grid is chosen on val (else only `fixed` is scored on test).
        fixed: method specs scored on test as given ('guided' = the bundle's explain defaults);
            `{paper_steps}` is replaced by `--paper-steps`.
        grid: grid keys replacing the global `--grid`'s for this arm, e.g. 'g=cfg;s=1,3'.
    """

    name: str
    overrides: tuple[str, ...] = ()
    description: str = ""
    chooses: bool = True
    fixed: tuple[str, ...] = ("guided",)
    grid: str = ""


ARMS = {
    "cg": Arm(
        "cg",
        (),
        "Classifier guidance as `--config` sets it (configs/brats64.yaml: the multiple-instance `lse` classifier, "
        "DDPM on every slice); candidates chosen on val.",
    ),
    "paper": Arm(
        "paper",
        ("classifier.pooling=mean", "data.ddpm_train_on=healthy", "explain.guidance=slice"),
        "Wolleb et al. 2022's training: the mean-pooled classifier and a DDPM on tumour-free slices; scored "
        "with the paper's decode only (L=500, s=100, slice guidance, abs residual; K=--paper-steps).",
        chooses=False,
        fixed=("paper:L=500;s=100;K={paper_steps};g=slice;r=abs",),
    ),
    "cfg": Arm(
        "cfg",
        ("method=classifier_free", "explain.guidance=cfg", "explain.scale=3"),
        "Classifier-free guidance (one label-conditional DDPM on every slice, no classifier); candidates chosen "
        "on val, where s is the CFG weight w (s=0: the unconditional reconstruction).",
        grid="g=cfg;s=0,1,3",
    ),
}
FIXED_ROLES = {
    "guided": ("default", "today's default (the bundle's explain defaults)"),
    "paper": ("paper", "the paper's recipe"),
}


@dataclass(frozen=True)
class Candidate:
    """One grid point: its row name, its `adiff evaluate` spec and its key values."""

    name: str
    spec: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return float(self.values["s"])


def spec_of(name: str, values: dict[str, str]) -> str:
    """'NAME:L=..;s=..;...' in the evaluate method grammar."""
    return f"{name}:" + ";".join(f"{k}={v}" for k, v in values.items())


def parse_grid(text: str, base: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[str, ...]]:
    """'L=100,200;s=0,300;K=25' -> {'L': ('100', '200'), ...}, replacing the keys of `base`."""
    grid = dict(base or {})
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        key, sep, values = item.partition("=")
        options = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or key.strip() not in GRID_KEYS or not options:
            raise ConfigError(f"grid {text!r}: expected KEY=V1,V2 with KEY one of {', '.join(GRID_KEYS)}, got {item!r}")
        grid[key.strip()] = options
    if "L" not in grid or "s" not in grid:
        raise ConfigError(f"grid {text!r}: needs at least L and s")
    return {k: grid[k] for k in GRID_KEYS if k in grid}


def candidates(grid: dict[str, tuple[str, ...]]) -> list[Candidate]:
    """Every point of the grid, in grid order; s=0 points differ by no guidance target, so one per target set."""
    found: dict[str, Candidate] = {}
    keys = list(grid)
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        unguided = float(values["s"]) == 0
        if unguided and "g" in values:
            values["g"] = grid["g"][0]
        parts = [f"L{values['L'].replace('+', '_')}", f"s{values['s']}"]
        parts += [f"K{values['K']}"] if "K" in values else []
        parts += [values["g"]] if "g" in values and not unguided else []
        parts += [_RESIDUAL_SHORT.get(values["r"], values["r"])] if "r" in values else []
        parts += [f"m{values['m']}"] if "m" in values else []
        if values.get("enc", "ddim") != "ddim":
            parts.append(f"{values['enc']}{values.get('n', '1')}")
        parts += [f"{k}{values[k]}" for k in ("dec", "sm", "gt", "p", "rc") if k in values]
        name = "-".join(parts)
        found.setdefault(name, Candidate(name, spec_of(name, values), values))
    return list(found.values())


def shared_work(chosen: list[Candidate]) -> tuple[int, int]:
    """(encodings, decodings) the candidates share in one evaluate run (residual and filter are free)."""
    enc = {(c.values["L"], c.values.get("K"), c.values.get("enc"), c.values.get("n")) for c in chosen}
    dec = {
        (c.values["L"], c.values.get("K"), c.values.get("enc"), c.values.get("n"), c.values["s"])
        + ((c.values.get("g"),) if c.scale else ())
        + tuple(c.values.get(k) for k in _DECODE_KEYS)
        for c in chosen
    }
    return len(enc), len(dec)


def parse_arm(text: str) -> Arm:
    """'NAME=KEY=VALUE;KEY=VALUE' -> an arm (a known NAME keeps its role and gets these overrides)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z][\w-]*", name):
        raise ConfigError(f"--arm {text!r}: expected NAME=KEY=VALUE;KEY=VALUE (NAME: letters, digits, - or _)")
    overrides = tuple(o.strip() for o in rest.split(";") if o.strip())
    if any("=" not in o for o in overrides):
        raise ConfigError(f"--arm {text!r}: every override is KEY=VALUE")
    if name in ARMS:
        return replace(ARMS[name], overrides=overrides)
    return Arm(name, overrides, f"Added with --arm ({'; '.join(overrides) or 'no overrides'}); chosen on val.")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=str))
    temporary.replace(path)


def cpu_text() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = sorted(set(re.findall(r"\b(amx_\w+|avx512_bf16)\b", info)))
    return f"{os.cpu_count()} x {model}" + (f" ({', '.join(flags)})" if flags else "")


def git_text() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    return f"{commit}{'+changes' if git('status', '--porcelain', '--untracked-files=no') else ''}" or "n/a"


class Bench:
    """One invocation: the options, the MLflow store and the commands it runs."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.uri = f"sqlite:///{self.work / 'mlruns.db'}"
        self.config: Path = args.config.resolve()
        self.adiff = [sys.executable, "-m", "anomaly_diffusion.cli"]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.redo = set(args.redo)
        self.arm_grids: dict[str, str] = {}

    def run(self, command: list[str], log: Path, capture: bool = False) -> tuple[str, float]:
        """Run one tool (output appended to `log`); its stdout when `capture`, and its seconds. Failure stops."""
        print("$", shlex.join(command), flush=True)
        started = time.perf_counter()
        with log.open("a") as handle:
            handle.write(f"\n$ {shlex.join(command)}\n")
            handle.flush()
            done = subprocess.run(
                command,
                cwd=ROOT,
                env=self.env,
                text=True,
                check=False,
                stdout=subprocess.PIPE if capture else handle,
                stderr=subprocess.STDOUT,
            )
            if capture:
                handle.write(done.stdout)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            output = log.read_text().split(f"\n$ {shlex.join(command)}\n")[-1].splitlines()
            said = [line for line in output if line.startswith("error:")] or [x for x in output if x.strip()] or [""]
            tool = " ".join(Path(part).name for part in command[1:4])
            raise InputError(
                f"{tool} failed (exit {done.returncode}, after {seconds:.0f} s): {said[-1].removeprefix('error: ')} "
                f"(full output in {log})"
            )
        print(f"  ({seconds:.0f} s)", flush=True)
        return done.stdout or "", seconds

    def postprocess_options(self) -> list[str]:
        """--median-3d, --erode, --min-component as given (the same for every evaluate run and method)."""
        a = self.args
        pairs = (("--median-3d", a.median_3d), ("--erode", a.erode), ("--min-component", a.min_component))
        return [x for flag, value in pairs if value for x in (flag, str(value))]

    def fresh(
        self, stage: str, record_path: Path, inputs: dict[str, Any], outputs: list[Path]
    ) -> dict[str, Any] | None:
        """The stage's record if its outputs exist and were made from these inputs (and no --redo)."""
        if stage in self.redo:
            return None
        record = read_json(record_path)
        if record and record.get("finished") and record.get("inputs") == inputs and all(p.exists() for p in outputs):
            return dict(record)
        return None

    def evaluate(self, manifest: Path, bundle: Path, split: str, methods: list[str], out: Path, log: Path) -> float:
        command = [
            *self.adiff,
            "evaluate",
            str(manifest),
            "--split",
            split,
            *(["--threshold-split", "val"] if split == "test" else []),
            "--checkpoint",
            str(bundle),
            "--methods",
            ",".join(methods),
            "--bootstrap",
            str(self.args.bootstrap),
            *self.postprocess_options(),
            *(["--max-volumes", str(self.args.max_volumes)] if self.args.max_volumes else []),
            "--out",
            str(out),
            "--overwrite",
            "--tracking-uri",
            self.uri,
        ]
        return self.run(command, log)[1]


@dataclass
class SetRun:
    """One channel set's folder, manifest and per-stage status."""

    name: str
    channels: tuple[str, ...]
    folder: Path
    manifest: Path
    log: Path
    status: dict[str, str] = field(default_factory=dict)
    prepare: dict[str, Any] = field(default_factory=dict)

    def overrides(self) -> list[str]:
        return [f"data.manifest={self.manifest}", f"data.image_channels={len(self.channels)}"]


def prepare(bench: Bench, s: SetRun, roots: list[Path]) -> None:
    """Manifest from the split file, and `adiff inspect`'s per-split counts."""
    splits: Path = bench.args.splits
    inputs = {
        "roots": [str(r) for r in roots],
        "channels": list(s.channels),
        "splits_sha256": sha256(splits),
        "data_prep_sha256": sha256(ROOT / "data_prep" / "brats.py"),
        "config_sha256": sha256(bench.config),
        "overrides": bench.args.overrides,
    }
    record_path = s.folder / "prepare.json"
    record = bench.fresh("prepare", record_path, inputs, [s.manifest])
    if record is not None:
        s.status["prepare"], s.prepare = "reused", record
        return
    if bench.args.only_test:
        raise InputError(f"{s.manifest}: not prepared; run without --only-test first")
    made, seconds = bench.run(
        [
            sys.executable,
            "data_prep/brats.py",
            *map(str, roots),
            "--out",
            str(s.manifest),
            "--channels",
            ",".join(s.channels),
            "--splits",
            str(splits),
            "--skip-incomplete",
        ],
        s.log,
        capture=True,
    )
    sets = [x for o in bench.args.overrides for x in ("--set", o)]
    inspected, more = bench.run(
        [*bench.adiff, "inspect", str(s.manifest), "--config", str(bench.config), *_sets(s.overrides()), *sets],
        s.log,
        capture=True,
    )
    summary = made.strip().splitlines()[-1].split(": ", 1)[-1] if made.strip() else ""
    split_lines = [line for line in inspected.splitlines() if re.match(r"^(train|val|test): ", line)]
    s.prepare = {"inputs": inputs, "seconds": seconds + more, "summary": summary, "splits": split_lines}
    s.prepare["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(record_path, s.prepare)
    s.status["prepare"] = "ran"


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def train(bench: Bench, s: SetRun, arm: Arm) -> Path:
    """The arm's bundle: trained, resumed from its checkpoint, or reused."""
    folder = s.folder / arm.name
    bundle, checkpoint = folder / "bundle.pt", folder / "checkpoint.pt"
    record_path = folder / "train.json"
    settings = [*bench.args.overrides, *arm.overrides]
    inputs = {
        "config": str(bench.config.relative_to(ROOT) if bench.config.is_relative_to(ROOT) else bench.config),
        "config_sha256": sha256(bench.config),
        "overrides": settings,
        "manifest_sha256": sha256(s.manifest),
    }
    record = read_json(record_path) or {}
    key = f"{arm.name}.train"
    if "train" in bench.redo:
        for path in (bundle, checkpoint):
            if path.exists():
                print(f"--redo train: removing {path}")
                path.unlink()
    elif bundle.exists():
        if record.get("finished") and record.get("inputs") == inputs:
            s.status[key] = "reused"
            return bundle
        if bench.args.reuse:
            s.status[key] = "reused (--reuse: trained with other settings)"
            return bundle
        raise InputError(
            f"{bundle} was trained with other settings than this run's (config, --set, arm overrides or data); "
            "pass --reuse to score it anyway or --redo train to train again"
        )
    if bench.args.only_test:
        raise InputError(f"{bundle}: not trained; run without --only-test first")
    resume = checkpoint.exists() and record.get("inputs") == inputs and not record.get("finished")
    if checkpoint.exists() and not resume:
        raise InputError(f"{checkpoint}: an interrupted training with other settings; pass --redo train")
    folder.mkdir(parents=True, exist_ok=True)
    before = float(record.get("seconds", 0.0)) if resume else 0.0
    write_json(record_path, {"inputs": inputs, "seconds": before, "finished": None})
    if resume:
        command = [*bench.adiff, "train", "--resume", str(folder), "--tracking-uri", bench.uri]
    else:
        command = [
            *bench.adiff,
            "train",
            "--config",
            str(bench.config),
            *_sets(s.overrides() + settings),
            "--out",
            str(folder),
            "--run-name",
            f"brats-{s.name}-{arm.name}",
            "--tracking-uri",
            bench.uri,
        ]
    started = time.perf_counter()
    try:
        bench.run(command, s.log)
    finally:  # an interrupted training keeps its time, for the resumed one
        seconds = before + time.perf_counter() - started
        write_json(record_path, {"inputs": inputs, "seconds": seconds, "finished": None, "resumed": resume})
    write_json(
        record_path,
        {"inputs": inputs, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": resume},
    )
    s.status[key] = "ran (resumed)" if resume else "ran"
    if bench.args.probe:
        text, _ = bench.run([sys.executable, "benchmarks/probe.py", str(s.manifest), str(bundle)], s.log, capture=True)
        (folder / "probe.txt").write_text(text)
    return bundle


def intensity_specs(channels: tuple[str, ...], median: int | None = None) -> dict[str, str]:
    """channel -> raw intensity spec, median-filtered with `median` > 1."""
    tail = f"-m{median}" if median and median > 1 else ""
    extra = f";m={median}" if tail else ""
    return {ch: f"int-{ch}{tail}:c={i}{extra}" for i, ch in enumerate(channels)}


def arm_grid(bench: Bench, arm: Arm) -> list[Candidate]:
    grid = parse_grid(bench.args.grid, parse_grid(DEFAULT_GRID))
    text = bench.arm_grids.get(arm.name, arm.grid)
    return candidates(parse_grid(text, grid) if text else grid)


def choose(bench: Bench, s: SetRun, arm: Arm, bundle: Path) -> dict[str, Any]:
    """Score the arm's grid on val in one evaluate run and pick by `brats_report.RULE`."""
    folder = s.folder / arm.name
    grid = arm_grid(bench, arm)
    references = list(intensity_specs(s.channels).values())
    methods = [c.spec for c in grid] + references
    inputs = {
        "bundle_sha256": sha256(bundle),
        "manifest_sha256": sha256(s.manifest),
        "methods": methods,
        "max_volumes": bench.args.max_volumes,
        "postprocess": bench.postprocess_options(),
        "bootstrap": bench.args.bootstrap,
    }
    out, record_path = folder / "val", folder / "choose.json"
    record = bench.fresh("choose", record_path, inputs, [out / "results.json"])
    key = f"{arm.name}.choose"
    if record is not None:
        s.status[key], seconds = "reused", record["seconds"]
    else:
        if bench.args.only_test:
            raise InputError(f"{record_path}: no val choice with these settings; run without --only-test first")
        seconds = bench.evaluate(s.manifest, bundle, "val", methods, out, s.log)
        s.status[key] = "ran"
    results = brats_report.results_by_method(out / "results.json")
    ranked = brats_report.rank_candidates(results, [c.name for c in grid])
    by_name = {c.name: c for c in grid}
    chosen = by_name[ranked[0]]
    encodings, decodings = shared_work(grid)
    record = {
        "inputs": inputs,
        "seconds": seconds,
        "finished": (record or {}).get("finished") or time.strftime("%Y-%m-%d %H:%M:%S"),
        "rule": brats_report.RULE,
        "candidates": [{"name": c.name, "spec": c.spec, "values": c.values} for c in grid],
        "references": [r.split(":", 1)[0] for r in references],
        "ranked": ranked,
        "chosen": chosen.name,
        "chosen_spec": chosen.spec.split(":", 1)[1],
        "guided": next((n for n in ranked if by_name[n].scale > 0), None),
        "unguided": next((n for n in ranked if by_name[n].scale == 0), None),
        "encodings": encodings,
        "decodings": decodings,
    }
    write_json(record_path, record)
    return record


def chosen_medians(choices: list[dict[str, Any]]) -> list[int]:
    """The median filter sizes (> 1) of the arms' chosen candidates: intensity is also scored with each."""
    sizes = set()
    for choice in choices:
        values = next(c["values"] for c in choice["candidates"] if c["name"] == choice["chosen"])
        sizes.add(int(values.get("m", "0")))
    return sorted(sizes - {0, 1})


def test_methods(
    bench: Bench, s: SetRun, arm: Arm, choice: dict[str, Any] | None, medians: list[int], holds_intensity: bool
) -> dict[str, Any]:
    """The arm's test rows: [{name, role, spec}], role -> method name, channel -> intensity names."""
    rows: list[dict[str, str]] = []
    roles: dict[str, str] = {}
    if choice is not None:
        values = {c["name"]: c["values"] for c in choice["candidates"]}
        chosen = values[choice["chosen"]]
        rows.append({"name": "chosen", "role": "chosen on val", "spec": spec_of("chosen", chosen)})
        roles["chosen"] = "chosen"
        if float(chosen["s"]) > 0:
            roles["guided"] = "chosen"
        elif choice["guided"]:
            rows.append(
                {
                    "name": "best-guided",
                    "role": "best guided (s > 0) on val",
                    "spec": spec_of("best-guided", values[choice["guided"]]),
                }
            )
            roles["guided"] = "best-guided"
        if float(chosen["s"]) == 0:
            roles["unguided"] = "chosen"
        elif choice["unguided"]:
            spec = spec_of("best-unguided", values[choice["unguided"]])
            rows.append({"name": "best-unguided", "role": "best unguided reconstruction (s = 0) on val", "spec": spec})
            roles["unguided"] = "best-unguided"
        else:
            spec = spec_of("unguided-at-chosen", {**chosen, "s": "0"})
            rows.append(
                {
                    "name": "unguided-at-chosen",
                    "role": "unguided reconstruction (s = 0) at the chosen settings",
                    "spec": spec,
                }
            )
            roles["unguided"] = "unguided-at-chosen"
        for spec in bench.args.extra_test:
            rows.append({"name": spec.split(":", 1)[0], "role": "extra (--extra-test)", "spec": spec})
    for spec in arm.fixed:
        spec = spec.format(paper_steps=bench.args.paper_steps)
        name = spec.split(":", 1)[0]
        role, text = FIXED_ROLES.get(name, (name, name))
        rows.append({"name": name, "role": text, "spec": spec})
        roles.setdefault(role, name)
    intensity: dict[str, list[str]] = {}
    if holds_intensity:
        for median in [0, *medians]:
            for ch, spec in intensity_specs(s.channels, median).items():
                label = f"raw {ch.upper()} intensity" + (f" + median {median} (the map's filter)" if median else "")
                rows.append({"name": spec.split(":", 1)[0], "role": label, "spec": spec})
                intensity.setdefault(ch, []).append(spec.split(":", 1)[0])
    return {"methods": rows, "roles": roles, "intensity": intensity}


def score_test(bench: Bench, s: SetRun, arm: Arm, bundle: Path, plan: dict[str, Any]) -> None:
    """The arm's test rows, scored once (thresholds from val)."""
    folder = s.folder / arm.name
    specs = [m["spec"] for m in plan["methods"]]
    inputs = {
        "bundle_sha256": sha256(bundle),
        "manifest_sha256": sha256(s.manifest),
        "methods": specs,
        "max_volumes": bench.args.max_volumes,
        "postprocess": bench.postprocess_options(),
        "bootstrap": bench.args.bootstrap,
        "threshold_split": "val",
    }
    out, record_path = folder / "test", folder / "test.json"
    record = bench.fresh("test", record_path, inputs, [out / "results.json"])
    key = f"{arm.name}.test"
    if record is not None:
        s.status[key] = "reused"
        return
    seconds = bench.evaluate(s.manifest, bundle, "test", specs, out, s.log)
    write_json(
        record_path, {**plan, "inputs": inputs, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    s.status[key] = "ran"


def worst_slices(bench: Bench, s: SetRun, arm: Arm, bundle: Path, choice: dict[str, Any]) -> None:
    """The montage of the test slices where the chosen map loses most to raw intensity of channel 0."""
    folder = s.folder / arm.name
    values = next(c["values"] for c in choice["candidates"] if c["name"] == choice["chosen"])
    median = int(values.get("m", "0"))
    against = intensity_specs(s.channels, median)[s.channels[0]]
    method = spec_of("chosen", values)
    inputs = {
        "bundle_sha256": sha256(bundle),
        "manifest_sha256": sha256(s.manifest),
        "method": method,
        "against": against,
        "k": bench.args.worst,
        "max_volumes": bench.args.max_volumes,
        "postprocess": bench.postprocess_options(),
    }
    out, record_path = folder / "worst", folder / "worst.json"
    key = f"{arm.name}.worst"
    if bench.fresh("worst", record_path, inputs, [out / "worst.json", out / "worst.png"]) is not None:
        s.status[key] = "reused"
        return
    command = [
        sys.executable,
        "benchmarks/worst_slices.py",
        str(s.manifest),
        str(bundle),
        "--method",
        method,
        "--against",
        against,
        "--split",
        "test",
        "--k",
        str(bench.args.worst),
        "--out",
        str(out),
        *(["--max-volumes", str(bench.args.max_volumes)] if bench.args.max_volumes else []),
        *bench.postprocess_options(),
    ]
    _, seconds = bench.run(command, s.log)
    write_json(record_path, {"inputs": inputs, "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    s.status[key] = "ran"


def arm_config(bench: Bench, s: SetRun, arm: Arm) -> Config:
    return load_config(bench.config, [*s.overrides(), *bench.args.overrides, *arm.overrides])


def check_arm(bench: Bench, s: SetRun, arm: Arm) -> None:
    """Fail before any work on an arm whose config or methods are invalid."""
    cfg = arm_config(bench, s, arm)
    specs = [c.spec for c in arm_grid(bench, arm)] if arm.chooses else []
    specs += [f.format(paper_steps=bench.args.paper_steps) for f in arm.fixed] + list(bench.args.extra_test)
    for spec in specs:
        try:
            method = parse_method(spec.replace(";", ","), cfg)
            if method.kind == "diffusion":  # what `bind_methods` checks once a bundle is loaded
                for level in method.levels:
                    ddim_grid(level, method.steps, cfg.schedule.num_timesteps)
                check_guidance(method.guidance or cfg.explain.guidance, cfg.classifier.pooling, cfg.method)
        except ConfigError as exc:
            raise ConfigError(f"arm {arm.name}: {exc}") from exc


def log_benchmark_run(bench: Bench, s: SetRun, arms: list[Arm], section: str) -> None:
    """One MLflow run per channel set and invocation: settings, stage times, every test metric, the section."""
    from anomaly_diffusion.tracking import tracked_run

    params: dict[str, Any] = {
        "channel_set": s.name,
        "channels": ",".join(s.channels),
        "arms": ";".join(f"{a.name}={'|'.join(a.overrides)}" for a in arms),
        "grid": bench.args.grid,
        "rule": brats_report.RULE,
        "paper_steps": bench.args.paper_steps,
        "max_volumes": bench.args.max_volumes or "",
        "bootstrap": bench.args.bootstrap,
        "splits_sha256": sha256(bench.args.splits),
        "config": bench.config.name,
        "overrides": ";".join(bench.args.overrides),
        "postprocess": " ".join(bench.postprocess_options()),
    }
    metrics: dict[str, float] = {"prepare_seconds": float(s.prepare.get("seconds", float("nan")))}
    for arm in arms:
        base = s.folder / arm.name
        for stage in ("train", "choose", "test", "worst"):
            record = read_json(base / f"{stage}.json") or {}
            if "seconds" in record:
                metrics[f"{arm.name}.{stage}_seconds"] = float(record["seconds"])
        choice = read_json(base / "choose.json")
        if choice:
            params[f"{arm.name}.chosen"] = choice["chosen_spec"]
        for name, row in brats_report.results_by_method(base / "test" / "results.json").items():
            for metric in brats_report.EVERY_METRIC:
                metrics[f"{arm.name}.{name}.{metric}"] = brats_report.number(row.get(metric))
    experiment = load_config(bench.config).tracking.experiment
    with tracked_run(bench.uri, experiment, f"benchmark-brats-{s.name}", "benchmark") as run:
        run.log_params(params)
        run.log_metrics({k: v for k, v in metrics.items() if v == v})
        run.log_text(section, f"RESULTS-{s.name}.md")
        run.set_tags({"mlflow.note.content": section[:5000]})


def set_run(bench: Bench, name: str) -> SetRun:
    folder = bench.work / name
    return SetRun(name, CHANNEL_SETS[name], folder, folder / f"manifest-{name}.csv", folder / "log.txt")


def run_set(bench: Bench, s: SetRun, arms: list[Arm], roots: list[Path]) -> None:
    """Every stage of one channel set, its plan.json and its MLflow benchmark run."""
    name, folder = s.name, s.folder
    folder.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: channels {', '.join(s.channels)}; arms {', '.join(a.name for a in arms)}", flush=True)
    prepare(bench, s, roots)
    bundles = {arm.name: train(bench, s, arm) for arm in arms}
    choices = {arm.name: choose(bench, s, arm, bundles[arm.name]) for arm in arms if arm.chooses}
    if not bench.args.only_choose:
        medians = chosen_medians(list(choices.values()))
        for i, arm in enumerate(arms):
            plan = test_methods(bench, s, arm, choices.get(arm.name), medians, holds_intensity=i == 0)
            score_test(bench, s, arm, bundles[arm.name], plan)
        if bench.args.worst > 0:
            for arm in arms:
                if arm.name in choices:
                    worst_slices(bench, s, arm, bundles[arm.name], choices[arm.name])
    plan = {
        "name": name,
        "channels": list(s.channels),
        "manifest": str(s.manifest.relative_to(bench.work)),
        "intensity_arm": arms[0].name,
        "overrides": bench.args.overrides,
        "arms": [
            {
                "name": a.name,
                "overrides": list(a.overrides),
                "description": a.description,
                "chooses": a.chooses,
                "folder": f"{name}/{a.name}",
            }
            for a in arms
        ],
        "status": s.status,
        "prepare": {k: v for k, v in s.prepare.items() if k != "inputs"},
    }
    write_json(folder / "plan.json", plan)
    arms_data = [brats_report.load_arm(folder, a) for a in plan["arms"]]
    section = "\n".join(brats_report.set_section(plan, arms_data))
    log_benchmark_run(bench, s, arms, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data", help="Folder of brats2015/ and brats2018/."
    )
    parser.add_argument("--work", type=Path, default=Path("adiff_bench_brats"))
    parser.add_argument(
        "--channel-sets", default=",".join(CHANNEL_SETS), help=f"Comma-separated: {', '.join(CHANNEL_SETS)}."
    )
    parser.add_argument(
        "--arms", default="cg,paper", help=f"Comma-separated arms to train and score ({', '.join(ARMS)}, or --arm)."
    )
    parser.add_argument(
        "--arm",
        dest="arm_specs",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE;...",
        help="Add an arm (or set a known arm's overrides); it is run.",
    )
    parser.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help="Val candidate grid, KEY=V1,V2;... over L, s, K, g, r, m, enc, n (keys not given keep the default's).",
    )
    parser.add_argument(
        "--arm-grid",
        dest="arm_grid_specs",
        action="append",
        default=[],
        metavar="NAME=GRID",
        help="Grid keys replacing --grid's for one arm.",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for every training.",
    )
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "brats64.yaml")
    parser.add_argument("--splits", type=Path, default=ROOT / "benchmarks" / "splits" / "brats20.csv")
    parser.add_argument(
        "--paper-steps", default="25", help="K of the paper's recipe (the paper: 'full', every one of L=500 steps)."
    )
    parser.add_argument(
        "--extra-test",
        action="append",
        default=[],
        metavar="SPEC",
        help="More methods scored on test for every choosing arm.",
    )
    parser.add_argument(
        "--max-volumes", type=int, default=None, help="Score only the first N volumes of each split (quick runs)."
    )
    parser.add_argument("--bootstrap", type=int, default=1000)
    for flag, text in (
        ("--median-3d", "3D median filter of every map"),
        ("--erode", "brain-mask erosion in voxels"),
        ("--min-component", "binary maps drop 3D components below N voxels"),
    ):
        parser.add_argument(flag, type=int, default=0, help=f"adiff evaluate's {flag} for every run: {text}.")
    parser.add_argument("--worst", type=int, default=6, help="Slices in the worst-slices montage (0: skip that stage).")
    parser.add_argument("--probe", action="store_true", help="Run benchmarks/probe.py on each trained bundle.")
    parser.add_argument(
        "--reuse", action="store_true", help="Score an existing bundle even if it was trained with other settings."
    )
    parser.add_argument(
        "--redo",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=[],
        help=f"Rerun these stages even if done: {', '.join(STAGES)}, or all.",
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-choose", action="store_true", help="Stop after the val choice (no test scoring).")
    only.add_argument(
        "--only-test",
        action="store_true",
        help="Only score on test (and the worst slices): nothing is trained or chosen.",
    )
    args = parser.parse_args()
    try:
        if "all" in args.redo:
            args.redo = list(STAGES)
        if unknown := sorted(set(args.redo) - set(STAGES)):
            raise ConfigError(f"--redo: unknown stages {unknown}; use {', '.join(STAGES)} or all")
        PostProcess(args.median_3d, args.erode, args.min_component)  # checked before any work
        if args.max_volumes is not None and args.max_volumes < 1:
            raise ConfigError("--max-volumes must be >= 1")
        sets = [x.strip() for x in args.channel_sets.split(",") if x.strip()]
        if unknown := [x for x in sets if x not in CHANNEL_SETS]:
            raise ConfigError(f"--channel-sets: unknown {unknown}; use {', '.join(CHANNEL_SETS)}")
        known = dict(ARMS)
        for text in args.arm_specs:
            arm = parse_arm(text)
            known[arm.name] = arm
        names = [x.strip() for x in args.arms.split(",") if x.strip()]
        names += [parse_arm(t).name for t in args.arm_specs if parse_arm(t).name not in names]
        if unknown := [x for x in names if x not in known]:
            raise ConfigError(f"--arms: unknown {unknown}; known: {', '.join(known)} (add one with --arm)")
        if not names:
            raise ConfigError("--arms: no arm to run")
        arms = [known[n] for n in names]
        roots = [r for r in (args.data / "brats2015", args.data / "brats2018") if r.is_dir()] or (
            [args.data] if args.data.is_dir() else []
        )
        if not roots:
            raise InputError(
                f"{args.data}: BraTS folder not found (pass --data, the folder of brats2015/ and brats2018/)"
            )
        if not args.splits.is_file():
            raise InputError(f"{args.splits}: split file not found")
        if not args.config.is_file():
            raise InputError(f"{args.config}: config not found")
        bench = Bench(args)
        for text in args.arm_grid_specs:
            arm_name, sep, grid = text.partition("=")
            if not sep or arm_name.strip() not in names:
                raise ConfigError(
                    f"--arm-grid {text!r}: expected NAME=GRID for an arm of this run ({', '.join(names)})"
                )
            bench.arm_grids[arm_name.strip()] = grid
        bench.work.mkdir(parents=True, exist_ok=True)
        meta_path = bench.work / "benchmark.json"
        earlier = (read_json(meta_path) or {}).get("channel_sets", [])
        meta = {
            "channel_sets": [n for n in CHANNEL_SETS if n in set(earlier) | set(sets)],
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "commit": git_text(),
            "cpu": cpu_text(),
            "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            "splits": str(args.splits.relative_to(ROOT) if args.splits.resolve().is_relative_to(ROOT) else args.splits),
            "splits_sha256": sha256(args.splits),
            "config": str(
                args.config.resolve().relative_to(ROOT) if args.config.resolve().is_relative_to(ROOT) else args.config
            ),
            "overrides": args.overrides,
            "max_volumes": args.max_volumes,
            "postprocess": PostProcess(args.median_3d, args.erode, args.min_component).describe(),
        }
        runs = [set_run(bench, name) for name in sets]
        for s in runs:  # every arm's config and methods are checked before any work
            for arm in arms:
                check_arm(bench, s, arm)
        for s in runs:
            run_set(bench, s, arms, roots)
            write_json(meta_path, {**meta, "finished": time.strftime("%Y-%m-%d %H:%M")})
            (bench.work / "RESULTS.md").write_text(brats_report.render(bench.work))
    except AdiffError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished stages are kept; run the same command again to resume")
    print(f"results: {bench.work / 'RESULTS.md'}   MLflow store: {bench.uri}")


if __name__ == "__main__":
    main()

"""The `adiff` command line: thin typer commands over `anomaly_diffusion.app`.

User errors (`AdiffError`) become one line on stderr and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from anomaly_diffusion import __version__
from anomaly_diffusion.errors import AdiffError

app = typer.Typer(
    name="adiff",
    help="Find and explain anomalies in medical scans with classifier-guided diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (default: sqlite:///mlruns.db in the current folder).",
    ),
]


def _model_option() -> Any:
    return typer.Option(
        "--checkpoint",
        "--model",
        help="Bundle file, models:/NAME/VERSION or models:/NAME@ALIAS (default: newest in ./adiff_runs).",
    )


ModelRef = Annotated[str | None, _model_option()]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Slices per batch.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
Compile = Annotated[
    bool, typer.Option("--compile", help="torch.compile the networks (minutes up front; for many volumes).")
]
Fp32 = Annotated[
    bool,
    typer.Option(
        "--fp32",
        help="Compute in float32 throughout (default: bf16 mixed precision where the hardware has it, "
        "CUDA or a CPU with AMX; 2-3x faster, maps differ by ~1e-3).",
    ),
]


def _check_device(device: str) -> None:
    from anomaly_diffusion.errors import ConfigError

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")


def _uri(option: str | None, configured: str | None = None) -> str:
    from anomaly_diffusion.tracking import DEFAULT_TRACKING_URI

    return option or configured or DEFAULT_TRACKING_URI


def _distributed_context() -> Any:
    """The torchrun rank of this process (RANK/WORLD_SIZE/LOCAL_RANK), joined to its process group."""
    from anomaly_diffusion.distributed import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return init_distributed(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _quiet_library_logs() -> None:
    # nibabel logs header "fixes" of odd files and alembic logs migrations: not for users' eyes
    for name in ("nibabel", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _one_line_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_library_logs()
        try:
            return command(*args, **kwargs)
        except AdiffError as exc:
            message = " ".join(str(exc).split())
            console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def _progress() -> Iterator[Progress]:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not console.is_terminal) as progress:
        yield progress


def _phase_progress(progress: Progress) -> Callable[[str, int, int, dict[str, float]], None]:
    tasks: dict[str, Any] = {}
    last_print: dict[str, float] = {}

    def update(phase: str, step: int, total: int, metrics: dict[str, float]) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total, info="")
        info = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        if info:
            progress.update(tasks[phase], completed=step, info=info)
        else:
            progress.update(tasks[phase], completed=step)
        now = time.monotonic()
        if not console.is_terminal and info and (now - last_print.get(phase, 0.0) > 15 or step == total):
            last_print[phase] = now
            console.print(f"{phase} {step}/{total} {info}", highlight=False)

    return update


@app.command()
@_one_line_errors
def train(
    config: Annotated[
        str | None, typer.Option("--config", "-c", help="YAML config file, or a packaged one: default, demo, tiny.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Dotted override, e.g. --set train.ddpm_steps=500.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for bundle.pt (default: train.output_dir/RUN).")
    ] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="MLflow run name.")] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue the interrupted run in this output folder.")
    ] = None,
    local_tracking: Annotated[
        bool, typer.Option("--local-tracking", help="If the tracking server is unreachable, log to local SQLite.")
    ] = False,
    register: Annotated[
        str | None, typer.Option("--register", help="Register the bundle in the MLflow Model Registry under NAME.")
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Train the DDPM and the noise-aware classifier on a manifest; save a model bundle."""
    from anomaly_diffusion.app import resolve_config_path, run_train
    from anomaly_diffusion.config import load_config
    from anomaly_diffusion.distributed import shutdown
    from anomaly_diffusion.errors import TrackingError
    from anomaly_diffusion.tracking import DEFAULT_TRACKING_URI, make_client

    given = config is not None or bool(overrides)
    cfg = load_config(resolve_config_path(config), overrides or []) if given or resume is None else None
    uri = _uri(tracking_uri, cfg.tracking.uri if cfg else None)
    if local_tracking:
        try:
            make_client(uri)
        except TrackingError as exc:
            console.print(f"warning: {exc}; logging to {DEFAULT_TRACKING_URI} instead", highlight=False)
            uri = DEFAULT_TRACKING_URI

    def on_data(summary: dict[str, dict[str, int]]) -> None:
        for split, counts in summary.items():
            console.print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), highlight=False)

    context = _distributed_context()
    try:
        with _progress() as progress:
            phase_progress = _phase_progress(progress) if context.is_main else None
            outcome = run_train(cfg, uri, out_dir, run_name, phase_progress, on_data, resume, register, context)
    finally:
        shutdown(context)
    if not context.is_main:
        return
    result = outcome.result
    out.print(f"bundle: {result.bundle_path}", highlight=False)
    out.print(f"mlflow run: {outcome.run_id} ({uri})", highlight=False)
    accuracy = "  ".join(f"{k}={v:.3f}" for k, v in result.classifier_accuracy.items())
    out.print(
        f"ddpm_loss={result.ddpm_loss:.4f}  classifier_loss={result.classifier_loss:.4f}  {accuracy}", highlight=False
    )
    if outcome.registered:
        out.print(f"registered: models:/{outcome.registered}", highlight=False)
    out.print(f"time: {outcome.seconds:.0f} s", highlight=False)


@app.command()
@_one_line_errors
def explain(
    scans: Annotated[
        list[Path], typer.Argument(help="NIfTI file(s) or DICOM series folder(s), one per model channel.")
    ],
    noise_level: Annotated[
        int | None, typer.Option("--noise-level", "-L", help="Encoding depth L, 1 <= L < T.")
    ] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="Guidance scale s (0 = unguided).")] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="DDIM steps K for encode and for decode (stride L/K).")
    ] = None,
    checkpoint: ModelRef = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("adiff_explain"),
    mask: Annotated[Path | None, typer.Option("--mask", help="Ground-truth lesion mask: adds Dice/AUPRC.")] = None,
    brainmask: Annotated[
        Path | None, typer.Option("--brainmask", help="Brain mask (else foreground threshold).")
    ] = None,
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="Anomaly volume threshold (default: Otsu on this scan).")
    ] = None,
    compile_networks: Compile = False,
    fp32: Fp32 = False,
    residual: Annotated[
        str | None,
        typer.Option(
            "--residual",
            help="Map: abs (|x - x_healthy|), positive (only where the scan is brighter than healthy: "
            "FLAIR/T2 lesions) or negative. Default: the model's explain.residual.",
        ),
    ] = None,
    guidance: Annotated[
        str | None,
        typer.Option(
            "--guidance",
            help="slice (log p(healthy | x_t), the paper) or regions (every region of an lse classifier "
            "towards healthy). Default: the model's explain.guidance.",
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Explain a scan: healthy counterfactual + anomaly map, written in the input's space."""
    from anomaly_diffusion.app import find_latest_bundle, run_explain

    _check_device(device)
    bundle_path = checkpoint or find_latest_bundle(Path("adiff_runs"))
    with _progress() as progress:
        task = progress.add_task("explain slices", total=None, info="")

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        outcome = run_explain(
            scans,
            bundle_path,
            out_dir,
            _uri(tracking_uri),
            noise_level,
            scale,
            steps,
            batch_size,
            mask,
            brainmask,
            overwrite,
            device,
            update,
            threshold,
            compile_networks,
            fp32,
            residual,  # type: ignore[arg-type]  # checked by run_explain
            guidance,  # type: ignore[arg-type]  # checked by run_explain
        )
    _print_explain(outcome)


def _print_explain(outcome: Any) -> None:
    m = outcome.metrics
    for name, path in outcome.outputs.items():
        out.print(f"{name}: {path}", highlight=False)
    out.print(
        f"p(healthy) before={m['p_healthy_before_mean']:.3f} after={m['p_healthy_after_mean']:.3f} "
        f"(mean over {int(m['slices_explained'])} slices); max anomaly score {m['anomaly_max']:.3f}; "
        f"{m['anomaly_volume_ml']:.2f} mL above {m['anomaly_threshold']:.3f}",
        highlight=False,
    )
    if outcome.pixel is not None:
        p, b = outcome.pixel, outcome.baseline
        out.print(
            f"vs mask: AUPRC={p.auprc:.3f} AUROC={p.auroc:.3f} "
            f"Dice(otsu)={p.dice_otsu:.3f} Dice(best)={p.dice_best:.3f}"
            f" | raw-intensity baseline: AUPRC={b.auprc:.3f} AUROC={b.auroc:.3f} Dice(best)={b.dice_best:.3f}",
            highlight=False,
        )
    out.print(f"mlflow run: {outcome.run_id}   time: {outcome.seconds:.0f} s", highlight=False)


@app.command()
@_one_line_errors
def evaluate(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest CSV; the split's rows need lesion masks.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: train, val or test.")] = "val",
    checkpoint: ModelRef = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help="Comma-separated: guided, unguided (s=0), paper (L=500, s=100, K=L), intensity[:C], "
            "NAME:L=..;s=..;K=.. (a named diffusion setting; more keys: L=100+200 averages the maps of "
            "several levels, enc=noise;n=4 encodes by forward noising with 4 draws, m=5 median-filters "
            "this method's map).",
        ),
    ] = "guided,unguided,intensity",
    threshold_split: Annotated[
        str | None,
        typer.Option("--threshold-split", help="Split that chooses thresholds (default: leave one volume out)."),
    ] = None,
    median_filter: Annotated[
        int, typer.Option("--median-filter", help="In-plane median filter size for every map (0 = none).")
    ] = 0,
    fpr: Annotated[
        str, typer.Option("--fpr", help="Target false-positive rates on lesion-free slices, comma-separated.")
    ] = "0.01,0.05",
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples over volumes (0 = none).")] = 1000,
    max_volumes: Annotated[
        int | None, typer.Option("--max-volumes", min=1, help="Only the first N volumes of each split.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("adiff_evaluate"),
    batch_size: BatchSize = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    compile_networks: Compile = False,
    fp32: Fp32 = False,
    explain_set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="explain.KEY=VALUE replacing the model's explain defaults (what 'guided' means), "
            "e.g. --set explain.scale=30.",
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Score our method and baselines against lesion masks on a split: tables, curves, montage, MLflow run."""
    from anomaly_diffusion.app import find_latest_bundle, run_evaluate
    from anomaly_diffusion.distributed import shutdown
    from anomaly_diffusion.errors import ConfigError

    _check_device(device)
    if split not in ("train", "val", "test") or threshold_split not in (None, "train", "val", "test"):
        raise ConfigError("--split and --threshold-split must be train, val or test")
    try:
        fprs = [float(f) for f in fpr.split(",") if f.strip()]
    except ValueError as exc:
        raise ConfigError(f"--fpr must be comma-separated numbers, got {fpr!r}") from exc
    # ';' separates a named method's keys on the command line, where ',' separates methods
    specs = [m.strip().replace(";", ",") for m in methods.split(",") if m.strip()]
    specs = _join_method_specs(specs)
    bundle_path = checkpoint or find_latest_bundle(Path("adiff_runs"))
    with _progress() as progress:
        task = progress.add_task("evaluate volumes", total=None, info="")

        def update(done: int, total: int, subject: str, method: str) -> None:
            progress.update(task, completed=done, total=total, info=f"{subject} {method}")

        context = _distributed_context()
        try:
            outcome = run_evaluate(
                manifest,
                bundle_path,
                out_dir,
                _uri(tracking_uri),
                split,
                specs,
                threshold_split,
                median_filter,
                fprs,
                bootstrap,
                batch_size,
                device,
                overwrite,
                max_volumes,
                update if context.is_main else None,
                context,
                compile_networks,
                fp32,
                explain_set or [],
            )
        finally:
            shutdown(context)
    if outcome is None:
        return
    out.print(Path(outcome.outputs["table"]).read_text(), highlight=False, markup=False)
    for name, path in outcome.outputs.items():
        out.print(f"{name}: {path}", highlight=False)
    out.print(f"mlflow run: {outcome.run_id}   time: {outcome.seconds:.0f} s", highlight=False)


def _join_method_specs(specs: list[str]) -> list[str]:
    """Re-join 'NAME:L=1,s=2' specs that the ',' split cut into 'NAME:L=1' and 's=2'."""
    joined: list[str] = []
    for spec in specs:
        if joined and "=" in spec and ":" not in spec and ":" in joined[-1]:
            joined[-1] += "," + spec
        else:
            joined.append(spec)
    return joined


@app.command()
@_one_line_errors
def demo(
    work_dir: Annotated[Path, typer.Option("--work-dir", help="Where the demo dataset and runs go.")] = Path(
        "adiff_demo"
    ),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Dotted override of the demo config.")
    ] = None,
    n_subjects: Annotated[int, typer.Option("--subjects", min=4, help="Synthetic subjects to build.")] = 24,
    tracking_uri: TrackingUri = None,
) -> None:
    """End to end, offline: build a dataset from the MNI152 template with synthetic lesions, train, explain."""
    from anomaly_diffusion.app import demo_config, run_explain, run_train, timestamped
    from anomaly_diffusion.data.manifest import read_manifest
    from anomaly_diffusion.data.synthetic import build_demo_dataset

    started = time.perf_counter()
    console.print(f"building demo dataset from the MNI152 template in {work_dir / 'data'} ...", highlight=False)
    manifest = build_demo_dataset(work_dir / "data", n_subjects=n_subjects)
    cfg = demo_config(manifest, work_dir / "runs", overrides or [])
    uri = _uri(tracking_uri, cfg.tracking.uri)

    def on_data(summary: dict[str, dict[str, int]]) -> None:
        for split, counts in summary.items():
            console.print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), highlight=False)

    with _progress() as progress:
        trained = run_train(cfg, uri, None, timestamped("demo-train"), _phase_progress(progress), on_data)
    console.print(f"trained in {trained.seconds:.0f} s: {trained.result.bundle_path}", highlight=False)
    test = [r for r in read_manifest(manifest, splits=["test"]) if r.mask is not None]
    lesioned = [r for r in test if _has_lesion(r.mask)]
    row = (lesioned or test)[0]
    console.print(f"explaining held-out subject {row.subject} ...", highlight=False)
    with _progress() as progress:
        task = progress.add_task("explain slices", total=None, info="")
        outcome = run_explain(
            list(row.images),
            trained.result.bundle_path,
            work_dir / "explain",
            uri,
            mask=row.mask,
            brainmask=row.brainmask,
            overwrite=True,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    _print_explain(outcome)
    out.print(f"training run: {trained.run_id}   store: {uri}   (adiff ui to browse)", highlight=False)
    out.print(f"demo wall time: {time.perf_counter() - started:.0f} s", highlight=False)


def _has_lesion(path: Path | None) -> bool:
    from anomaly_diffusion.data.io import read_volume

    return path is not None and bool((read_volume(path)[0] > 0).any())


@app.command()
@_one_line_errors
def register(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a training run.")],
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option("--alias", help="Also point this alias at the new version.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Register a training run's bundle in the MLflow Model Registry."""
    from anomaly_diffusion.tracking import register_model

    version = register_model(_uri(tracking_uri), run_id, name, alias)
    out.print(f"registered models:/{name}/{version}" + (f" (alias @{alias})" if alias else ""), highlight=False)


@app.command()
@_one_line_errors
def inspect(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest CSV.")],
    config: Annotated[str | None, typer.Option("--config", "-c", help="Config whose data section applies.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Dotted override.")] = None,
) -> None:
    """Summarise a dataset (subjects, slices per label, shapes, spacings, intensities); fail on bad data."""
    from anomaly_diffusion.app import inspect_dataset, resolve_config_path
    from anomaly_diffusion.config import load_config

    cfg = load_config(resolve_config_path(config), overrides or [])
    report = inspect_dataset(manifest, cfg)
    for split, counts in report.splits.items():
        out.print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), highlight=False)
    for v in report.volumes:
        ranges = " ".join(f"[{lo:.3g}, {hi:.3g}]" for lo, hi in zip(v.intensity_min, v.intensity_max, strict=True))
        out.print(
            f"  {v.subject} ({v.split}): shape {v.shape}, spacing {v.spacing} mm, intensity {ranges}, "
            f"{v.slices} slices used, {v.slices_pathological} pathological, {v.lesion_voxels} lesion voxels",
            highlight=False,
        )


@app.command()
@_one_line_errors
def ui(
    port: Annotated[int, typer.Option("--port", help="First port to try.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow UI for the tracking store on 127.0.0.1 (Ctrl-C stops it)."""
    from anomaly_diffusion.tracking import free_port, start_ui

    uri = _uri(tracking_uri)
    chosen = free_port(port)
    process = start_ui(uri, "127.0.0.1", chosen)
    out.print(f"MLflow UI for {uri}: http://127.0.0.1:{chosen}  (Ctrl-C to stop)", highlight=False)
    try:
        process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except Exception:
            process.kill()
        out.print("stopped", highlight=False)


@app.command()
def version() -> None:
    """Print the package version."""
    out.print(__version__)


def run_tool(function: Callable[..., None]) -> None:
    """Run a data_prep script's typer function with the CLI's one-line error handling."""
    tool = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    tool.command()(_one_line_errors(function))
    tool()


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    app(prog_name="adiff")


if __name__ == "__main__":
    main()

"""The `adiff` command line: thin typer commands over `anomaly_diffusion.usecases`.

Each command turns its options into a request (or keyword arguments) for one use case and prints
the outcome. User errors (`AdiffError`) and option values that the parser refuses become one line
on stderr and exit code 1; Ctrl-C exits 130 (`terminal.py`: errors, shared options, progress bars
with time remaining).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from anomaly_diffusion import __version__
from anomaly_diffusion.diffusion.decoding import DECODINGS
from anomaly_diffusion.diffusion.encoding import ENCODINGS
from anomaly_diffusion.errors import ConfigError
from anomaly_diffusion.evaluation.grammar import grammar_help
from anomaly_diffusion.runtime import set_threads
from anomaly_diffusion.terminal import (
    FLAG,
    BatchSize,
    Command,
    Compile,
    Device,
    Fp32,
    GuidanceOption,
    ModelRef,
    NoiseLevel,
    OneLineErrors,
    Overwrite,
    ResidualOption,
    Scale,
    Steps,
    Threads,
    TrackingUri,
    announce,
    choice,
    console,
    one_line_errors,
    out,
    phase_progress,
    print_cohort,
    print_data,
    print_demo,
    print_explain,
    print_trained,
    progress_bars,
    slice_progress,
    study_progress,
    tracking_store,
)

app = typer.Typer(
    name="adiff",
    cls=OneLineErrors,
    help="Find and explain anomalies in medical scans with classifier-guided diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _distributed_context() -> Any:
    """The torchrun rank of this process (RANK/WORLD_SIZE/LOCAL_RANK), joined to its process group."""
    from anomaly_diffusion.distributed import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return init_distributed(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


@app.command(cls=Command)
@one_line_errors
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
        Path | None,
        typer.Option(
            "--resume",
            help="Continue the interrupted run in this output folder; a finished one trains on to larger "
            "--set train.ddpm_steps / train.classifier_steps.",
        ),
    ] = None,
    local_tracking: Annotated[
        bool,
        typer.Option("--local-tracking", help="If the tracking server is unreachable, log to local SQLite.", **FLAG),
    ] = False,
    register: Annotated[
        str | None, typer.Option("--register", help="Register the bundle in the MLflow Model Registry under NAME.")
    ] = None,
    threads: Threads = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Train the DDPM and the noise-aware classifier on a manifest; save a model bundle."""
    set_threads(threads)
    from anomaly_diffusion.config import load_config
    from anomaly_diffusion.distributed import shutdown
    from anomaly_diffusion.errors import TrackingError
    from anomaly_diffusion.tracking import DEFAULT_TRACKING_URI, make_client
    from anomaly_diffusion.usecases.common import resolve_config_path
    from anomaly_diffusion.usecases.train import run_train

    # with --resume and no --config, --set applies to the saved config (e.g. train.ddpm_steps to train longer)
    given = config is not None or (bool(overrides) and resume is None)
    cfg = load_config(resolve_config_path(config), overrides or []) if given or resume is None else None
    uri = tracking_store(tracking_uri, cfg.tracking.uri if cfg else None)
    if local_tracking:
        try:
            make_client(uri)
        except TrackingError as exc:
            console.print(f"warning: {exc}; logging to {DEFAULT_TRACKING_URI} instead", highlight=False)
            uri = DEFAULT_TRACKING_URI
    context = _distributed_context()
    try:
        with progress_bars() as progress:
            on_phase = phase_progress(progress) if context.is_main else None
            outcome = run_train(
                cfg,
                uri,
                out_dir=out_dir,
                run_name=run_name,
                progress=on_phase,
                on_data=print_data,
                resume=resume,
                resume_overrides=overrides if config is None else None,
                register=register,
                context=context,
                announce=announce,
            )
    finally:
        shutdown(context)
    if not context.is_main:
        return
    print_trained(outcome, uri)


@app.command(cls=Command)
@one_line_errors
def explain(
    scans: Annotated[
        list[Path],
        typer.Argument(
            help="NIfTI file(s) or DICOM series folder(s), one per model channel; or a cohort: a manifest CSV, "
            "or a folder of studies with --channel."
        ),
    ],
    channels: Annotated[
        list[str] | None,
        typer.Option(
            "--channel",
            help="Cohort in a folder: a channel file pattern with {id} for the study id (e.g. '{id}_t1.nii.gz', "
            "'{id}/dicom'), once per model channel; --mask/--brainmask then take {id} patterns too.",
        ),
    ] = None,
    noise_level: NoiseLevel = None,
    scale: Scale = None,
    steps: Steps = None,
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
    residual: ResidualOption = None,
    guidance: GuidanceOption = None,
    encoding: Annotated[
        str | None,
        typer.Option("--encoding", **choice(ENCODINGS.names()), help=f"How x becomes x_L: {ENCODINGS.help()}."),
    ] = None,
    decoding: Annotated[
        str | None,
        typer.Option(
            "--decoding",
            **choice(DECODINGS.names()),
            help=f"How x_L is decoded: {DECODINGS.help()}. Default: the model's explain.decoding.",
        ),
    ] = None,
    ensemble: Annotated[
        str | None,
        typer.Option(
            "--ensemble",
            help="Noise levels whose maps are averaged, e.g. 100+200 (replaces -L); with more than one map "
            "their per-voxel standard deviation is written as <stem>_uncertainty.nii.gz.",
        ),
    ] = None,
    draws: Annotated[
        int, typer.Option("--draws", min=1, help="Draws of a stochastic --encoding averaged per level (seeds 0..N-1).")
    ] = 1,
    review_slices: Annotated[
        int | None,
        typer.Option(
            "--review-slices",
            min=0,
            help="Log at most N explained slices as review images (input, counterfactual, map; one step per "
            "slice in the run's Model metrics tab), every k-th if there are more; 0: none. Default: 200.",
        ),
    ] = None,
    explain_set: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="explain.KEY=VALUE replacing the model's explain defaults, e.g. --set explain.pairing=reconstruction "
            "(the map against the plain reconstruction), explain.gate=0.5, explain.smooth=4.",
        ),
    ] = None,
    threads: Threads = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Explain a scan: healthy counterfactual + anomaly map, written in the input's space.

    Given a cohort, explain every study into OUT/<study>/ (resumable; a summary table, most abnormal
    first; one MLflow parent run with a child run per study; torchrun shares the studies out).
    """
    set_threads(threads)
    from anomaly_diffusion.usecases.cohort import CohortRequest, cohort_source
    from anomaly_diffusion.usecases.explain import REVIEW_SLICES, ExplainRequest, parse_levels, run_explain

    request = ExplainRequest(
        scans=scans,
        out_dir=out_dir,
        tracking_uri=tracking_store(tracking_uri),
        model=checkpoint,
        noise_level=noise_level,
        scale=scale,
        steps=steps,
        guidance=guidance,
        residual=residual,
        batch_size=batch_size,
        mask=mask,
        brainmask=brainmask,
        threshold=threshold,
        overwrite=overwrite,
        device=device,
        compile_networks=compile_networks,
        fp32=fp32,
        encoding=encoding,
        decoding=decoding,
        ensemble_levels=parse_levels(ensemble) if ensemble else (),
        draws=draws,
        review_slices=REVIEW_SLICES if review_slices is None else review_slices,
        explain_overrides=tuple(explain_set or ()),
    )
    source = cohort_source(scans, channels or [], mask, brainmask)
    if source is not None:
        _explain_cohort(CohortRequest.like(request, source))
        return
    with progress_bars() as progress:
        outcome = run_explain(request, slice_progress(progress), announce)
    print_explain(outcome)


def _explain_cohort(request: Any) -> None:
    """`adiff explain` on a cohort (`usecases.cohort.CohortRequest`); exit 1 with one line if a study failed."""
    from anomaly_diffusion.distributed import shutdown
    from anomaly_diffusion.usecases.cohort import CohortHooks, run_cohort

    context = _distributed_context()
    try:
        with progress_bars() as progress:
            studies, slices = study_progress(progress)
            hooks = CohortHooks(announce, studies, slices) if context.is_main else CohortHooks(announce)
            outcome = run_cohort(request, hooks, context)
    finally:
        shutdown(context)
    if outcome is not None:
        print_cohort(outcome)
        outcome.raise_for_failures()


@app.command(cls=Command)
@one_line_errors
def evaluate(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest CSV; the split's rows need lesion masks.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: train, val or test.")] = "val",
    checkpoint: ModelRef = None,
    methods: Annotated[
        str,
        typer.Option(
            "--methods",
            help=grammar_help(),
        ),
    ] = "guided,unguided,intensity",
    threshold_split: Annotated[
        str | None,
        typer.Option("--threshold-split", help="Split that chooses thresholds (default: leave one volume out)."),
    ] = None,
    median_filter: Annotated[
        int, typer.Option("--median-filter", help="In-plane median filter size for every map (0 = none).")
    ] = 0,
    median_3d: Annotated[
        int, typer.Option("--median-3d", help="3D (cubic) median filter size for every map, in voxels (0 = none).")
    ] = 0,
    erode: Annotated[
        int,
        typer.Option(
            "--erode", help="Erode the brain mask by N voxels: scores at its edge count as normal (0 = none)."
        ),
    ] = 0,
    min_component: Annotated[
        int,
        typer.Option(
            "--min-component", help="Binary maps drop 3D connected components smaller than N voxels (0 = none)."
        ),
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
    threads: Threads = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Score our method and baselines against lesion masks on a split: tables, curves, montage, MLflow run."""
    set_threads(threads)
    from anomaly_diffusion.distributed import shutdown
    from anomaly_diffusion.evaluation.grammar import split_method_specs
    from anomaly_diffusion.evaluation.postprocess import PostProcess
    from anomaly_diffusion.usecases.evaluate import EvaluateRequest, run_evaluate

    try:
        fprs = [float(f) for f in fpr.split(",") if f.strip()]
    except ValueError as exc:
        raise ConfigError(f"--fpr must be comma-separated numbers, got {fpr!r}") from exc
    request = EvaluateRequest(
        manifest=manifest,
        out_dir=out_dir,
        tracking_uri=tracking_store(tracking_uri),
        model=checkpoint,
        split=split,
        methods=split_method_specs(methods),
        threshold_split=threshold_split,
        median_size=median_filter,
        fprs=fprs,
        bootstrap=bootstrap,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
        max_volumes=max_volumes,
        compile_networks=compile_networks,
        fp32=fp32,
        explain_overrides=explain_set or [],
        postprocess=PostProcess(median_3d, erode, min_component),
    )
    with progress_bars() as progress:
        task = progress.add_task("evaluate volumes", total=None, info="")

        def update(done: int, total: int, subject: str, method: str) -> None:
            progress.update(task, completed=done, total=total, info=f"{subject} {method}")

        context = _distributed_context()
        try:
            outcome = run_evaluate(request, update if context.is_main else None, context, announce)
        finally:
            shutdown(context)
    if outcome is None:
        return
    out.print(Path(outcome.outputs["table"]).read_text(), highlight=False, markup=False)
    for name, path in outcome.outputs.items():
        out.print(f"{name}: {path}", highlight=False)
    out.print(f"mlflow run: {outcome.run_id}   time: {outcome.seconds:.0f} s", highlight=False)


@app.command(cls=Command)
@one_line_errors
def demo(
    work_dir: Annotated[Path, typer.Option("--work-dir", help="Where the demo dataset and runs go.")] = Path(
        "adiff_demo"
    ),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Dotted override of the demo config.")
    ] = None,
    n_subjects: Annotated[int, typer.Option("--subjects", min=4, help="Synthetic subjects to build.")] = 24,
    threads: Threads = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """End to end, offline: build a dataset from the MNI152 template with synthetic lesions, train, explain."""
    set_threads(threads)
    from anomaly_diffusion.usecases.demo import DemoHooks, run_demo

    def say(text: str) -> None:
        console.print(text, highlight=False)

    with progress_bars() as progress:
        hooks = DemoHooks(say, phase_progress(progress), print_data, slice_progress(progress))
        outcome = run_demo(work_dir, tracking_uri, n_subjects, overrides or [], hooks)
    print_demo(outcome)


@app.command(cls=Command)
@one_line_errors
def register(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a training run.")],
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option("--alias", help="Also point this alias at the new version.")] = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Register a training run's bundle in the MLflow Model Registry."""
    from anomaly_diffusion.tracking import register_model

    version = register_model(tracking_store(tracking_uri), run_id, name, alias)
    out.print(f"registered models:/{name}/{version}" + (f" (alias @{alias})" if alias else ""), highlight=False)


@app.command(cls=Command)
@one_line_errors
def inspect(
    manifest: Annotated[Path, typer.Argument(help="Dataset manifest CSV.")],
    config: Annotated[str | None, typer.Option("--config", "-c", help="Config whose data section applies.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", "-s", help="Dotted override.")] = None,
) -> None:
    """Summarise a dataset (subjects, slices per label, shapes, spacings, intensities); fail on bad data."""
    from anomaly_diffusion.config import load_config
    from anomaly_diffusion.usecases.common import resolve_config_path
    from anomaly_diffusion.usecases.inspect import inspect_dataset

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


@app.command(cls=Command)
@one_line_errors
def ui(
    port: Annotated[int, typer.Option("--port", help="First port to try.")] = 5000,
    tracking_uri: TrackingUri = None,
) -> None:
    """Start the MLflow UI for the tracking store on 127.0.0.1 (Ctrl-C or SIGTERM stops it and its workers)."""
    import signal

    from anomaly_diffusion.config import TrackingConfig
    from anomaly_diffusion.tracking import free_port, start_ui, stop_ui, ui_url

    uri = tracking_store(tracking_uri)
    chosen = free_port(port)
    url = ui_url(f"http://127.0.0.1:{chosen}", uri, TrackingConfig().experiment)  # before the server migrates the store
    process = start_ui(uri, "127.0.0.1", chosen)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    out.print(f"MLflow UI for {uri}: {url}  (Ctrl-C to stop)", highlight=False)
    try:
        process.wait()
    except KeyboardInterrupt:
        stop_ui(process)
        out.print("stopped", highlight=False)


@app.command(cls=Command)
def version() -> None:
    """Print the package version."""
    out.print(__version__)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    app(prog_name="adiff")


if __name__ == "__main__":
    main()

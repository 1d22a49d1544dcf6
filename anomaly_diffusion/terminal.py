"""The terminal side of the command line: one-line errors, choices, progress bars with time remaining.

Used by `cli.py` and by the `data_prep/` scripts (`run_tool`), so neither imports the other.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperCommand, TyperGroup

from anomaly_diffusion.diffusion.guidance import GUIDANCE
from anomaly_diffusion.errors import AdiffError
from anomaly_diffusion.files import no_space
from anomaly_diffusion.residuals import RESIDUALS

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {' '.join(message.split())}", highlight=False, soft_wrap=True)


def _parameter_name(exc: typer.BadParameter) -> str:
    param = exc.param
    opts = getattr(param, "opts", None)
    if getattr(param, "param_type_name", "") == "option" and opts:
        return str(opts[0])
    name = getattr(param, "human_readable_name", None) or getattr(param, "name", None)  # typer's arguments: no metavar
    return str(name).upper() if name else "argument"


class _OneLine:
    """Option values the parser refuses (a wrong type, a choice not offered) give one `error:` line, exit 1;
    the `--help` row shows no `<bool>`. Mixed into the adiff group and every command: typer runs a
    one-command app (the data_prep tools) as that command alone, without its group."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:  # `--help` is a flag: no value column (as `FLAG` does for ours)
            option.metavar = ""
        return option

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, standalone_mode=False, **extra)  # type: ignore[misc]
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)  # type: ignore[misc]
        except typer.BadParameter as exc:
            if exc.message.startswith("must "):  # `choice`'s refusal names the option itself
                _error_line(f"{_parameter_name(exc)} {exc.message}")
            elif exc.message:
                _error_line(f"{_parameter_name(exc)}: {exc.message}")
            else:
                _error_line(exc.format_message())
            sys.exit(1)
        except typer.TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `adiff` alone: the help, as typer prints it
                super().main(args, prog_name, standalone_mode=True, **extra)  # type: ignore[misc]
            _error_line(exc.format_message() if hasattr(exc, "format_message") else str(exc))
            sys.exit(1)
        except typer.Abort:
            console.print("[bold red]interrupted[/]", highlight=False)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


class OneLineErrors(_OneLine, TyperGroup):  # type: ignore[misc]
    """The adiff command group (`typer.Typer(cls=OneLineErrors)`)."""


class Command(_OneLine, TyperCommand):  # type: ignore[misc]
    """Every adiff subcommand and data_prep tool (`@app.command(cls=Command)`)."""


def choice(names: Sequence[str]) -> dict[str, Any]:
    """typer.Option arguments for a typed choice that the parser checks: a `--help` metavar listing the
    names, and a refusal as '--opt must be one of a, b, got 'x'' (one line, see `OneLineErrors`)."""
    allowed = tuple(names)

    def parse(value: str) -> str:
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}, got {value!r}")
        return value

    return {"parser": parse, "metavar": "[" + "|".join(allowed) + "]"}


def _quiet_library_logs() -> None:
    # nibabel logs header "fixes" of odd files and alembic logs migrations: not for users' eyes
    for name in ("nibabel", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def one_line_errors(command: F) -> F:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_library_logs()
        try:
            return command(*args, **kwargs)
        except AdiffError as exc:
            _error_line(str(exc))
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk outside our atomic writers (MLflow's artifact copies, ...)
            full = no_space(exc, Path(exc.filename).parent if exc.filename else Path.cwd())
            if full is None:
                raise
            _error_line(str(full))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_bars() -> Iterator[Progress]:
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


def phase_progress(progress: Progress) -> Callable[[str, int, int, dict[str, float]], None]:
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


def slice_progress(progress: Progress) -> Callable[[int, int], None]:
    """(slices done, total) -> an 'explain slices' bar, added at the first call."""
    tasks: list[Any] = []

    def update(done: int, total: int) -> None:
        if not tasks:
            tasks.append(progress.add_task("explain slices", total=total, info=""))
        progress.update(tasks[0], completed=done, total=total)

    return update


def study_progress(progress: Progress) -> tuple[Callable[[int, int, str], None], Callable[[int, int], None]]:
    """A cohort's two bars: (studies done, total, current study) -> 'explain studies' with the time
    remaining for the cohort; (slices done, total) -> 'slices' of the current study, restarted per study."""
    tasks: dict[str, Any] = {}

    def studies(done: int, total: int, subject: str) -> None:
        if "studies" not in tasks:
            tasks["studies"] = progress.add_task("explain studies", total=total, info="")
        progress.update(tasks["studies"], completed=done, total=total, info=subject)
        if "slices" in tasks and subject != tasks.get("subject"):
            progress.reset(tasks["slices"], total=None)
        tasks["subject"] = subject

    def slices(done: int, total: int) -> None:
        if "slices" not in tasks:
            tasks["slices"] = progress.add_task("  slices", total=total, info="")
        progress.update(tasks["slices"], completed=done, total=total)

    return studies, slices


def print_cohort(outcome: Any, shown: int = 20) -> None:
    """A cohort's table, most abnormal first, its files and counts (`usecases.cohort.CohortOutcome`)."""

    def number(value: float, digits: int = 3) -> str:
        return f"{value:.{digits}f}" if value == value else "-"  # NaN: does not apply

    header = (
        f"{'study':<16} {'p(h) before':>11} {'after':>6} {'max score':>9} {'volume mL':>9} {'peak':>5} {'time s':>6}"
    )
    out.print("most abnormal first (by max anomaly score); p(healthy): the lowest over slices", highlight=False)
    out.print(header, highlight=False, markup=False)
    for row in outcome.rows[:shown]:
        if row.status != "done":
            out.print(f"{row.study:<16} failed: {row.error}", highlight=False, markup=False)
            continue
        peak = f"{row.peak_slice:.0f}" if row.peak_slice == row.peak_slice else "-"
        out.print(
            f"{row.study:<16} {number(row.p_healthy_before_min):>11} {number(row.p_healthy_after_min):>6} "
            f"{number(row.anomaly_max):>9} {number(row.anomaly_volume_ml, 2):>9} {peak:>5} {row.seconds:>6.0f}",
            highlight=False,
            markup=False,
        )
    if len(outcome.rows) > shown:
        out.print(f"... {len(outcome.rows) - shown} more", highlight=False)
    for name, path in outcome.outputs.items():
        out.print(f"{name}: {path}", highlight=False)
    processes = f" on {outcome.world_size} processes" if outcome.world_size > 1 else ""
    out.print(
        f"mlflow parent run: {outcome.parent_run_id}   studies: {len(outcome.rows)} ({outcome.explained} explained, "
        f"{outcome.tracked} only logged, {outcome.skipped} skipped, {len(outcome.failed)} failed)   "
        f"time: {outcome.seconds:.0f} s{processes}",
        highlight=False,
    )


def print_data(summary: dict[str, dict[str, int]]) -> None:
    for split, counts in summary.items():
        console.print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in counts.items()), highlight=False)


def run_tool(function: Callable[..., None]) -> None:
    """Run a data_prep script's typer function with the CLI's one-line error handling."""
    tool = typer.Typer(cls=OneLineErrors, pretty_exceptions_enable=False, add_completion=False)
    tool.command(cls=Command)(one_line_errors(function))
    tool()


DEVICES = ("auto", "cpu", "cuda")


def tracking_store(option: str | None, configured: str | None = None) -> str:
    """The tracking URI: the option (or MLFLOW_TRACKING_URI), else the config's, else local SQLite."""
    from anomaly_diffusion.tracking import DEFAULT_TRACKING_URI

    return option or configured or DEFAULT_TRACKING_URI


# options several commands share
TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI",
        help="MLflow tracking URI (default: sqlite:///mlruns.db in the current folder).",
    ),
]
ModelRef = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        "--model",
        help="Bundle file, models:/NAME/VERSION or models:/NAME@ALIAS (default: the newest bundle in "
        "./adiff_runs or of the tracking store's newest finished training run).",
    ),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Slices per batch (default: the model's explain.batch_size).")
]
Device = Annotated[str, typer.Option("--device", **choice(DEVICES))]
FLAG = {"metavar": ""}
"""Options of an on/off flag: no `<bool>` value column in --help (a flag takes no value)."""

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.", **FLAG)]
Compile = Annotated[
    bool, typer.Option("--compile", help="torch.compile the networks (minutes up front; for many volumes).", **FLAG)
]
Fp32 = Annotated[
    bool,
    typer.Option(
        "--fp32",
        **FLAG,
        help="Compute in float32 throughout (default: bf16 mixed precision where the hardware has it, "
        "CUDA, or a CPU with AMX or AVX512-BF16; 1.7-3x faster there, maps differ by ~1e-3).",
    ),
]


Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else one per core). Give each of two "
        "jobs on one machine its share, e.g. --threads 1 on 2 cores: oversubscribed threads are several times slower.",
    ),
]


def announce(text: str) -> None:
    """A line about the run that is starting (device, threads, precision), on stderr."""
    console.print(text, highlight=False)


# explain's method options (defaults come from the model)
NoiseLevel = Annotated[
    int | None,
    typer.Option(
        "--noise-level", "-L", help="Encoding depth L, 1 <= L < T (default: the model's explain.noise_level)."
    ),
]

Scale = Annotated[
    float | None,
    typer.Option(
        "--scale",
        help="Guidance scale s, 0 = unguided; w for classifier-free models (default: the model's explain.scale).",
    ),
]

Steps = Annotated[
    int | None,
    typer.Option(
        "--steps", help="DDIM steps K for encode and for decode, stride L/K (default: the model's explain.steps)."
    ),
]

ResidualOption = Annotated[
    str | None,
    typer.Option(
        "--residual",
        **choice(RESIDUALS.names()),
        help=f"How the map is made: {RESIDUALS.help()}. Default: the model's explain.residual.",
    ),
]

GuidanceOption = Annotated[
    str | None,
    typer.Option(
        "--guidance",
        **choice(GUIDANCE.names()),
        help=f"Guidance target: {GUIDANCE.help()}. Default: the model's explain.guidance.",
    ),
]


def print_explain(outcome: Any) -> None:
    """The files and numbers of an explained scan (`usecases.explain.ExplainOutcome`)."""
    m = outcome.metrics
    for name, path in outcome.outputs.items():
        out.print(f"{name}: {path}", highlight=False)
    healthy = (
        f"p(healthy) before={m['p_healthy_before_mean']:.3f} after={m['p_healthy_after_mean']:.3f} "
        if "p_healthy_before_mean" in m
        else "classifier-free model, no p(healthy) "
    )
    out.print(
        f"{healthy}(mean over {int(m['slices_explained'])} slices); max anomaly score {m['anomaly_max']:.3f}; "
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


def print_trained(outcome: Any, uri: str) -> None:
    """The bundle, run and final numbers of a training run (`usecases.train.TrainOutcome`)."""
    result = outcome.result
    out.print(f"bundle: {result.bundle_path}", highlight=False)
    out.print(f"mlflow run: {outcome.run_id} ({uri})", highlight=False)
    accuracy = "  ".join(f"{k}={v:.3f}" for k, v in result.classifier_accuracy.items())
    classifier = f"  classifier_loss={result.classifier_loss:.4f}  {accuracy}" if result.classifier_accuracy else ""
    out.print(f"ddpm_loss={result.ddpm_loss:.4f}{classifier}", highlight=False)
    if outcome.registered:
        out.print(f"registered: models:/{outcome.registered}", highlight=False)
    out.print(f"time: {outcome.seconds:.0f} s", highlight=False)


def print_demo(outcome: Any) -> None:
    """Each explained demo case beside its baseline, then the runs (`usecases.demo.DemoOutcome`)."""
    from anomaly_diffusion.data.lesions import LESION_KINDS

    for case in outcome.cases:
        title = f"{case.kind} lesions ({LESION_KINDS[case.kind]}), held-out subject {case.subject}:"
        out.print(f"\n{title}", highlight=False)
        print_explain(case.explained)
    import shlex

    out.print(
        f"training run: {outcome.trained.run_id}   store: {outcome.tracking_uri}   (adiff ui to browse)",
        highlight=False,
    )
    out.print(f"demo wall time: {outcome.seconds:.0f} s", highlight=False)
    out.print(f"next, another held-out subject: {shlex.join(outcome.next_command)}", highlight=False, markup=False)

"""WORK/RESULTS.md of the BraTS benchmark, from the files `benchmarks/brats.py` leaves in WORK.

    python benchmarks/brats_report.py WORK      # write WORK/RESULTS.md again, nothing is rerun

Reads, per channel set, WORK/SET/plan.json (what the last run of brats.py planned and which stages
it ran or reused), the stage records WORK/SET/.../*.json and `adiff evaluate`'s results.json of
the val choice and the test scoring. Every number in RESULTS.md comes from those files; the goals
are verdicts computed from the test numbers (`goals`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RULE = (
    "highest val pixel AUPRC; AUPRCs equal to 3 decimals are tied and broken by the higher best Dice "
    "(the val oracle), then by the order of the grid"
)
"""How a channel set's candidate is chosen on val (`rank_candidates`)."""

HEADLINE = ("auprc", "dice_chosen", "dice_best", "slice_auroc_max")
"""The summary's metrics: pixel AUPRC, Dice at the val-chosen threshold, best Dice, slice AUROC (max)."""

LABELS = {
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "dice_slice_otsu": "Dice (slice Otsu)",
    "dice_chosen": "Dice (val thr.)",
    "dice_best": "Dice (best)",
    "slice_auroc_max": "slice AUROC (max)",
    "slice_auroc_mean": "slice AUROC (mean)",
}
EVERY_METRIC = tuple(LABELS)
"""What "guided above unguided on every metric" compares (plus every Dice @FPR evaluate reports)."""

SLICE_AUROC_GOAL = 0.95
WEAK_CHANNEL_AUPRC_GOAL = 0.40
Row = Mapping[str, Any]


def number(value: Any) -> float:
    """A metric as a float, NaN for missing or non-numeric values."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def fmt(value: Any) -> str:
    """Three decimals, or n/a."""
    x = number(value)
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def minutes(seconds: Any) -> str:
    """'12.3 min' (or seconds below a minute), n/a when unknown."""
    x = number(seconds)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:.0f} s" if x < 60 else f"{x / 60:.1f} min"


def rank_candidates(results: Mapping[str, Row], names: Sequence[str]) -> list[str]:
    """The candidates best first by `RULE`; a missing or NaN metric ranks last.

    Args:
        results: method name -> its row of `adiff evaluate`'s results.json on the val split.
        names: the candidates in grid order.
    """

    def key(name: str) -> tuple[float, float]:
        row = results.get(name, {})
        auprc, dice = number(row.get("auprc")), number(row.get("dice_best"))
        return (round(auprc, 3) if math.isfinite(auprc) else -math.inf, dice if math.isfinite(dice) else -math.inf)

    return sorted(names, key=key, reverse=True)  # sorted() stays stable with reverse=True: grid order breaks ties


def stronger(rows: Sequence[Row], metric: str) -> float:
    """The best value of `metric` over some rows (NaN if none is finite)."""
    values = [number(r.get(metric)) for r in rows]
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def small_lesion(row: Row, metric: str) -> float:
    """A row's `metric` on the small-lesion slices (< 1 cm²), NaN where evaluate does not report it."""
    small = (row.get("by_size") or {}).get("small") or {}
    return number(small.get(metric)) if number(small.get("slices")) > 0 else math.nan


def fpr_metrics(row: Row) -> dict[str, float]:
    """'Dice @FPR 1%' -> value for each target FPR of a row."""
    return {f"Dice @FPR {k}": number(v) for k, v in (row.get("dice_at_fpr") or {}).items()}


@dataclass(frozen=True)
class Goal:
    """One of the issue's goals for one model: its verdict ('met', 'missed', 'n/a') and the numbers behind it."""

    goal: str
    verdict: str
    detail: str


def _above(ours: float, theirs: float) -> str:
    if not (math.isfinite(ours) and math.isfinite(theirs)):
        return "n/a"
    return "met" if ours > theirs else "missed"


def goals(
    channels: Sequence[str],
    chosen: Row,
    guided: Row | None,
    unguided: Row | None,
    intensity: Mapping[str, Sequence[Row]],
) -> list[Goal]:
    """The issue's goals for one channel set's chosen model, from its test rows.

    Args:
        channels: the model's channels, channel 0 first ('flair', 't1', 't1c', 't2').
        chosen: the map chosen on val; guided / unguided: the best guided (s > 0) and unguided (s = 0)
            rows (None when the grid has none).
        intensity: channel name -> its raw-intensity rows (without and with the map's median filter);
            a goal against intensity must beat the stronger of them.
    """
    found: list[Goal] = []
    if "flair" in channels:
        flair = intensity.get("flair", [])
        ours = (number(chosen.get("auprc")), number(chosen.get("dice_chosen")))
        theirs = (stronger(flair, "auprc"), stronger(flair, "dice_chosen"))
        verdicts = {_above(ours[0], theirs[0]), _above(ours[1], theirs[1])}
        verdict = "n/a" if "n/a" in verdicts else "missed" if "missed" in verdicts else "met"
        found.append(
            Goal(
                "AUPRC and val-threshold Dice above raw FLAIR",
                verdict,
                f"AUPRC {fmt(ours[0])} vs {fmt(theirs[0])}, Dice (val thr.) {fmt(ours[1])} vs {fmt(theirs[1])}",
            )
        )
    if tuple(channels) in (("t1",), ("t1c",)):
        value = number(chosen.get("auprc"))
        found.append(
            Goal(
                f"AUPRC > {WEAK_CHANNEL_AUPRC_GOAL:.2f} ({channels[0].upper()} only)",
                _above(value, WEAK_CHANNEL_AUPRC_GOAL),
                f"AUPRC {fmt(value)}",
            )
        )
    for pooling in ("max", "mean"):
        value = number(chosen.get(f"slice_auroc_{pooling}"))
        found.append(
            Goal(
                f"slice AUROC > {SLICE_AUROC_GOAL:.2f} ({pooling} score per slice)",
                _above(value, SLICE_AUROC_GOAL),
                fmt(value),
            )
        )
    if guided is None or unguided is None:
        found.append(Goal("guided above unguided on every metric", "n/a", "the grid has no guided or no unguided row"))
    else:
        pairs = {LABELS[m]: (number(guided.get(m)), number(unguided.get(m))) for m in EVERY_METRIC}
        g_fpr, u_fpr = fpr_metrics(guided), fpr_metrics(unguided)
        pairs.update({k: (v, u_fpr.get(k, math.nan)) for k, v in g_fpr.items()})
        lost = [f"{k} {fmt(g)} vs {fmt(u)}" for k, (g, u) in pairs.items() if _above(g, u) != "met"]
        found.append(
            Goal(
                "guided above unguided on every metric",
                "met" if not lost else "missed",
                f"{guided.get('method')} vs {unguided.get('method')}: "
                + (f"not above on {'; '.join(lost)}" if lost else f"above on all {len(pairs)}"),
            )
        )
    reference = intensity.get(channels[0], [])
    ours = (small_lesion(chosen, "auprc"), small_lesion(chosen, "dice_slice_otsu"))
    theirs = (
        stronger([{"v": small_lesion(r, "auprc")} for r in reference], "v"),
        stronger([{"v": small_lesion(r, "dice_slice_otsu")} for r in reference], "v"),
    )
    verdicts = {_above(ours[0], theirs[0]), _above(ours[1], theirs[1])}
    slices = number(((chosen.get("by_size") or {}).get("small") or {}).get("slices"))
    found.append(
        Goal(
            f"small lesions (< 1 cm² slices) above raw {channels[0].upper()} intensity",
            "n/a" if "n/a" in verdicts else "missed" if "missed" in verdicts else "met",
            "evaluate reports no small-lesion slices here"
            if "n/a" in verdicts
            else f"{slices:.0f} slices: AUPRC {fmt(ours[0])} vs {fmt(theirs[0])}, "
            f"Dice (slice Otsu) {fmt(ours[1])} vs {fmt(theirs[1])}",
        )
    )
    return found


# ---------------------------------------------------------------- reading WORK


def read_json(path: Path) -> Any:
    """A JSON file's data, None if it is missing (a stage not run yet)."""
    return json.loads(path.read_text()) if path.is_file() else None


def results_by_method(path: Path) -> dict[str, dict[str, Any]]:
    """method name -> row of an `adiff evaluate` results.json ({} if missing)."""
    data = read_json(path)
    return {r["method"]: r for r in data["results"]} if data else {}


@dataclass
class ArmData:
    """One arm's plan and what its stages left."""

    plan: dict[str, Any]
    train: dict[str, Any] | None
    choose: dict[str, Any] | None
    val: dict[str, dict[str, Any]]
    test_record: dict[str, Any] | None
    test: dict[str, dict[str, Any]]
    test_report: dict[str, Any] | None
    worst_record: dict[str, Any] | None
    worst: dict[str, Any] | None

    @property
    def name(self) -> str:
        return str(self.plan["name"])

    def role_row(self, role: str) -> dict[str, Any] | None:
        """The test row of a role ('chosen', 'guided', 'unguided', ...), None if not scored."""
        method = (self.test_record or {}).get("roles", {}).get(role)
        return self.test.get(method) if method else None


def load_arm(folder: Path, plan: dict[str, Any]) -> ArmData:
    """An arm's records under WORK/SET/ARM."""
    base = folder / plan["name"]
    return ArmData(
        plan=plan,
        train=read_json(base / "train.json"),
        choose=read_json(base / "choose.json"),
        val=results_by_method(base / "val" / "results.json"),
        test_record=read_json(base / "test.json"),
        test=results_by_method(base / "test" / "results.json"),
        test_report=read_json(base / "test" / "results.json"),
        worst_record=read_json(base / "worst.json"),
        worst=read_json(base / "worst" / "worst.json"),
    )


def intensity_rows(set_plan: Mapping[str, Any], arms: Sequence[ArmData]) -> dict[str, list[dict[str, Any]]]:
    """channel -> its scored test intensity rows (from the arm that scored them)."""
    holder = next((a for a in arms if a.name == set_plan.get("intensity_arm")), None)
    if holder is None or holder.test_record is None:
        return {}
    found: dict[str, list[dict[str, Any]]] = {}
    for channel, names in holder.test_record.get("intensity", {}).items():
        found[channel] = [holder.test[n] for n in names if n in holder.test]
    return found


# ---------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _versus(ours: Row | None, theirs: Sequence[Row], metric: str) -> str:
    if ours is None:
        return "n/a"
    return f"{fmt(ours.get(metric))} / {fmt(stronger(theirs, metric))}"


def summary_section(sets: Sequence[tuple[dict[str, Any], list[ArmData]]]) -> list[str]:
    """The table across channel sets and the goal verdicts."""
    rows, goal_lines = [], []
    for plan, arms in sets:
        ints = intensity_rows(plan, arms)
        reference = ints.get(plan["channels"][0], [])
        for arm in arms:
            chosen = arm.role_row("chosen")
            if not arm.plan.get("chooses"):
                continue
            times = [arm.train, arm.choose, arm.test_record]
            rows.append(
                [
                    plan["name"],
                    arm.name,
                    f"`{(arm.choose or {}).get('chosen_spec', 'n/a')}`",
                    *(_versus(chosen, reference, m) for m in HEADLINE),
                    *(minutes((t or {}).get("seconds")) for t in times),
                ]
            )
            if chosen is None:
                goal_lines.append(f"- **{plan['name']} / {arm.name}**: not scored on test yet")
                continue
            found = goals(plan["channels"], chosen, arm.role_row("guided"), arm.role_row("unguided"), ints)
            goal_lines.append(f"- **{plan['name']} / {arm.name}**:")
            goal_lines += [f"  - {g.goal}: **{g.verdict}** ({g.detail})" for g in found]
    header = [
        "channels",
        "arm",
        "chosen on val",
        "AUPRC map / int.",
        "Dice (val thr.) map / int.",
        "Dice (best) map / int.",
        "slice AUROC (max) map / int.",
        "train",
        "val choice",
        "test",
    ]
    return [
        "## Summary (test split)",
        "",
        "Map: the chosen method of each arm. Int.: raw intensity of the model's channel 0 (FLAIR in all4), "
        "the stronger of raw and raw with the map's median filter. Times: this machine, per stage and arm "
        "(the val and test stages score every method of the stage in one `adiff evaluate`, sharing encodings).",
        "",
        *_table(header, rows),
        "",
        "### Goals (issue 17), computed from the test numbers",
        "",
        *(goal_lines or ["- no arm chose a method"]),
        "",
    ]


def _val_section(arm: ArmData) -> list[str]:
    if arm.choose is None:
        return [f"Arm **{arm.name}**: not chosen on val yet.", ""]
    candidates = arm.choose["candidates"]
    ranked = rank_candidates(arm.val, [c["name"] for c in candidates])
    by_name = {c["name"]: c for c in candidates}
    keys = sorted({k for c in candidates for k in c["values"]}, key=lambda k: "LsKgrmenc".find(k[0]))
    header = ["rank", "candidate", *keys, "AUPRC", "Dice (best)", "Dice (LOVO thr.)", "AUROC", "slice AUROC (max)"]
    rows = []
    for rank, name in enumerate(ranked, 1):
        r = arm.val.get(name, {})
        mark = " **(chosen)**" if name == arm.choose["chosen"] else ""
        rows.append(
            [
                str(rank),
                f"{name}{mark}",
                *(str(by_name[name]["values"].get(k, "")) for k in keys),
                *(fmt(r.get(m)) for m in ("auprc", "dice_best", "dice_chosen", "auroc", "slice_auroc_max")),
            ]
        )
    for name in arm.choose.get("references", []):
        r = arm.val.get(name, {})
        rows.append(
            [
                "ref.",
                name,
                *("" for _ in keys),
                *(fmt(r.get(m)) for m in ("auprc", "dice_best", "dice_chosen", "auroc", "slice_auroc_max")),
            ]
        )
    record = arm.choose
    return [
        f"#### Arm {arm.name}: choice on val ({len(candidates)} candidates, {minutes(record.get('seconds'))}; "
        f"{record.get('encodings', '?')} encodings and {record.get('decodings', '?')} decodings shared by them)",
        "",
        f"Rule: {RULE}. Dice (LOVO thr.): at the threshold chosen on the other val volumes (leave one out). "
        "`ref.` rows are not candidates. Full tables: "
        f"[{arm.name}/val/results.md]({arm.plan['folder']}/val/results.md).",
        "",
        *_table(header, rows),
        "",
    ]


def _test_rows(arm: ArmData) -> list[list[str]]:
    rows = []
    record = arm.test_record or {}
    for method in record.get("methods", []):
        r = arm.test.get(method["name"])
        if r is None:
            continue
        fprs = list((r.get("dice_at_fpr") or {}).values())
        rows.append(
            [
                method["role"],
                arm.name,
                f"`{method['spec']}`",
                str(r.get("regime", "")),
                *(fmt(r.get(m)) for m in ("auroc", "auprc", "dice_slice_otsu", "dice_chosen", "dice_best")),
                *(fmt(v) for v in fprs[:2]),
                fmt(r.get("slice_auroc_max")),
                fmt(r.get("slice_auroc_mean")),
                fmt(small_lesion(r, "auprc")),
            ]
        )
    return rows


def _losses(plan: Mapping[str, Any], arm: ArmData, ints: Mapping[str, Sequence[Row]]) -> list[str]:
    """Where the chosen map loses to raw intensity of channel 0, from the test numbers."""
    chosen = arm.role_row("chosen")
    reference = list(ints.get(plan["channels"][0], []))
    if chosen is None or not reference:
        return []
    name = plan["channels"][0].upper()
    lines = [f"#### Arm {arm.name}: where the chosen map loses to raw {name} intensity (test)", ""]
    metrics = [m for m in EVERY_METRIC if number(chosen.get(m)) < stronger(reference, m)]
    lines.append(
        "- Pooled metrics behind intensity: "
        + (", ".join(f"{LABELS[m]} {fmt(chosen.get(m))} vs {fmt(stronger(reference, m))}" for m in metrics) or "none")
        + "."
    )
    sizes = []
    for size in ("small", "medium", "large"):
        slices = number(((chosen.get("by_size") or {}).get(size) or {}).get("slices"))
        theirs = stronger(
            [{"v": number(((r.get("by_size") or {}).get(size) or {}).get("auprc"))} for r in reference], "v"
        )
        ours = number(((chosen.get("by_size") or {}).get(size) or {}).get("auprc"))
        sizes.append(f"{size} ({slices:.0f} slices) {fmt(ours)} vs {fmt(theirs)}")
    lines.append("- AUPRC by lesion area per slice (< 1 cm², < 10 cm², larger): " + "; ".join(sizes) + ".")
    raw = reference[0]
    volumes = [
        (s, number(m.get("auprc")), number((raw.get("per_volume") or {}).get(s, {}).get("auprc")))
        for s, m in (chosen.get("per_volume") or {}).items()
    ]
    lost = [f"{s} {fmt(a)} vs {fmt(b)}" for s, a, b in volumes if a < b]
    lines.append(
        f"- Per volume (AUPRC vs raw {name}): behind on {len(lost)} of {len(volumes)}"
        + (f" ({'; '.join(lost)})" if lost else "")
        + "."
    )
    guided, unguided = arm.role_row("guided"), arm.role_row("unguided")
    before, after = number((guided or {}).get("p_healthy_before")), number((guided or {}).get("p_healthy_after"))
    if guided is not None and math.isfinite(before):
        lines.append(
            f"- The classifier's mean p(healthy | x) over test slices, {guided['method']}: {fmt(before)} for the "
            f"scan, {fmt(after)} for its counterfactual (near 1: the guidance reached healthy; low: it did not)."
        )
    if guided is not None and unguided is not None:
        lines.append(
            f"- Guidance adds AUPRC {number(guided.get('auprc')) - number(unguided.get('auprc')):+.3f} over the "
            f"unguided reconstruction ({fmt(guided.get('auprc'))} vs {fmt(unguided.get('auprc'))})."
        )
    worst = arm.worst
    if worst:
        folder = arm.plan["folder"]
        lines.append(
            f"- Per diseased slice (Otsu Dice, `benchmarks/worst_slices.py`, against `{worst['against']}`): "
            f"the map wins {worst['method_wins']}, intensity wins {worst['against_wins']} of "
            f"{worst['diseased_slices']}; by size: "
            + "; ".join(
                f"{k} {v['method_wins']}/{v['against_wins']} of {v['slices']} "
                f"(mean Dice {v['mean_dice_method']:.2f} vs {v['mean_dice_against']:.2f})"
                for k, v in worst["by_size"].items()
            )
            + f". Montage of the {len(worst['worst'])} worst: [{folder}/worst/worst.png]({folder}/worst/worst.png)."
        )
        lines += [
            "",
            *_table(
                ["subject", "slice", "lesion (cm²)", "Dice map", "Dice int.", "deficit"],
                [
                    [
                        str(w["subject"]),
                        str(w["slice"]),
                        f"{w['lesion_mm2'] / 100:.2f}",
                        f"{w['dice_method']:.3f}",
                        f"{w['dice_against']:.3f}",
                        f"{w['deficit']:+.3f}",
                    ]
                    for w in worst["worst"]
                ],
            ),
        ]
    return [*lines, ""]


def set_section(plan: dict[str, Any], arms: list[ArmData]) -> list[str]:
    """One channel set: data, runtimes, the val choice per arm, the test table, where we lose."""
    ints = intensity_rows(plan, arms)
    lines = [f"## {plan['name']}: channels {', '.join(plan['channels'])}", ""]
    prepare = plan.get("prepare") or {}
    lines += [
        f"Manifest `{plan['manifest']}`: {prepare.get('summary', 'n/a')}",
        "",
        "```",
        *(prepare.get("splits") or ["(inspect not run)"]),
        "```",
        "",
    ]
    header = ["stage", "arm", "time", "this run"]
    rows = [["prepare (data_prep + inspect)", "", minutes(prepare.get("seconds")), plan["status"].get("prepare", "")]]
    for arm in arms:
        for key, stage, record in (
            ("train", "train", arm.train),
            ("choose", "val choice", arm.choose),
            ("test", "test scoring", arm.test_record),
            ("worst", "worst slices", arm.worst_record),
        ):
            status = plan["status"].get(f"{arm.name}.{key}", "")
            if record is None and not status:
                continue
            rows.append([stage, arm.name, minutes((record or {}).get("seconds")), status])
    lines += ["Runtime per stage (`this run`: ran, reused from an earlier run, or skipped):", ""]
    lines += [*_table(header, rows), ""]
    lines += ["Arms (trainings):", ""]
    for arm in arms:
        overrides = ", ".join(f"`{o}`" for o in arm.plan["overrides"]) or "none"
        lines.append(f"- **{arm.name}**: {arm.plan['description']} Overrides: {overrides}.")
    lines += ["", "### Choice on val", ""]
    for arm in arms:
        if arm.plan.get("chooses"):
            lines += _val_section(arm)
    lines += ["### Test split, scored once with thresholds from val", ""]
    reports = [a.test_report for a in arms if a.test_report]
    if reports:
        r0 = reports[0]
        same = all(
            (r["voxels"], r["lesion_voxels"], r["subjects"]) == (r0["voxels"], r0["lesion_voxels"], r0["subjects"])
            for r in reports
        )
        lines += [
            f"{len(r0['subjects'])} test volume(s), {r0['voxels']} scored voxels, {r0['lesion_voxels']} lesion voxels, "
            f"{r0['pathological_slices']} diseased and {r0['healthy_slices']} lesion-free slices; every arm's "
            f"test run scored {'the same voxels' if same else 'DIFFERENT voxels (check the arms data settings)'}. "
            f"Threshold for Dice (val thr.) and @FPR: {r0['threshold_source']}. Post-processing of every map: "
            f"{r0.get('postprocess', 'none')}.",
            "",
        ]
    header = [
        "role",
        "arm",
        "method",
        "regime",
        "AUROC",
        "AUPRC",
        "Dice (slice Otsu)",
        "Dice (val thr.)",
        "Dice (best)",
        "Dice @FPR 1%",
        "Dice @FPR 5%",
        "slice AUROC (max)",
        "slice AUROC (mean)",
        "small-lesion AUPRC",
    ]
    rows = [row for arm in arms for row in _test_rows(arm)]
    lines += [*_table(header, rows), ""] if rows else ["Not scored on test yet.", ""]
    links = [
        f"[{a.name}/test/{f}]({a.plan['folder']}/test/{f})"
        for a in arms
        if a.test_report
        for f in ("results.md", "montage.png")
    ]
    if links:
        lines += [
            "Regimes: weak = slice labels only; unsupervised = images only; none = no training. Per-volume and "
            "by-size tables, curves and the best/median/worst montage of each run's first diffusion method: "
            + ", ".join(links)
            + ".",
            "",
        ]
    for arm in arms:
        if arm.plan.get("chooses"):
            lines += _losses(plan, arm, ints)
    return lines


def render(work: Path) -> str:
    """RESULTS.md for every channel set under WORK that has a plan.json."""
    meta = read_json(work / "benchmark.json") or {}
    sets = []
    for name in meta.get("channel_sets", []):
        plan = read_json(work / name / "plan.json")
        if plan is not None:
            sets.append((plan, [load_arm(work / name, a) for a in plan["arms"]]))
    lines = [
        "# BraTS benchmark (issue 17)",
        "",
        f"Last run {meta.get('finished', 'n/a')}; commit {meta.get('commit', 'n/a')}; {meta.get('cpu', '')}; "
        f"OMP_NUM_THREADS={meta.get('threads', 'n/a')}.",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Split file `{meta.get('splits', '')}` (sha256 {str(meta.get('splits_sha256', ''))[:12]}); config "
        f"`{meta.get('config', '')}`; overrides for every training: "
        f"{', '.join(f'`{o}`' for o in meta.get('overrides', [])) or 'none'}; post-processing of every map in "
        f"every evaluate run: {meta.get('postprocess', 'none')}. Patient-level splits: train "
        "trains, val chooses every setting (L, s, K, guidance, residual, filter, thresholds), test is scored once "
        "per reported configuration. All runs are in the MLflow store `mlruns.db` here.",
        "",
    ]
    if meta.get("max_volumes"):
        lines += [
            f"**Quick run: only the first {meta['max_volumes']} volume(s) of each split were scored.**",
            "",
        ]
    lines += summary_section(sets)
    for plan, arms in sets:
        lines += set_section(plan, arms)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    if not (args.work / "benchmark.json").is_file():
        raise SystemExit(f"error: {args.work}: no benchmark.json (not a benchmarks/brats.py work folder)")
    (args.work / "RESULTS.md").write_text(render(args.work))
    print(args.work / "RESULTS.md")


if __name__ == "__main__":
    main()

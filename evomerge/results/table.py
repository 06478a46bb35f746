"""The report as terminal text: the summary's tables, and the held-out scores.

Pure formatting of the dicts `summary.summarise` and `heldout.chosen_scores` return: nothing is
read or computed here beyond differences of the numbers shown. A missing number prints as `-`.
"""

from __future__ import annotations

from typing import Any

from evomerge.results.summary import finite


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cells(rows: list[dict[str, Any]], tasks: list[str], marks: dict[int, str]) -> list[list[str]]:
    """Header and one line of cells per row."""
    header = ["", "#", "baseline", "fidelity", "fitness", *tasks]
    return [header] + [
        [
            marks.get(r["number"], ""),
            str(r["number"]),
            r["baseline"] or "",
            r["fidelity"] or ("failed" if r["state"] == "FAIL" else r["state"].lower()),
            _num(r["fitness"]),
            *(_num(r["per_task"].get(task)) for task in tasks),
        ]
        for r in rows
    ]


def _aligned(tables: list[list[list[str]]]) -> list[list[str]]:
    """Each table as text lines, with the same column widths across all of them."""
    lines = [line for table in tables for line in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    left = {0, 2, 3}  # text columns; numbers align right
    return [
        [
            "  ".join(
                c.ljust(w) if i in left else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths))
            ).rstrip()
            for line in table
        ]
        for table in tables
    ]


def format_table(summary: dict[str, Any], *, title: str = "") -> str:
    """The terminal report of a summary with a best trial: top trials (the best marked `*`,
    Pareto-front trials `p`), baselines and the best trial's gap to them, counts, and what
    multi-fidelity saved."""
    tasks, counts = summary["tasks"], summary["counts"]
    marks = {n: "p" for n in summary["pareto_front"]}
    marks[summary["best"]["number"]] = "*"
    top_lines, baseline_lines = _aligned(
        [_cells(summary["top"], tasks, marks), _cells(summary["baselines"], tasks, marks)]
    )
    lines = [
        f"study {summary['study']!r}"
        + (f" in {title}" if title else "")
        + f": {counts['trials']} trials",
        "",
        f"top {len(summary['top'])} of {counts['complete']} complete trials by fitness"
        + (", full evaluations first" if counts["subset_only"] else ""),
        *top_lines,
        "* the trial `evomerge export` takes"
        + (
            " (best full evaluation)"
            if len(summary["directions"]) == 1
            else "; p on the Pareto front"
        ),
    ]
    if summary["baselines"]:
        lines += ["", "baselines", *baseline_lines, *_against_baselines(summary)]
    running = f", {counts['running']} running" if counts["running"] else ""
    done = f"{counts['complete']} complete, {counts['failed']} failed"
    lines += ["", f"{done}, {counts['full_evaluations']} full evaluations{running}"]
    lines += _saving(summary)
    return "\n".join(lines)


def _against_baselines(summary: dict[str, Any]) -> list[str]:
    """The best trial's fitness minus the best baseline's (no line without a scored one)."""
    best = summary["best"]
    scored = [b for b in summary["baselines"] if b["fitness"] is not None]
    if best["baseline"]:
        return [f"the best trial is the baseline {best['baseline']}; the search has not beaten it"]
    if not scored:
        return []
    rival = max(scored, key=lambda b: b["fitness"])
    gap = best["fitness"] - rival["fitness"]
    return [f"best trial vs best baseline ({rival['baseline']}): {gap:+.4f} fitness"]


def _saving(summary: dict[str, Any]) -> list[str]:
    """The multi-fidelity line (none when no trial recorded a fidelity)."""
    counts, saving = summary["counts"], summary["multi_fidelity"]
    if saving["subset_only_fraction"] is None:
        return []
    scored_n = counts["subset_only"] + counts["full_evaluations"]
    line = (
        f"multi-fidelity: {counts['subset_only']} of {scored_n} trials "
        f"({saving['subset_only_fraction']:.0%}) stopped before all of dev"
    )
    if saving["examples_scored"] is not None:
        spent, full = saving["examples_scored"], saving["examples_full_fidelity"]
        line += f"; {spent} of {full} examples scored ({full / max(spent, 1):.1f}x fewer)"
    else:
        line += " (no example counts recorded: saving unknown)"
    return [line]


# --- held-out scores ---------------------------------------------------------------------------
def _with_error(value: float | None, se: float | None) -> str:
    if finite(value) is None:
        return "-"
    return f"{value:.4f}" + (f" ± {se:.4f}" if finite(se) is not None else "")


def _label(trial: dict[str, Any]) -> str:
    if trial.get("refined_from") is not None:
        return f"#{trial['number']} (refined from #{trial['refined_from']})"
    return f"#{trial['number']}" + (f" (baseline {trial['baseline']})" if trial["baseline"] else "")


def format_held_out(scores: dict[str, Any]) -> str:
    """The chosen trials on all of dev and on test, ± bootstrap standard errors, and the
    paired difference of the best trial and the best baseline; or why there are none."""
    if "unavailable" in scores:
        return f"held-out scores: not computed: {scores['unavailable']}"
    tasks = list(scores["trials"][0]["dev"]["per_task"])
    rows = [["", "split", "fitness", *tasks]]
    for trial in scores["trials"]:
        for split in ("dev", "test"):
            part = trial[split]
            rows.append(
                [_label(trial) if split == "dev" else "", split, _num(part["value"])]
                + [_with_error(part["per_task"][t], part["se"].get(t)) for t in tasks]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["scores on every example (± bootstrap standard error), dev chose, test held out"]
    lines += [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in rows
    ]
    single = [t for t, held in scores["held_out"].items() if not held]
    if single:
        lines.append(
            f"no held-out split: {', '.join(single)} (one split; its test score is on the examples "
            "the search chose on)"
        )
    best, by_number = scores["trials"][0], {t["number"]: t for t in scores["trials"]}
    if scores.get("paired_start"):  # a refined trial: first against its black-box start
        start = by_number[best["refined_from"]]
        lines.append(
            _paired(best, f"#{start['number']} (its black-box start)", scores["paired_start"])
        )
    if scores.get("paired"):
        lines.append(_paired(best, _label(scores["trials"][-1]), scores["paired"]))
    return "\n".join(lines)


def _paired(best: dict[str, Any], rival: str, paired: dict[str, Any]) -> str:
    parts = [
        f"{split} {p['difference']:+.4f} ± {p['se']:.4f} "
        f"(no gain in {p['p_not_better']:.1%} of resamples)"
        for split, p in paired.items()
        if p is not None and None not in p.values()
    ]
    return f"{_label(best)} - {rival}, paired: " + "; ".join(parts)

"""Merging a partial run (``--only``) into the existing docs/benchmarks.md."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from tests.perf.report import (
    DOC,
    NOTES,
    baseline_figures,
    figure_lines,
    first_cell,
    measured_lines,
    previous_baseline,
    scenario_line,
    target_line,
    targets_met,
)
from tests.perf.targets import checks


def merge_report(
    table: dict[str, dict[str, Any]],
    titles: dict[str, str],
    started: datetime,
    elapsed: float,
    loads: tuple[float, float],
    quick: bool,
) -> None:
    """Put the scenarios of a partial run (``--only``) into the existing page: their rows of
    the Targets and All figures tables, their line in the scenario list and their recorded
    figures are replaced (or added at the end); everything else stays as it was."""
    lines = DOC.read_text().split("\n")

    def section(title: str) -> tuple[int, int]:
        start = lines.index(title)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        return start, end

    def merge_rows(title: str, rows: list[str]) -> None:
        """Replace the table rows of the run's scenarios (with their "↳" rows) in a section."""
        start, end = section(title)
        table_rows = [i for i in range(start, end) if lines[i].startswith("|")]
        first, last = table_rows[0], table_rows[-1]
        kept: list[str] = []
        owner = None
        place: int | None = None
        for line in lines[first : last + 1]:
            cell = first_cell(line)
            if cell:  # a row of a scenario; rows with an empty first cell belong to the one above
                owner = cell
            if cell is not None and owner in table and line.split("|")[1].strip() != "scenario":
                if place is None:
                    place = len(kept)
                continue
            kept.append(line)
        if place is None:
            place = len(kept)
        kept[place:place] = rows
        lines[first : last + 1] = kept

    merge_rows("## Targets", [target_line(c) for c in checks(table) if c.scenario in table])
    start, end = section("## Targets")
    for i in range(start, end):
        if re.match(r"\d+ of \d+ targets met", lines[i]):
            lines[i] = targets_met(lines[start:end])
    merge_rows("## All figures", figure_lines(table))
    start, end = section("## All figures")
    bullets = [i for i in range(start, end) if lines[i].startswith("- **")]
    kept_bullets = [lines[i] for i in bullets if lines[i][4:].split("**")[0] not in table]
    new = kept_bullets + [scenario_line(key, title) for key, title in titles.items()]
    lines[bullets[0] : bullets[-1] + 1] = new
    run = next(i for i, line in enumerate(lines) if line.startswith("Run: "))
    paragraph_end = lines.index("", run)
    keys = ", ".join(table)
    note = (
        f"Scenarios {keys} rerun alone on {started:%Y-%m-%d %H:%M} UTC ({elapsed / 60:.1f} "
        f"minutes, load average {loads[0]:.2f} before, {loads[1]:.2f} after"
        + ("; **--quick**, not a measurement" if quick else "")
        + "): their rows below are of that run."
    )
    targets = lines.index("## Targets")
    stale = [i for i in range(run, targets) if lines[i].startswith(f"Scenarios {keys} ")]
    if stale:
        lines[stale[0]] = note
    else:
        lines[paragraph_end:paragraph_end] = ["", note]
    start, end = section("## How it is measured")
    lines[start:end] = measured_lines()
    if NOTES.exists() and "## Analysis" in lines:
        start, end = section("## Analysis")
        lines[start:end] = [*NOTES.read_text().strip().split("\n"), ""]
    text = "\n".join(lines)
    baseline = previous_baseline()
    if baseline is not None:
        baseline.setdefault("figures", {}).update(baseline_figures(table))
        text = re.sub(
            r"```json\n\{.*?\}\n```",
            lambda _: "```json\n" + json.dumps(baseline, indent=1, sort_keys=True) + "\n```",
            text,
            count=1,
            flags=re.S,
        )
    DOC.write_text(text)

"""The HTML report: one self-contained file (CSS inline, plots as base64 PNG, no script, no
network) with the tables, the plots, each run's spec, seed, library versions and info, and the
sanity warnings of the attacks."""
from __future__ import annotations

import base64
import datetime
import html
import json
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bench.metrics import STRENGTH_PREFIX
from bench.reports.display import FLAG_NOTE, RANKING_PREFIX, RANKING_RULE, display_tables, table_notes
from bench.reports.labels import FLAG, NORM_NAMES, verdict
from bench.reports.plots import Plot, make_plots
from bench.reports.render import render, to_csv, write_json
from bench.reports.robustbench import render_robustbench

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1.2rem; font-size: 0.85rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
.ci { white-space: nowrap; }
.scroll { max-width: 100%; overflow-x: auto; }
.note { font-size: 0.85rem; color: #444; margin: -0.8rem 0 1.2rem; }
.plots { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0 1.5rem; }
.plots figure.wide { grid-column: 1 / -1; }
figure { margin: 1rem 0 2rem; } figure img { width: 100%; height: auto; box-sizing: border-box; border: 1px solid #eee; }
@media (max-width: 800px) { .plots { grid-template-columns: minmax(0, 1fr); } }
figcaption { font-size: 0.85rem; color: #444; }
.flag { background: #c00000; color: #fff; font-weight: bold; padding: 0 0.3rem; border-radius: 3px; white-space: nowrap; }
.alarm { background: #fde8e8; border-left: 4px solid #c00000; padding: 0.4rem 0.8rem; margin: 0.3rem 0; }
.warning { background: #fff4e5; border-left: 4px solid #e69500; padding: 0.4rem 0.8rem; margin: 0.3rem 0; }
.ok { color: #2b6e2b; } pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
details { margin: 0.4rem 0; } summary { cursor: pointer; font-weight: 600; }
.meta { color: #555; font-size: 0.9rem; }
@media print { details { display: block; } figure { break-inside: avoid; } }
"""


# An interval in a cell ("0.900 [0.555, 0.997]"): kept on one line, so a narrow column wraps
# between the value and its interval and the table fits the page.
INTERVAL = re.compile(r"\[[0-9.]+, [0-9.]+\]")
WIDE_FIGURE = 700  # CSS pixels: a figure at least this wide at its own size spans both plot columns


def _table(frame: pd.DataFrame, table_id: str) -> str:
    """A table inside a ``.scroll`` box: cells wrap (intervals stay whole) and what still does not
    fit scrolls inside the box instead of overflowing the page."""
    table = frame.to_html(index=False, escape=True, border=0, table_id=table_id, na_rep="–")
    table = INTERVAL.sub(lambda m: f'<span class="ci">{m.group(0)}</span>', table)
    return f'<div class="scroll">{_badged(table)}</div>'


def _notes(title: str, frame: pd.DataFrame) -> str:
    """``display.table_notes`` under a table: the flag note as an alarm, the others as one line each."""
    return "".join(f'<div class="alarm">{_badged(html.escape(note))}</div>' if note == FLAG_NOTE
                   else f'<p class="note">{html.escape(note)}</p>' for note in table_notes(title, frame))


def _tables(shown: dict[str, pd.DataFrame], runs: pd.DataFrame) -> str:
    return "".join(
        f'<h3>{html.escape(name)}</h3>{_table(frame, "table-" + name.lower().replace(" ", "-"))}'
        f"{_notes(name, frame)}{_strength_notes(name, runs)}"
        for name, frame in shown.items())


def _badged(text: str) -> str:
    """The flag of a flagged run (``bench.reports.labels.FLAG``) as a red badge."""
    return text.replace(FLAG, f'<span class="flag">{FLAG}</span>')


def _image(plot: Plot) -> str:
    png = plot.png.read_bytes()
    width = round(int.from_bytes(png[16:20], "big") * 96 / plot.dpi)  # the figure's size in CSS pixels
    data = base64.b64encode(png).decode("ascii")
    wide = ' class="wide"' if width >= WIDE_FIGURE else ""
    return (f'<figure id="plot-{plot.name}"{wide}><img src="data:image/png;base64,{data}" alt="{html.escape(plot.title)}" '
            f'width="{width}" '
            f'data-plot="{plot.name}"><figcaption>{html.escape(plot.caption)} Files: {html.escape(plot.png.name)}, '
            f'{html.escape(plot.svg.name)}.</figcaption></figure>')


def _json(value: Any) -> str:
    return html.escape(json.dumps(value, indent=2, sort_keys=True, default=str))


def _run_section(run: pd.Series) -> str:
    versions = pd.DataFrame(sorted(run["versions"].items()), columns=["library", "version"])
    warnings = "".join(f'<div class="warning">{html.escape(w)}</div>' for w in run["warnings"]) or '<p>no warnings</p>'
    return (
        f'<details class="run" id="run-{html.escape(run.run_id)}"><summary>{html.escape(run.dataset)} · '
        f'{_badged(html.escape(run.config))} · run {html.escape(run.run_id)}</summary>'
        f'<p class="meta">created {html.escape(str(run.created))} on {html.escape(str(run.host))}; seed {run.seed}; '
        f'spec hash {html.escape(run.spec_hash)}; store {html.escape(str(run.store))}</p>'
        f"<h3>Sanity warnings</h3>{warnings}"
        f"<h3>Library versions</h3>{_table(versions, 'versions-' + run.run_id)}"
        f"<h3>Spec</h3><pre>{_json(run['spec'])}</pre>"
        f"<h3>Info</h3><pre>{_json(run['info'])}</pre></details>"
    )


def _strength_notes(name: str, runs: pd.DataFrame) -> str:
    """The attack-strength warnings that concern one accuracy-under-attack table (its dataset and
    norm), shown right under it: a reader must not quote a weak attack's figure by mistake."""
    prefix = "Accuracy under attack: "
    if not name.startswith(prefix) or runs.empty:
        return ""
    dataset, _, shown_norm = name[len(prefix):].rpartition(", ")
    norms = [norm for norm, label in NORM_NAMES.items() if label == shown_norm] or [shown_norm]
    notes = [
        f'<div class="warning"><b>{_badged(html.escape(run.config))}</b>: {html.escape(w)}</div>'
        for _, run in runs[runs.dataset == dataset].iterrows() for w in run.warnings
        if any(w.startswith(f"{STRENGTH_PREFIX} ({norm})") for norm in norms)
    ]
    return "".join(notes)


def _verdicts(runs: pd.DataFrame) -> str:
    """The report's first section: flagged runs in red with every diagnostic that fired, then the
    runs whose diagnostics did not all run, then attack-strength notes; green only when every run
    was fully checked and none was flagged (``bench.diagnostics``)."""
    if runs.empty:
        return "<p>No runs.</p>"
    alarms, unchecked, notes = [], [], []
    for _, run in runs.iterrows():
        name = f"<b>{_badged(html.escape(run.dataset + ' · ' + run.config))}</b>"
        fired = [d["message"] for d in run["info"].get("diagnostics") or [] if d.get("fired")]
        alarms += [f'<div class="alarm">{name}: {html.escape(message)}</div>' for message in fired]
        if verdict(run["info"]) == "unchecked":
            unchecked.append(name)
        notes += [f'<div class="warning">{name}: {html.escape(w)}</div>' for w in run.warnings if w not in fired]
    parts = alarms
    if unchecked:
        parts.append(f'<div class="warning">Not every diagnostic ran for {", ".join(unchecked)} (no gradient '
                     "attack with its gradient-free and transfer audit in some norm, or a run stored before the "
                     "diagnostics existed): no verdict on gradient masking.</div>")
    parts += notes
    if not parts:
        return ('<p class="ok">Every run was fully checked (gradients, randomness, a full-budget gradient walk, '
                "gradient-free and transfer attacks against the gradient attacks) and no diagnostic fired.</p>")
    return "".join(parts)


def build_html(
    shown: dict[str, pd.DataFrame],
    plots: Sequence[Plot],
    runs: pd.DataFrame,
    title: str = "Robustness benchmark report",
    sources: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    preface: tuple[str, str] | None = None,
) -> str:
    """The report as one HTML string (``preface``: a first section, title and HTML, e.g. a
    reproduction's verdicts); ``shown`` are the tables of ``bench.reports.display.display_tables``:
    the rankings (titles starting with ``RANKING_PREFIX``) get their own section after the
    diagnostics, the other tables follow under *Tables*."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    selection = ", ".join(f"{k}={v}" for k, v in where) or "all runs (latest of each spec)"
    warning_items = _verdicts(runs)
    rankings = {name: frame for name, frame in shown.items() if name.startswith(RANKING_PREFIX)}
    ranking = (f'<p class="meta">{html.escape(RANKING_RULE)}</p>{_tables(rankings, runs)}' if rankings
               else "<p>No accuracy under attack to rank.</p>")
    tables = _tables({name: frame for name, frame in shown.items() if name not in rankings}, runs) or "<p>No runs.</p>"
    figures = "".join(_image(plot) for plot in plots) or "<p>No data to plot.</p>"
    run_list = "".join(_run_section(run) for _, run in runs.iterrows())
    first = (f'<h2 id="preface">{html.escape(preface[0])}</h2>\n{preface[1]}\n' if preface else "")
    first_link = (f'<a href="#preface">{html.escape(preface[0].split(":")[0])}</a> · ' if preface else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<nav class="meta">{first_link}<a href="#warnings">Diagnostics</a> · <a href="#ranking">Ranking</a> · <a href="#tables">Tables</a> · <a href="#plots">Plots</a> ·
<a href="#runs">Runs</a></nav>
<p class="meta">Generated {now} from {html.escape(', '.join(sources) or 'the results store')}; selection: {html.escape(selection)};
{len(runs)} run(s). Every number is computed from the stored per-sample records. Proportions show their 95%
Clopper-Pearson (exact binomial) interval in brackets; n is the number of samples behind each value.</p>
{first}<h2 id="warnings">Diagnostics: can these numbers be trusted?</h2>
{warning_items}
<h2 id="ranking">Ranking: who wins at each epsilon</h2>
{ranking}
<h2 id="tables">Tables</h2>
{tables}
<h2 id="plots">Plots</h2>
<div class="plots">{figures}</div>
<h2 id="runs">Runs: spec, seed, library versions</h2>
{run_list}
</body></html>
"""


def write_report(
    tables: dict[str, pd.DataFrame],
    runs: pd.DataFrame,
    out: Path,
    thresholds: Sequence[float] | None = None,
    precision_thresholds: Sequence[float] | None = None,
    sources: Sequence[str] = (),
    where: Sequence[tuple[str, str]] = (),
    title: str = "Robustness benchmark report",
    dpi: int = 150,
    preface: tuple[str, str] | None = None,
) -> list[Path]:
    """Write the whole report into ``out``: ``report.html`` (self-contained), ``tables.md``,
    ``tables.tex``, ``tables.json``, one tidy CSV per table (``clean.csv``,
    ``accuracy_under_attack.csv``, ``certified.csv``, ``cost.csv``), ``robustbench.json`` (model
    cards) and ``figures/NAME.png|svg``;
    returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(tables, out / "figures", dpi)
    shown = display_tables(tables, thresholds, precision_thresholds)
    written = []
    for name, fmt in (("tables.md", "md"), ("tables.tex", "latex")):
        path = out / name
        path.write_text(render(tables, fmt, thresholds, precision_thresholds), encoding="utf-8")
        written.append(path)
    with open(out / "tables.json", "w", encoding="utf-8") as handle:
        write_json(tables, handle)
    written.append(out / "tables.json")
    for name, table in tables.items():
        if not table.empty:
            path = out / f"{name}.csv"
            path.write_text(to_csv(table), encoding="utf-8")
            written.append(path)
    if not runs.empty:
        path = out / "robustbench.json"
        path.write_text(render_robustbench(tables, runs) + "\n", encoding="utf-8")
        written.append(path)
    report = out / "report.html"
    report.write_text(build_html(shown, plots, runs, title, sources, where, preface), encoding="utf-8")
    return [report] + written + [p for plot in plots for p in (plot.png, plot.svg)]

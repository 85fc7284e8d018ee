"""Tables as text: the JSON contract, tidy CSV, Markdown and LaTeX."""
from __future__ import annotations

import io
import json
from typing import Any, Sequence, TextIO

import pandas as pd

from bench.errors import BenchError
from bench.reports.display import RANKING_PREFIX, RANKING_RULE, display_tables, table_notes
from bench.reports.labels import FLAG

TEXT_FORMATS = ("md", "latex", "csv", "json")


def rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    return json.loads(table.to_json(orient="records")) if not table.empty else []


JSON_CHUNK = 5000  # rows held as Python objects at a time while writing JSON


def write_json(tables: dict[str, pd.DataFrame], out: TextIO) -> None:
    """The JSON contract into ``out``, the text of ``json.dumps({name: rows(table)}, indent=2)``,
    written JSON_CHUNK rows at a time: for a thousand runs the document is hundreds of MB, and its
    rows as Python objects took gigabytes."""
    out.write("{")
    for position, (name, table) in enumerate(tables.items()):
        out.write(f"{',' if position else ''}\n  {json.dumps(name)}: ")
        if table.empty:
            out.write("[]")
            continue
        out.write("[")
        for start in range(0, len(table), JSON_CHUNK):
            chunk = rows(table.iloc[start:start + JSON_CHUNK])
            # json.dumps' layout at this depth: each row 4 spaces in, its fields 6
            out.write(("," if start else "") + ",".join("\n    " + json.dumps(row, indent=2).replace("\n", "\n    ")
                                                       for row in chunk))
        out.write("\n  ]")
    out.write("\n}" if tables else "}")


def latex_escape(text: Any) -> str:
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "ε": r"$\epsilon$", "–": "--", "∞": r"$\infty$", "⚠": r"\textbf{(!)}"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    header = " & ".join(latex_escape(c) for c in table.columns) + r" \\"
    body = "\n".join(" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False))
    return "\n".join([
        r"\begin{table}[ht]", r"\centering", r"\small", rf"\caption{{{latex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{'l' * len(table.columns)}}}", r"\toprule", header, r"\midrule", body,
        r"\bottomrule", r"\end{tabular}", r"\end{table}", "",
    ])


def render(
    tables: dict[str, pd.DataFrame],
    fmt: str,
    thresholds: Sequence[float] | None = None,
    precision_thresholds: Sequence[float] | None = None,
) -> str:
    """``json`` (the contract of ``bench.reports.tables``), ``md`` or ``latex`` (the tables of
    :func:`display_tables`); CSV is one file per table, see :func:`to_csv`."""
    if fmt == "json":
        text = io.StringIO()
        write_json(tables, text)
        return text.getvalue()
    if fmt == "csv":
        raise BenchError("csv is one file per table: use to_csv(table) for one table, or "
                         "'bench report --format csv --table NAME', or --out DIR for all of them")
    shown = display_tables(tables, thresholds, precision_thresholds)
    if not shown:
        return "no runs in this store yet\n"
    note = "Values: proportion [95% Clopper-Pearson interval]; n: samples per value."
    if fmt == "latex":
        return f"% {note}\n" + "\n".join(to_latex(table, title) for title, table in shown.items())
    if fmt == "md":
        return f"{note}\n\n" + "\n".join(markdown_sections(shown)) + "\n" + diagnostics_text(tables.get("diagnostics"))
    raise ValueError(f"unknown table format {fmt!r}")


def markdown_sections(shown: dict[str, pd.DataFrame]) -> list[str]:
    """One ``## title`` section per shown table with its notes (``table_notes``) under it; the
    ranking rule (``RANKING_RULE``) once, above the first ranking."""
    sections, rule_given = [], False
    for title, table in shown.items():
        rule = ""
        if title.startswith(RANKING_PREFIX) and not rule_given:
            rule, rule_given = f"{RANKING_RULE}\n\n", True
        notes = "".join(f"\nNote: {text}\n" for text in table_notes(title, table))
        sections.append(f"## {title}\n\n{rule}{table.to_markdown(index=False)}\n{notes}")
    return sections



def diagnostics_text(table: pd.DataFrame | None) -> str:
    """What the diagnostics say, for the end of every text output: each flagged run with every
    diagnostic that fired, the runs not fully checked, or that every run passed them all."""
    if table is None or table.empty:
        return ""
    lines = []
    for row in table.itertuples(index=False):
        name = f"{row.dataset} · {row.config}"
        if row.verdict == "flagged":
            lines.append(f"- {name if FLAG in name else f'{name} {FLAG}'}:")
        lines += [f"  - {message}" if row.verdict == "flagged" else f"- {name}: {message}" for message in row.messages]
    unchecked = [f"{row.dataset} · {row.config}" for row in table.itertuples(index=False) if row.verdict == "unchecked"]
    if unchecked:
        lines.append(f"- not every diagnostic ran for {', '.join(unchecked)} (a norm without a gradient attack and "
                     "its gradient-free and transfer audit, or a run stored before the diagnostics): no verdict "
                     "on gradient masking")
    if not lines:
        lines.append("- every run was fully checked (gradients, randomness, a full-budget gradient walk, gradient-free "
                     "and transfer attacks against the gradient attacks) and no diagnostic fired")
    return "## Diagnostics\n\n" + "\n".join(lines) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    """One table as a tidy CSV that ``pandas.read_csv`` reads back: one header line, one row per
    observation, ``params`` and lists (the diagnostics' ``messages``) as JSON text, missing values empty."""
    for column in ("params", "messages"):
        if column in table:
            table = table.assign(**{column: table[column].map(
                lambda v: v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False))})
    return table.to_csv(index=False)

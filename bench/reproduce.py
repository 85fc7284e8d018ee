"""Reproductions: a paper's experiments and its claims in one file (``bench/reproductions/NAME.toml``),
re-run by ``bench reproduce NAME`` and judged from the stored records (``bench.reports.claims``).

A reproduction file has three parts: ``[reproduction]`` (title, paper, the kind of dataset it
runs on), ``[experiment]`` (the same keys as ``bench run --config``, with ``cpu`` and ``paper``
profiles) and ``[[claims]]`` (the paper's statements as checks over the result tables).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import BenchError
from bench.reports.claims import VERDICT_COLUMNS, VERDICTS, claims_from, judge
from bench.spec import load_config

REPRODUCTIONS = Path(__file__).parent / "reproductions"
# Thresholds T of the verdicts and plots: fine enough to see where certified-accuracy curves cross.
CLAIM_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.0, 1.5001, 0.01), 2))
# The figures a docs page embeds (the report has them all): the paper's Figs. 2 and 3-4, kept
# small because generated pages are committed.
DOC_FIGURES = ("certified_accuracy", "accuracy_under_attack")


@dataclass
class Reproduction:
    name: str
    path: Path
    title: str
    paper: str
    channels: int | None
    classes: int | None
    claims: list[Any]
    uses_overhead: bool
    about: dict[str, Any]

    def overhead_settings(self, profile: str) -> dict[str, Any]:
        """``rounds``, ``steps`` and ``model`` of the Q4 timings: ``overhead_PROFILE``, else ``overhead``."""
        chosen = self.about.get(f"overhead_{profile}", self.about.get("overhead", {}))
        settings: dict[str, Any] = {key: int(chosen[key]) for key in ("rounds", "steps") if key in chosen}
        if "model" in chosen:
            settings["model"] = str(chosen["model"])
        return settings


def names() -> list[str]:
    """The reproductions that ship with the package."""
    return sorted(path.stem for path in REPRODUCTIONS.glob("*.toml"))


def load(name: str) -> Reproduction:
    """The reproduction ``name``, its claims checked (a one-line error for anything malformed)."""
    if name not in names():
        raise BenchError(f"no reproduction {name!r}; available: {', '.join(names())} (bench reproduce --list)")
    path = REPRODUCTIONS / f"{name}.toml"
    config = load_config(path)
    for key in ("reproduction", "experiment", "claims"):
        if key not in config:
            raise BenchError(f"reproduction {path}: missing [{key}]")
    about = config["reproduction"]
    claims = claims_from(config["claims"], f"reproduction {name}, claim")
    return Reproduction(name, path, about.get("title", name), about.get("paper", ""), about.get("channels"),
                        about.get("classes"), claims,
                        any(check.metric == "ratio" for claim in claims for check in claim.checks), about)


def check_dataset_kind(reproduction: Reproduction, dataset: Any) -> None:
    """``--dataset`` must be of the kind the reproduction is made for (channels, classes)."""
    wanted = (reproduction.channels or dataset.shape[0], reproduction.classes or dataset.num_classes)
    if (dataset.shape[0], dataset.num_classes) != wanted:
        raise BenchError(f"reproduction {reproduction.name} runs on images with {wanted[0]} channel(s) and "
                         f"{wanted[1]} classes; dataset {dataset.name} has {dataset.shape[0]} and {dataset.num_classes}")


# -- provenance ------------------------------------------------------------------------------------
def commit() -> str:
    """The git commit of the code that ran (``+dirty`` when it had uncommitted changes), else unknown."""
    here = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_class() -> str:
    from bench.perf import machine

    return machine().split(", load average")[0]


class Journal:
    """``reproduction.json`` in the output folder: every invocation's wall time, commit and
    machine, written atomically, so a resumed reproduction reports the time of all its sessions."""

    def __init__(self, out: Path):
        self.path = out / "reproduction.json"
        self.sessions: list[dict[str, Any]] = []
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self.sessions = [s for s in loaded.get("sessions", []) if isinstance(s, dict)]
            except (OSError, ValueError):
                self.sessions = []
        self.start = time.time()

    def save(self, **fields: Any) -> None:
        """Add this session (its wall time so far, commit, machine and ``fields``) and write the file."""
        self.sessions.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.start)),
                              "wall_seconds": round(time.time() - self.start, 1), "commit": commit(),
                              "machine": machine_class(), **fields})
        write_atomically(self.path, json.dumps({"sessions": self.sessions}, indent=2))


def write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` by a rename from a unique temporary file beside it: a reader, or a
    second process writing the same file, never sees half of it."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with open(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- the overhead measurement ---------------------------------------------------------------------
def overhead_table(out: Path, dataset: Any, **settings: Any) -> pd.DataFrame:
    """The Q4 timings (``bench.overhead``), measured once per output folder and kept in
    ``overhead.csv`` (a resumed reproduction does not measure again)."""
    from bench.overhead import OVERHEAD_COLUMNS, measure_overhead

    path = out / "overhead.csv"
    if path.is_file():
        try:
            table = pd.read_csv(path)
            if list(table.columns) == OVERHEAD_COLUMNS:
                return table
        except (OSError, ValueError, pd.errors.ParserError):
            pass
    table = measure_overhead(dataset, **settings)
    write_atomically(path, table.to_csv(index=False))
    return table


# -- judging and writing ----------------------------------------------------------------------------
def step_times(store: Any, run_ids: list[str]) -> pd.DataFrame:
    """Process seconds per step kind over the reproduction's runs (training, clean evaluation,
    each attack), from the store's ``work`` rows."""
    parts = [store.work(run_id) for run_id in run_ids]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["step", "seconds"])
    work = pd.concat(parts)
    work = work.assign(step=work.step.where(~work.step.isin(["train", "load"]), "training"))
    table = work.groupby("step", sort=False).seconds.sum().reset_index().sort_values("seconds", ascending=False)
    total = pd.DataFrame([{"step": "total", "seconds": float(table.seconds.sum())}])
    return pd.concat([table, total], ignore_index=True)


def verdict_markdown(verdicts: pd.DataFrame) -> str:
    shown = verdicts.assign(ours=verdicts.ours.str.replace("\n", "<br>", regex=False),
                            verdict=verdicts.verdict.str.upper())
    return shown[VERDICT_COLUMNS].to_markdown(index=False)


def verdict_text(verdicts: pd.DataFrame) -> str:
    """The verdict table for a terminal: one block per claim."""
    blocks = []
    for row in verdicts.itertuples():
        ours = "\n".join(f"    ours:  {line}" for line in row.ours.split("\n"))
        blocks.append(f"{row.verdict.upper():13s} {row.id} ({row.figure}): {row.claim}\n"
                      f"    paper: {row.paper}\n{ours}")
    counts = verdicts.verdict.value_counts()
    summary = ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
    return "\n\n".join(blocks) + f"\n\nclaims: {summary}"


def verdict_html(verdicts: pd.DataFrame) -> str:
    import html

    colour = {"holds": "#2b6e2b", "contradicted": "#c00000", "inconclusive": "#b07000"}
    rows = "".join(
        f"<tr><td>{html.escape(r.id)}</td><td><a href=\"#plots\">{html.escape(r.figure)}</a></td>"
        f"<td>{html.escape(r.claim)}</td><td>{html.escape(r.paper)}</td>"
        f"<td>{'<br>'.join(html.escape(line) for line in r.ours.split(chr(10)))}</td>"
        f"<td style=\"color:{colour[r.verdict]};font-weight:bold\">{r.verdict}</td></tr>"
        for r in verdicts.itertuples())
    return ("<p class=\"meta\">Each claim is judged from the stored records by 95% intervals: <b>holds</b> when the "
            "intervals separate in the claimed direction at every point it names, <b>contradicted</b> when they "
            "separate the other way, <b>inconclusive</b> when they overlap (bench.reports.claims).</p>"
            "<div class=\"scroll\"><table id=\"verdicts\"><thead><tr><th>claim</th><th>figure</th><th>statement</th>"
            "<th>paper</th><th>ours (95% interval)</th><th>verdict</th></tr></thead><tbody>"
            f"{rows}</tbody></table></div>")


def docs_page(reproduction: Reproduction, verdicts: pd.DataFrame, tables_md: str, times: pd.DataFrame,
              command: str, journal: Journal, figures: list[str]) -> str:
    """The generated docs page: verdicts, the exact command, commit, machine, time per step, tables, figures."""
    sessions = journal.sessions
    wall = sum(float(s.get("wall_seconds", 0)) for s in sessions)
    session_lines = "\n".join(f"| {s.get('started')} | {s.get('commit')} | {s.get('status', 'complete')} | "
                              f"{float(s.get('wall_seconds', 0)) / 60:.1f} |" for s in sessions)
    step_lines = "\n".join(f"| {r.step} | {r.seconds / 60:.1f} |" for r in times.itertuples())
    images = "\n\n".join(f"![{Path(f).stem}]({f})" for f in figures)
    notes = reproduction.about.get("notes", "").strip()
    notes = f"\n## The settings, against the paper's\n\n{notes}\n" if notes else ""
    return f"""# {reproduction.title}

Generated by `bench reproduce` from the stored records; do not edit by hand. Rerun to regenerate:

```
{command}
```

Paper: {reproduction.paper}.
Commit: {sessions[-1].get('commit') if sessions else commit()}. Machine: {sessions[-1].get('machine') if sessions else machine_class()}.

## Verdicts

{verdict_markdown(verdicts)}
{notes}
## Wall time

{wall / 60:.1f} minutes of wall time over {len(sessions)} session(s):

| started (UTC) | commit | status | minutes |
|---|---|---|---|
{session_lines}

Process time per step (summed over the worker processes; with `--jobs 2` the wall time is about half):

| step | minutes |
|---|---|
{step_lines}

## Tables

{tables_md}

## Figures

{images}
"""


def write_outputs(reproduction: Reproduction, store: Any, out: Path, overhead: pd.DataFrame | None,
                  command: str, journal: Journal, docs: Path | None, run_ids: list[str]) -> tuple[pd.DataFrame, list[Path]]:
    """Judge the claims on the reproduction's runs and write the report (verdicts first) and,
    with ``docs``, the generated docs page; returns the verdicts and the written paths."""
    from bench.reports.html import write_report
    from bench.reports.load import load_results
    from bench.reports.render import render
    from bench.reports.tables import tables_from

    results = load_results(store)
    results.runs = results.runs[results.runs.run_id.isin(run_ids)]  # tables_from reads these runs' records only
    tables = tables_from(results, CLAIM_THRESHOLDS)
    judged = dict(tables)
    if overhead is not None:
        judged["overhead"] = overhead
    verdicts = judge(reproduction.claims, judged, results.runs)
    report_dir = out / "report"
    written = write_report(tables, results.runs, report_dir, title=reproduction.title, sources=[str(store.directory)],
                           preface=("Verdicts: the paper's claims", verdict_html(verdicts)))
    if overhead is not None:
        path = report_dir / "overhead.csv"
        overhead.to_csv(path, index=False)
        written.append(path)
    times = step_times(store, run_ids)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        figure_dir = docs / f"{reproduction.name}-figures"
        if figure_dir.exists():
            shutil.rmtree(figure_dir)
        figure_dir.mkdir()
        figures = []
        for png in sorted((report_dir / "figures").glob("*.png")):
            if png.stem not in DOC_FIGURES:
                continue
            shutil.copy2(png, figure_dir / png.name)
            figures.append(f"{figure_dir.name}/{png.name}")
        tables_md = render(tables, "md")
        if overhead is not None:
            tables_md += "\n## Overhead (Q4): ratios on this machine\n\n" + overhead.to_markdown(index=False) + "\n"
        page = docs / f"{reproduction.name}.md"
        page.write_text(docs_page(reproduction, verdicts, tables_md, times, command, journal, figures), encoding="utf-8")
        written.append(page)
    return verdicts, written


# -- what will run, and what it costs: the cost model ------------------------------------------------
def gradient_passes(attack: Any, epsilons: int, draws: int) -> float:
    """Forward-and-backward passes per attacked image for one attack over ``epsilons`` budgets,
    when no point breaks early (the epsilon sweep and the cascades only ever do less)."""
    from bench.attacks.autoattack import AutoAttack

    p = attack.params
    draws = min(draws, attack.max_eot_draws or draws)
    if isinstance(attack, AutoAttack):
        per_stage = {"apgd-ce": p.steps, "apgd-dlr": p.steps, "pgd-margin": p.steps, "apgd-t": p.steps * p.target_classes,
                     "fab-t": 2 * p.steps * p.target_classes, "square": p.square_queries / 3}
        randomized = draws > 1
        return epsilons * draws * sum(per_stage[name] for name in p.components(randomized))
    if attack.minimization:  # one run gives the whole curve
        return draws * getattr(p, "binary_search_steps", 1) * getattr(p, "steps", 100)
    if hasattr(p, "queries"):  # score-based: forward passes only, about a third of a gradient pass
        return epsilons * draws * p.queries / 3
    return epsilons * draws * getattr(p, "steps", 20) * getattr(p, "restarts", 1)


def rule_calls(attack: Any, epsilons: int, randomized: bool) -> tuple[float, float]:
    """Per attacked image: calls of the defense's prediction rule that judge (the sweep's clean
    verdict, per budget the verdicts of the attack's candidates and, on a randomized defense, the
    verdict-flip check), and evaluations with the certificate (the record of each budget)."""
    from bench.attacks.autoattack import AutoAttack

    p = attack.params
    if isinstance(attack, AutoAttack):
        stages = p.components(randomized)
        candidates = len(stages) + (sum(name.startswith("apgd") for name in stages) if randomized else 0)
    elif attack.minimization:  # judged once for the whole curve, not per budget
        candidates = (1 + len(attack.OUTWARD_SCALES) if randomized else 1) / max(1, epsilons)
    else:
        candidates = getattr(p, "restarts", 1)
    return 1 + epsilons * (candidates + (1 if randomized else 0)), float(epsilons)


def swept_share(epsilons: int) -> float:
    """The expected share of an attack's bound that the epsilon sweep does: budget k attacks only
    the points budgets below it left robust. Before the run nothing says how robust the model
    is; the prior is a robust share falling evenly over the grid, from all points at its first
    budget to none past its last (what a grid chosen to span the accuracy curve gives):
    (K + 1) / 2K of the points over K budgets."""
    return (epsilons + 1) / (2 * epsilons)


def gradient_seconds(model: Any, shape: tuple[int, ...], batch: int = 64, repeats: int = 3) -> float:
    """Seconds per image of a forward-and-backward pass (input gradient) of ``model`` on this
    machine, in batches of ``batch`` (the fastest of ``repeats``), with its weights frozen as
    attacks run it."""
    import torch

    from bench.attacks.base import frozen_parameters

    x = torch.rand(batch, *shape)
    model.eval()
    seconds = []
    with frozen_parameters(model):
        model(x.clone().requires_grad_(True)).sum().backward()  # the first call allocates: not timed
        for _ in range(repeats):
            inputs = x.clone().requires_grad_(True)
            start = time.perf_counter()
            model(inputs).sum().backward()
            seconds.append(time.perf_counter() - start)
    return min(seconds) / batch


@dataclass
class Units:
    """One run's unit costs on this machine: seconds per image of a gradient pass through what
    the attacks see (one noise draw), of the defense's prediction rule, and of its evaluation
    (prediction and certificate); seconds per training step of 64 images."""

    gradient: float
    predict: float
    evaluate: float
    train_step: float


def measure_units(spec: Any, dataset: Any, defense: Any) -> Units:
    """The units of ``spec``'s run, on ``defense`` as ``build_defense`` made it (untrained
    weights: the costs do not depend on them, except RobustOpt's exact certificates, through its
    unstable ReLUs)."""
    from bench.overhead import step_seconds
    from bench.training import TrainConfig

    defense.fit(dataset.x_train[:64], dataset.y_train[:64], TrainConfig(epochs=1, batch_size=64))  # builds it
    gradient = gradient_seconds(defense.attack_model(), tuple(dataset.shape))
    x = dataset.x_test[:16]
    seconds = {}
    for name in ("predict", "evaluate"):
        call = getattr(defense, name)
        call(x[:4])  # the first call allocates: not timed
        start = time.perf_counter()
        call(x)
        seconds[name] = (time.perf_counter() - start) / len(x)
    train_step = step_seconds(spec.defense, dataset, steps=2, params=dict(spec.params), batch_size=64, seed=spec.seed,
                              model=spec.model)
    return Units(gradient, seconds["predict"], seconds["evaluate"], train_step)


COST_COLUMNS = ["run", "step", "count", "CPU s", "expected CPU s"]


def cost_model(specs: list[Any], datasets: dict[Any, Any]) -> pd.DataFrame:
    """Per run and step of the grid (``COST_COLUMNS``): unit costs measured here times counts.
    ``CPU s`` is a bound, as if no point broke before the largest budget (the sweep and the
    cascades only do less); ``expected CPU s`` takes the sweep's prior share (``swept_share``)
    of the fixed-budget attacks. A training shared by several runs (one checkpoint) counts once.
    Units are measured on untrained weights: RobustOpt's exact certificates cost more on them
    (more unstable ReLUs) than on a trained model."""
    import math

    from bench.evaluation import describe
    from bench.diagnostics import PROBE_SIZE, PROBE_STEPS
    from bench.runner import build_defense, spec_steps
    from bench.training import training_defaults

    rows, trained, measured = [], set(), {}
    for spec in specs:
        dataset = datasets[(spec.dataset, spec.image_size)]
        defense, model_name = build_defense(spec, dataset, "cpu")
        run = describe(defense, spec.defense, model_name)[0]
        if spec.training_hash() not in measured:  # runs of one trained model have the same units
            measured[spec.training_hash()] = measure_units(spec, dataset, defense)
        units = measured[spec.training_hash()]
        defaults = training_defaults(spec.defense, spec.dataset)
        epochs = spec.epochs or defaults["epochs"]
        n_train = min(spec.train_size or len(dataset.y_train), len(dataset.y_train))
        n_test = min(spec.test_size or defaults["test_size"] or len(dataset.y_test), len(dataset.y_test))
        randomized = defense.randomized
        draws = spec.eot_draws if randomized else 1

        def add(step: str, count: str, seconds: float, share: float = 1.0) -> None:
            rows.append({"run": run, "step": step, "count": count, "CPU s": seconds, "expected CPU s": seconds * share})

        if spec.training_hash() not in trained:
            trained.add(spec.training_hash())
            steps = math.ceil(n_train / 64) * epochs
            add("train", f"{steps} steps x {units.train_step:.3f} s", steps * units.train_step)
        probe = min(n_test, PROBE_SIZE)
        passes = n_test * draws + probe * PROBE_STEPS * draws
        verdicts = probe + (n_test if randomized else 0)
        add("clean", f"{passes:.0f} passes x {units.gradient * 1e3:.3f} ms + {verdicts} verdicts x "
                     f"{units.predict * 1e3:.3f} ms + {n_test} evaluations x {units.evaluate * 1e3:.3f} ms",
            passes * units.gradient + verdicts * units.predict + n_test * units.evaluate)
        for step in spec_steps(spec):
            budgets = len(step.epsilons)
            seen = 1 if step.attack.target == "surrogate" else draws
            passes = n_test * gradient_passes(step.attack, budgets, seen)
            verdicts, evaluations = (n_test * calls for calls in rule_calls(step.attack, budgets, randomized))
            add(step.name, f"{passes:.0f} passes x {units.gradient * 1e3:.3f} ms + {verdicts:.0f} verdicts x "
                           f"{units.predict * 1e3:.3f} ms + {evaluations:.0f} evaluations x {units.evaluate * 1e3:.3f} ms",
                passes * units.gradient + verdicts * units.predict + evaluations * units.evaluate,
                1.0 if step.attack.minimization else swept_share(budgets))
    return pd.DataFrame(rows, columns=COST_COLUMNS)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def plan_text(costs: pd.DataFrame, jobs: int) -> str:
    """Per run: CPU of training and of evaluation; the totals and the wall time on ``jobs`` workers."""
    by_run = costs.assign(part=costs.step.where(costs.step == "train", "evaluation")).pivot_table(
        index="run", columns="part", values=["CPU s", "expected CPU s"], aggfunc="sum", sort=False, fill_value=0.0)
    table = pd.DataFrame({"training": by_run[("CPU s", "train")].map(_duration),
                          "evaluation (bound)": by_run[("CPU s", "evaluation")].map(_duration),
                          "evaluation (expected)": by_run[("expected CPU s", "evaluation")].map(_duration)})
    bound, expected = float(costs["CPU s"].sum()), float(costs["expected CPU s"].sum())
    return (table.to_string() + "\n"
            f"expected {_duration(expected)} of CPU, about {_duration(expected / max(1, jobs))} of wall time on {jobs} "
            f"worker(s); at most {_duration(bound)} of CPU ({_duration(bound / max(1, jobs))} of wall time) if no point "
            "broke before the largest budget; stored steps are not redone (bench perf --reproduction NAME: the cost of "
            "each step)")

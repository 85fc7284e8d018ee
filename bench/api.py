"""The public API: evaluate any model or defense, train one, read stored results.

``bench.evaluate(model, "digits", ["pgd-linf"])`` is the whole evaluation; the CLI (``bench eval``,
``bench report``) is a thin shell over the functions here. What they use lives below:
the checks of the data and the model (``bench.inputs``), the evaluation loop that produces every
record (``bench.evaluation``), a run's life in a store (``bench.lifecycle``), provenance
(``bench.provenance``), so that ``bench run``'s grid (``bench.jobs``) writes the same records and
summaries as this module.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from bench.attacks import Attack
from bench.checkpoint import load_into
from bench.datasets.base import Dataset, load_dataset  # noqa: F401 (bench.load_dataset is public)
from bench.defenses.base import Defense
from bench.errors import BenchError, one_line
from bench.evaluation import Log, attack_steps, describe, evaluate_steps, plan_line, quiet as _quiet, surrogate_for
from bench.lifecycle import RunFacts, RunRecorder
from bench.metrics import THRESHOLD_GRID, Records
from bench.inputs import Data, check_logits, evaluation_data, train_data
from bench.provenance import fingerprint
from bench.registry import DEFENSES, build_params, defense_name
from bench.reports.labels import configuration_labels
from bench.reports.load import Selection, load_results as load_selection, result_stores, with_run_keys
from bench.reports.render import render
from bench.reports.tables import tables_from
from bench.spec import Epsilons, RunSpec, parse_assignments, with_audit
from bench.store import RUN_FIELDS, Run, Store
from bench.training import TrainConfig, fit_and_check, training_defaults
from bench.threads import using_threads
from bench.types import Record
from bench.validation import check_epsilon_bounds, check_writable_dir, validate_options



# -- defenses around any model ---------------------------------------------------------------------
def wrap(defense: str, model: nn.Module, *, device: str = "cpu", **params: Any) -> Defense:
    """The named defense around an outside ``model`` (any ``nn.Module`` mapping [0,1] images to
    logits), with its parameters as keywords: ``bench.wrap("smoothing", model, sigma=0.25)``.

    The model counts as trained (``defense.pretrained``): :func:`train` then trains only what the
    method adds (PixelDP's auto-encoder in front of the frozen classifier) or, for defenses that
    are training methods (``madry``, ``robustopt``, ``pixeldp`` with ``noise_at="input"``), the
    model itself. A defense that needs the zoo's structure says so in one line; see
    :meth:`Defense.check_model`.
    """
    defense_class = DEFENSES.get(defense)
    if not isinstance(model, nn.Module):
        raise BenchError(f"wrap({defense!r}, model): model must be a torch nn.Module (images in [0,1] -> logits), "
                         f"got {type(model).__name__}")
    values = build_params(defense_class.Params, params, f"defense {defense}")
    return defense_class.wrap(model, values, device=device)


def as_defense(model_or_defense: Any, device: str = "cpu") -> Defense:
    """A ``Defense`` as it is; any other ``nn.Module`` as the undefended model (``baseline``)."""
    if isinstance(model_or_defense, Defense):
        return model_or_defense
    if isinstance(model_or_defense, nn.Module):
        return wrap("baseline", model_or_defense, device=device)
    raise BenchError(
        f"expected an nn.Module (images in [0,1] -> logits) or a Defense, got {type(model_or_defense).__name__}"
    )


def model_name(defense: Defense) -> str:
    """The zoo name a runner recorded, else ``SPEC@fingerprint`` for an outside model
    (``SPEC`` is ``MODULE:CALLABLE`` for :func:`load_model`'s models, else the class name)."""
    recorded = getattr(defense, "model_name", None)
    if recorded:
        return recorded
    source = getattr(defense.model, "model_spec", None) or type(defense.model).__name__
    # The whole defense state: a PixelDP auto-encoder trained in front of the model counts too.
    return f"{source}@{fingerprint(defense.state_dict())}"


def load_model(spec: str, checkpoint: Path | str | None = None) -> nn.Module:
    """An outside model from ``MODULE:CALLABLE`` (importable; the current folder counts) or
    ``path/to/file.py:CALLABLE``: the callable is called without arguments (a module-level
    ``nn.Module`` instance is taken as it is). ``checkpoint`` is a state dict (also inside a
    ``{"model": ...}`` or ``{"state_dict": ...}`` dict) loaded with ``weights_only=True``, so
    nothing in the file can run code. The model's own code is the user's, and runs."""

    if not isinstance(spec, str):
        raise BenchError(f"load_model: expected a string 'MODULE:CALLABLE' or 'path/to/file.py:CALLABLE', "
                         f"got {type(spec).__name__} {spec!r}")
    target, sep, attribute = spec.rpartition(":")
    if not sep or not target or not attribute.isidentifier():
        raise BenchError(f"--model {spec!r}: expected MODULE:CALLABLE or path/to/file.py:CALLABLE, e.g. my_models:small_cnn")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise BenchError(f"--model {spec}: file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"bench_outside_model_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(path.resolve().parent))  # the file may import its neighbours
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as error:
            raise BenchError(f"--model {spec}: running {path} failed: {_one_line(error)}") from None
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m`: a module in the current folder is found
        try:
            module = importlib.import_module(target)
        except (Exception, SystemExit) as error:
            raise BenchError(f"--model {spec}: cannot import {target} ({_one_line(error)})") from None
    factory = getattr(module, attribute, None)
    if factory is None:
        raise BenchError(f"--model {spec}: {target} has no attribute {attribute!r}")
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except (Exception, SystemExit) as error:
            raise BenchError(f"--model {spec}: calling {attribute}() failed: {_one_line(error)}") from None
    else:
        raise BenchError(f"--model {spec}: {attribute} is a {type(factory).__name__}, not a callable or nn.Module")
    if not isinstance(model, nn.Module):
        raise BenchError(f"--model {spec}: {attribute}() returned a {type(model).__name__}, not a torch nn.Module")
    if checkpoint is not None:
        load_into(model, checkpoint, "--checkpoint", fits=spec)
    model.eval()
    model.model_spec = spec  # recorded in specs, with the weights' fingerprint
    return model


def _one_line(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"it called sys.exit({error.code!r}); a model file must define the model, not end the process"
    return one_line(error)


# -- results ---------------------------------------------------------------------------------------


class Results:
    """Runs, per-sample records and the tables computed from them (all ``pandas.DataFrame``).

    - ``records``: one row per sample and evaluation step: ``run_id``, ``sample_index``,
      ``attack`` (``"clean"`` or the attack), ``norm``, ``epsilon``, ``prediction``,
      ``true_label``, ``correct``, ``distance``, ``certified_label``/``_radius``/``_norm``,
      joined with the run's ``dataset``, ``defense``, ``label``, ``config`` (the configuration
      label of tables and plots), ``params`` (JSON text) and one ``params.KEY`` column per
      defense parameter;
    - ``clean``, ``accuracy_under_attack``, ``certified``, ``cost``: the tables of the JSON
      contract (``bench report --format json``), proportions with 95% Clopper-Pearson intervals
      (``ci_low``, ``ci_high``) and counts ``n``;
    - ``runs``: one row per run: spec, seed, library versions, timings, sanity ``warnings``.
    """

    def __init__(self, runs: pd.DataFrame, records: Records, thresholds: Sequence[float] = THRESHOLD_GRID):
        self.runs = runs
        self._records = records  # where the records are (a store, or in memory): tables aggregate them there
        self.thresholds = tuple(thresholds)

    @cached_property
    def tables(self) -> dict[str, pd.DataFrame]:
        return tables_from(Selection(self.runs, self._records), self.thresholds)

    @cached_property
    def records(self) -> pd.DataFrame:
        frame = with_run_keys(self._records.frame(), self.runs)  # all of them in memory: asked for
        if frame.empty:
            return frame.assign(config=[])
        frame["config"] = frame.run_id.map(self.runs.set_index("run_id").config)
        params = pd.json_normalize([dict(p) for p in frame.run_id.map(self.runs.set_index("run_id").params)])
        params.columns = [f"params.{c}" for c in params.columns]
        return pd.concat([frame.reset_index(drop=True), params], axis=1)

    @property
    def clean(self) -> pd.DataFrame:
        return self.tables["clean"]

    @property
    def accuracy_under_attack(self) -> pd.DataFrame:
        return self.tables["accuracy_under_attack"]

    @property
    def certified(self) -> pd.DataFrame:
        return self.tables["certified"]

    @property
    def cost(self) -> pd.DataFrame:
        return self.tables["cost"]

    @property
    def warnings(self) -> list[str]:
        return [w for ws in self.runs.get("warnings", []) for w in ws]

    def to_json(self) -> str:
        """The JSON contract of ``bench report --format json`` for these runs."""
        return render(self.tables, "json")

    def report(self, path: Path | str, title: str = "Robustness benchmark report") -> Path:
        """Write the HTML report: ``path`` ending in ``.html`` is that one self-contained file;
        any other path is a directory that gets ``report.html``, the tables in every format and
        the figures. Returns the HTML file's path."""
        from bench.reports.html import write_report  # draws figures: matplotlib loads only for a report

        path = Path(path)
        if path.suffix.lower() == ".html":
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory() as scratch:
                written = write_report(self.tables, self.runs, Path(scratch), title=title)
                path.write_text(written[0].read_text(encoding="utf-8"), encoding="utf-8")
            return path
        return write_report(self.tables, self.runs, path, title=title)[0]

    def __repr__(self) -> str:
        return f"Results({len(self.runs)} run(s), {len(self._records)} records)"

    @classmethod
    def from_runs(cls, runs: Sequence[Run], records: Sequence[tuple[str, Record]], store: str = "") -> "Results":
        """Results of runs held in memory (``records`` pairs each record with its run id)."""
        frame = pd.DataFrame([vars(run) for run in runs], columns=RUN_FIELDS).assign(store=store)
        frame["model_train_seconds"] = [
            run.info.get("train_seconds") if run.info.get("reused_checkpoint") is False else None for run in runs
        ]
        frame["config"] = configuration_labels(frame) if not frame.empty else []
        return cls(frame, Records.of((run_id, *Record(*r)) for run_id, r in records))


def load_results(
    directory: Path | str | Sequence[Path | str] = "results",
    where: Mapping[str, Any] | Sequence[str] | Sequence[tuple[str, str]] = (),
    thresholds: Sequence[float] = THRESHOLD_GRID,
) -> Results:
    """The records and tables of one or several results folders, the latest run of each spec:
    ``bench.load_results("results").accuracy_under_attack``.

    ``where`` keeps matching runs, as ``bench report --where``: ``{"defense": "pixeldp", "L": 0.1}``
    or ``["defense=pixeldp"]`` (run columns, spec fields, defense parameters).
    """

    if isinstance(where, Mapping):
        pairs = [(str(k), str(v)) for k, v in where.items()]
    else:
        pairs = [item if isinstance(item, tuple) else None for item in where]
        if None in pairs:
            pairs = parse_assignments([str(item) for item in where], "--where", "dataset=svhn")
    selection = load_selection(result_stores(directory), pairs)
    return Results(selection.runs, selection.records, thresholds)


# -- training and evaluation -------------------------------------------------------------------------
def train(
    model_or_defense: nn.Module | Defense, data: Data, *, epochs: int | None = None, batch_size: int = 64,
    lr: float | None = None, seed: int = 0, train_size: int | None = None, data_dir: Path | str | None = None,
    download: bool = False, device: str = "cpu", threads: int | None = None,
) -> Defense:
    """Train a model or defense on the training split of ``data`` with the shared loop (SGD,
    momentum, cosine schedule, seeded shuffles) and the defense's own loss; returns the defense.
    Raises ``bench.errors.TrainingFailed`` when training diverged (NaN/inf loss) or ended at chance
    (its accuracy on the training images not significantly above chance; see :func:`fit_and_check`).

    An ``nn.Module`` is trained in place with cross-entropy (``baseline``). ``lr`` and ``epochs``
    default to the defense's defaults on the dataset (``bench.training.TRAINING_DEFAULTS``: e.g.
    digits 30 epochs, MNIST 8; robustopt lr 0.01, others 0.05); 10 epochs for tensors.
    ``threads``: torch threads while it trains (default ``bench.threads.default_threads()``: the
    idle cores, at most 4, or ``OMP_NUM_THREADS``); the caller's setting is restored after.
    """
    validate_options({"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "train_size": train_size,
                      "download": download, "device": device, "threads": threads})
    defense = as_defense(model_or_defense, device)
    name, x, y = train_data(data, train_size=train_size, seed=seed, data_dir=data_dir, download=download)
    defaults = training_defaults(defense_name(defense), name)
    epochs = epochs if epochs is not None else defaults["epochs"] if isinstance(data, (str, Dataset)) else 10
    lr = defaults["lr"] if lr is None else lr
    with using_threads(threads):
        fit_and_check(defense, x, y, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device))
    return defense


def evaluate(
    model_or_defense: nn.Module | Defense,
    data: Data,
    attacks: Sequence[str | Attack] = (),
    epsilons: Epsilons | None = None,
    *,
    store: Store | Path | str | None = None,
    seed: int = 0,
    test_size: int | None = None,
    attack_params: Mapping[str, Any] | None = None,
    attack_backend: str = "foolbox",
    eot_draws: int = 20,
    audit: bool = True,
    label: str | None = None,
    data_dir: Path | str | None = None,
    download: bool = False,
    device: str = "cpu",
    log: Log | None = None,
    threads: int | None = None,
) -> Results:
    """Evaluate a model or defense on clean and attacked test inputs; per-sample records and tables.

    - ``model_or_defense``: any ``nn.Module`` mapping [0,1] images (N x C x H x W) to logits
      (evaluated as is, as the undefended ``baseline``), or a ``Defense`` (e.g.
      ``bench.wrap("smoothing", model)``, or one a run trained);
    - ``data``: a dataset name (``"digits"``, ``"mnist"``, ...; the test split), a ``Dataset``, or
      ``(x, y)`` tensors with ``x`` in [0,1];
    - ``attacks``: attack names (``bench list``) or ``Attack`` objects; ``epsilons`` one list for
      all, or per attack name or norm: ``{"linf": [0.05, 0.1], "l2": [0.5]}``; defaults per attack;
    - ``store``: a results folder (or ``Store``) to write the run to, step by step (the same call
      again resumes an interrupted run); nothing is written without one;
    - ``seed`` seeds every step (and the ``test_size`` subset); ``attack_params`` as
      ``--attack-param`` (``{"steps": 40}`` or ``{"pgd-linf.steps": 40}``); randomized defenses
      are attacked through EOT over ``eot_draws`` draws;
    - ``audit``: add, for every norm a gradient attack covers, a gradient-free (Square) and a
      transfer attack (PGD on an undefended surrogate of the same architecture, trained on
      ``data``'s training split), so that masked gradients cannot pass for robustness; the run's
      diagnostics (``bench.diagnostics``) are stored in ``Results.runs.info``.

    The whole request (data, model, attacks, epsilons) is checked before any work, with the
    one-line errors of the CLI. ``threads``: torch threads while it runs (default
    ``bench.threads.default_threads()``); the caller's setting is restored after.
    """
    log = log or _quiet
    validate_options({"seed": seed, "test_size": test_size, "eot_draws": eot_draws, "attack_backend": attack_backend,
                      "download": download, "device": device, "threads": threads})
    if epsilons is not None and not isinstance(epsilons, (list, tuple, Mapping)):
        raise BenchError(f"epsilons must be a list of numbers ([0.05, 0.1]) or lists per norm or attack "
                         f"({{'linf': [0.05], 'l2': [0.5]}}); got {type(epsilons).__name__} {epsilons!r}")
    if isinstance(store, (str, Path)):
        check_writable_dir(store, "store")
    defense = as_defense(model_or_defense, device)
    if isinstance(attacks, (str, Attack)):
        attacks = [attacks]
    if audit:
        attacks, epsilons = with_audit(attacks, epsilons)
    steps = attack_steps(attacks, epsilons, attack_params, attack_backend)
    if epsilons is not None and not steps:
        raise BenchError("epsilons set attack sizes, but no attack is given; pass attacks, e.g. ['pgd-linf']")
    test = evaluation_data(data, test_size=test_size, seed=seed, data_dir=data_dir, download=download)
    input_dim = int(np.prod(test.x.shape[1:]))
    for step in steps:
        check_epsilon_bounds(step.name, step.attack.norm, step.epsilons, input_dim, test.name)
    name = defense_name(defense)
    check_logits(defense.model, test, f"model ({type(defense.model).__name__})", device)
    for step in steps:
        if step.attack.target == "bpda" and defense.bpda_model() is None:
            raise BenchError(f"attack {step.name} runs through the defense's differentiable approximation, and defense "
                             f"{defense_name(defense)} offers none (Defense.bpda_model()); see docs/adaptive.md")
    try:
        defense.attack_model()  # a defense that still needs training says so here, before any work
    except BenchError as error:
        raise BenchError(f"{error}: train it first, e.g. bench.train(defense, data, epochs=...)") from None
    models = model_name(defense)
    default_label, params = describe(defense, name, models)
    label = label or default_label
    spec = RunSpec(
        defense=name, dataset=test.name, model=models, params=dataclasses.asdict(defense.params),
        attacks=[s.name for s in steps], attack_params=dict(attack_params or {}),
        epsilons={s.name: list(s.epsilons) for s in steps} if steps else None,
        attack_backend=attack_backend, eot_draws=eot_draws, epochs=0, seed=seed, test_size=test_size,
    )
    if isinstance(store, (str, Path)):
        store = Store(store)
    log(plan_line(label, test, test_size, steps, defense, eot_draws))
    facts = RunFacts(steps=tuple(steps), randomized=defense.randomized, certifies=defense.certifies,
                     eot_draws=eot_draws, input_dim=input_dim, num_test=len(test.y), num_train=None,
                     data_official=test.provenance, device=device, worker_threads=threads)
    recorder = RunRecorder(store, Run.start(spec, label, params), facts, log=log)
    try:
        with using_threads(threads):
            evaluate_steps(defense, steps, test.x, test.y, test.index, seed=seed, eot_draws=eot_draws,
                           done=set(recorder.done),
                           commit=lambda step, part: recorder.commit(step, part.records, part.diagnostics),
                           log=log, label=label,
                           surrogate=lambda: surrogate_for(defense, data, seed=seed, data_dir=data_dir,
                                                           download=download, device=device, log=log))
        run = recorder.finish()
    except BaseException:
        recorder.interrupt()
        raise
    return Results.from_runs([run], [(run.run_id, record) for record in recorder.records()],
                             str(store.directory) if store is not None else "")

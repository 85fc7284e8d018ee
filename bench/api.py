"""The public API: evaluate any model or defense, train one, read stored results.

``bench.evaluate(model, "digits", ["pgd-linf"])`` is the whole evaluation; the CLI (``bench run``,
``bench eval``) and the runner are thin shells over the functions here, so one loop produces
every record (:func:`evaluate_steps`), whether it comes from Python or the command line.

One evaluation step (the clean inputs, or one attack over its epsilons) is the unit of work: it
is seeded on its own, committed to a store on its own, and described by a plain, picklable
:class:`Step`, so a resumed or parallel run writes exactly the records of a serial one.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import platform
import random
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from bench.attacks import EOT, Attack, perturbation_norm
from bench.attacks.base import Connected, frozen_parameters
from bench.datasets.base import Dataset, balanced_subset
from bench.defenses.base import Certificate, Defense
from bench.diagnostics import Assessment, Diagnostic, assess, probe_clean, randomized_points, verdict_flips
from bench.checkpoint import load_into
from bench.errors import BenchError, one_line
from bench.metrics import THRESHOLD_GRID, Records
from bench.reports.load import result_stores
from bench.registry import ATTACKS, DATASETS, DEFENSES, build_params
from bench.spec import (
    Epsilons, RunSpec, check_epsilon_keys, epsilons_for, parse_assignments, scoped, unclaimed, with_audit,
)
from bench.store import MODEL_STEPS, RUN_FIELDS, Run, Store
from bench.training import TrainConfig, check_learned, training_defaults
from bench.threads import using_threads
from bench.types import CLEAN, Record
from bench.validation import (
    check_epsilon_bounds, check_epsilons, check_subset_size, check_writable_dir, validate_options,
)

Log = Callable[[str], None]
Data = str | Dataset | tuple[Any, Any]


# -- small shared pieces -------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("robustness-bench", "torch", "numpy", "foolbox", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _quiet(_: str) -> None:
    pass


def fingerprint(state: nn.Module | Mapping[str, Any]) -> str:
    """A short hash of a model's (or a defense's) state: names, shapes and bytes of every tensor.
    The identity of an outside model in specs: a resumed run must continue with the same weights."""
    digest = hashlib.sha256()

    def add(value: Any, name: str) -> None:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str((tuple(value.shape), value.dtype)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                add(value[key], f"{name}.{key}")
        else:
            digest.update(repr(value).encode())

    add(state.state_dict() if isinstance(state, nn.Module) else state, "")
    return digest.hexdigest()[:12]


def describe(defense: Defense, name: str, model_name: str) -> tuple[str, dict[str, Any]]:
    """A short label for tables (``pixeldp(L=0.3)``) and the full parameter dict."""
    params = dataclasses.asdict(defense.params)
    defaults = dataclasses.asdict(type(defense).Params())
    changed = [f"{k}={v}" for k, v in params.items() if defaults.get(k) != v]
    label = name + (f"({', '.join(changed)})" if changed else "")
    params["model"] = model_name
    return label, params


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


def defense_name(defense: Defense) -> str:
    """A defense's one name: its registry key (for a plug-in, the entry point's name), else its
    declared ``name``, else its class name for an unregistered class."""
    return DEFENSES.name_of(type(defense)) or defense.name or type(defense).__name__.lower()


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
    import importlib
    import importlib.util
    import os

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


# -- data ------------------------------------------------------------------------------------------
def load_dataset(
    name: str, data_dir: Path | str | None = None, download: bool = False, image_size: int = 224, *,
    test_only: bool = False,
) -> Dataset:
    """A registered dataset (``digits`` ships with scikit-learn; others read ``data_dir``, default ./data).

    ``test_only=True``: only the test split is needed (evaluation); a loader that can, reads no
    training files and needs none (CIFAR-10/100: ``test_batch``/``test`` and the meta file), and
    returns an empty training split. Other loaders read their files as usual.
    """
    loader = DATASETS.get(name)
    if data_dir is None and name != "digits":
        data_dir = Path("data")
    options = {"test_only": True} if test_only and _accepts(loader, "test_only") else {}
    try:
        return loader(data_dir=Path(data_dir) if data_dir is not None else None, download=download,
                      image_size=image_size, **options)
    except OSError as error:  # a file that exists but cannot be read (permissions, a folder in its place, I/O)
        where = f" {error.filename}" if error.filename else ""
        raise BenchError(f"{name}: cannot read{where}: {error.strerror or _one_line(error)}; check its permissions "
                         "(the dataset files must be readable by this user)") from None


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` takes ``keyword`` (by name, or through ``**kwargs``): a plug-in's loader may not."""
    import inspect

    parameters = inspect.signature(function).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


@dataclass
class EvalData:
    """The inputs one evaluation sees: images in [0,1] (NCHW), labels, and their sample indices."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    num_classes: int | None
    provenance: dict[str, bool] = field(default_factory=dict)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BenchError(f"data: {what} must be a torch tensor or numpy array, got {type(value).__name__}")
    return value


def tensors_name(x: torch.Tensor, y: torch.Tensor) -> str:
    digest = hashlib.sha256(x.contiguous().numpy().tobytes() + y.contiguous().numpy().tobytes()).hexdigest()
    return f"tensors-{digest[:8]}"


def check_images(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as float32 NCHW images in [0,1] and int64 labels; a one-line error otherwise."""
    x, y = _tensor(x, "x"), _tensor(y, "y")
    if x.dim() != 4:
        raise BenchError(f"data: x must be images N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BenchError(f"data: x must be float images in [0, 1], got dtype {x.dtype}")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise BenchError(f"data: y must be {len(x)} integer labels, got dtype {y.dtype} shape {tuple(y.shape)}")
    if len(x) == 0:
        raise BenchError("data: no samples")
    low, high = float(x.min()), float(x.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
        raise BenchError(f"data: images must be in [0, 1] (found {low:g} .. {high:g}); normalisation belongs in the model")
    return x.float().cpu(), y.long().cpu()


def evaluation_data(
    data: Data, *, test_size: int | None = None, seed: int = 0, data_dir: Path | str | None = None,
    download: bool = False, name: str | None = None,
) -> EvalData:
    """The test split of a dataset name or ``Dataset`` (a seeded class-balanced subset of
    ``test_size``), or given ``(x, y)`` tensors (all of them, or a subset of ``test_size``)."""
    if isinstance(data, str):
        data = load_dataset(data, data_dir, download, test_only=True)
    if isinstance(data, Dataset):
        check_subset_size(test_size, len(data.y_test), "test_size", data.name)
        index = balanced_subset(data.y_test, test_size, seed)
        return EvalData(name or data.name, data.x_test[index], data.y_test[index], index, data.num_classes, data.provenance)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = check_images(*data)
        check_subset_size(test_size, len(y), "test_size", "given")
        index = balanced_subset(y, test_size, seed)
        return EvalData(name or tensors_name(x, y), x[index], y[index], index, None)
    raise BenchError("data must be a dataset name (e.g. 'digits'), a Dataset, or a tuple (x, y) of tensors")


def train_data(data: Data, *, train_size: int | None, seed: int, data_dir: Path | str | None, download: bool) -> tuple[str, torch.Tensor, torch.Tensor]:
    if isinstance(data, str):
        data = load_dataset(data, data_dir, download)
    if isinstance(data, Dataset):
        if len(data.y_train):
            check_subset_size(train_size, len(data.y_train), "train_size", data.name)
        index = balanced_subset(data.y_train, train_size, seed)
        if len(index) == 0:
            raise BenchError(f"dataset {data.name} has no training split here; train elsewhere and load the weights")
        return data.name, data.x_train[index], data.y_train[index]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = check_images(*data)
        check_subset_size(train_size, len(y), "train_size", "given")
        index = balanced_subset(y, train_size, seed)
        return tensors_name(x, y), x[index], y[index]
    raise BenchError("data must be a dataset name (e.g. 'digits'), a Dataset, or a tuple (x, y) of tensors")


# -- the model fits the data -------------------------------------------------------------------------
@torch.no_grad()
def check_logits(model: nn.Module, data: EvalData, what: str = "model", device: str = "cpu") -> None:
    """One forward pass before any work: the model takes the data's images, returns one row of
    finite logits per image with one column per class, also at both ends of the [0,1] range."""
    probe = data.x[:4].to(device)
    ends = torch.stack([torch.zeros_like(data.x[0]), torch.ones_like(data.x[0])]).to(device)
    shape = "x".join(str(s) for s in data.x.shape[1:])
    was_training = model.training
    model.eval()
    try:
        outputs = [model(probe), model(ends)]
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchError(f"{what} does not accept {data.name} images ({shape}, values in [0,1]): {message}") from None
    finally:
        model.train(was_training)
    for output, inputs in zip(outputs, (probe, ends)):
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != len(inputs):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise BenchError(f"{what} must return logits of shape (batch, classes) for {data.name} images ({shape}); got {got}")
    if not all(output.is_floating_point() for output in outputs):
        raise BenchError(f"{what} returns {outputs[0].dtype} outputs; logits must be floating point "
                         "(the scores before softmax, which attacks differentiate)")
    classes = outputs[0].shape[1]
    expected = data.num_classes if data.num_classes is not None else int(data.y.max()) + 1
    # A known class count must match; for bare tensors, every label needs a logit.
    fits = classes == expected if data.num_classes is not None else classes >= expected
    if not fits:
        raise BenchError(f"{what} returns {classes} logits per image; {data.name} has {expected} classes")
    if not all(torch.isfinite(output).all() for output in outputs):
        raise BenchError(f"{what} returns non-finite logits on {data.name} images in [0,1]; "
                         "does it expect another input range (e.g. 0..255 or normalised inputs)?")


def plan_line(label: str, test: EvalData, test_size: int | None, steps: Sequence[Step], defense: Defense,
              eot_draws: int) -> str:
    """One line saying, before any work, how many images and which attacks an evaluation runs
    (with each attack's steps and restarts, the numbers its cost grows with)."""
    attacks = []
    for step in steps:
        params = getattr(step.attack, "params", None)
        cost = [f"{getattr(params, key)} {key}" for key in ("steps", "restarts") if isinstance(getattr(params, key, None), int)]
        if defense.randomized:
            cost.append(f"EOT over {eot_draws} draws")
        attacks.append(f"{step.name} at {len(step.epsilons)} epsilon(s)" + (f" ({', '.join(cost)})" if cost else ""))
    whole = " (the whole test split; --test-size N for a seeded subset)" if test_size is None else ""
    return (f"[{label}] evaluating {len(test.y)} {test.name} test images{whole}: clean"
            + "".join(f", {attack}" for attack in attacks))


# -- attacks and their epsilons ---------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One evaluation step, a plain picklable value: ``attack is None`` is the clean step."""

    name: str
    attack: Attack | None = None
    epsilons: tuple[float, ...] = ()


def attack_steps(
    attacks: Sequence[str | Attack], epsilons: Epsilons | None = None, attack_params: Mapping[str, Any] | None = None,
    backend: str = "foolbox",
) -> list[Step]:
    """Attack names (or ready ``Attack`` objects) with their epsilons as evaluation steps.

    ``epsilons``: one list for every attack, or a mapping from an attack name or a norm
    (``linf``, ``l2``, ``l1``) to its list (the attack's name wins over its norm); an attack
    without epsilons uses its own defaults.
    """
    if isinstance(attacks, (str, Attack)):
        attacks = [attacks]  # one attack
    steps, names = [], set()
    attack_params = dict(attack_params or {})
    named = {entry: {f.name for f in dataclasses.fields(ATTACKS.get(entry).Params)} for entry in attacks if isinstance(entry, str)}
    unclaimed(attack_params, named, "attack parameter")
    for entry in attacks:
        if isinstance(entry, str):
            attack_class = ATTACKS.get(entry)
            fields = {f.name for f in dataclasses.fields(attack_class.Params)}
            params = build_params(attack_class.Params, scoped(attack_params, entry, fields), f"attack {entry}")
            attack, name = attack_class(params, backend=backend), entry
        elif isinstance(entry, Attack):
            attack, name = entry, entry.name or type(entry).__name__.lower()
        else:
            raise BenchError(f"attacks must be names or Attack objects, got {type(entry).__name__}")
        if name in names or name == CLEAN:
            raise BenchError(f"attack {name!r} is given twice" if name in names else f"{CLEAN!r} is not an attack name")
        names.add(name)
        steps.append(Step(name, attack, tuple(float(e) for e in _epsilons_for(name, attack, epsilons))))
    check_epsilon_keys(epsilons, {step.name: step.attack.norm for step in steps})
    return steps


def _epsilons_for(name: str, attack: Attack, epsilons: Epsilons | None) -> list[float]:
    chosen = epsilons_for(epsilons, name, attack.norm, attack.default_epsilons)
    if not chosen:
        raise BenchError(f"attack {name}: no epsilons given and it has no defaults; pass epsilons=[...]")
    check_epsilons(chosen, f"epsilons of {name}")
    return chosen


# -- the evaluation loop -----------------------------------------------------------------------------
def records_for(
    indices: torch.Tensor, labels: torch.Tensor, predictions: torch.Tensor, certificate: Certificate | None,
    attack: str, norm: str | None, epsilon: float, distance: torch.Tensor | None,
) -> list[Record]:
    return [
        Record(
            sample_index=int(indices[i]), attack=attack, norm=norm, epsilon=float(epsilon),
            prediction=int(predictions[i]), label=int(labels[i]), correct=int(predictions[i] == labels[i]),
            distance=None if distance is None else float(distance[i]),
            certified_label=None if certificate is None else int(certificate.label[i]),
            certified_radius=None if certificate is None else float(certificate.radius[i]),
            certified_norm=None if certificate is None else certificate.norm,
            certified=None if certificate is None else int(certificate.certified[i]),
        )
        for i in range(len(labels))
    ]


@dataclass
class StepResult:
    """What one evaluation step produced: its records and its diagnostics' counts."""

    records: list[Record]
    diagnostics: list[Diagnostic] = field(default_factory=list)


def attack_target(defense: Defense, attack: Attack, surrogate: nn.Module | None = None) -> nn.Module:
    """The model ``attack`` runs on: the defense's attack model, its BPDA approximation, or an
    undefended surrogate (``Attack.target``)."""
    if attack.target == "surrogate":
        if surrogate is None:
            raise BenchError(f"attack {attack.name} needs an undefended surrogate model (trained on the same data)")
        return surrogate.eval()
    if attack.target == "bpda":
        model = defense.bpda_model()
        if model is None:
            raise BenchError(f"attack {attack.name}: defense {defense_name(defense)} offers no BPDA approximation "
                             "(Defense.bpda_model() returns None)")
        return model.eval()
    return defense.attack_model()


def evaluate_step(
    defense: Defense, step: Step, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, *,
    seed: int = 0, eot_draws: int = 20, log: Log = _quiet, label: str = "", surrogate: nn.Module | None = None,
) -> StepResult:
    """The records of one step: predictions (and certificates) on the clean or attacked inputs,
    with the step's diagnostics (``bench.diagnostics``).

    Seeded on its own, so the step gives the same records whatever ran before it. Randomized
    defenses, and defenses whose output changes between two calls on the same input although they
    do not declare it, are attacked through EOT over ``eot_draws`` noise draws per gradient step.
    The verdict of a point is one call of the defense's rule (``predict``); on a randomized defense
    a second call measures how often that verdict flips (``verdict-flips``).
    """
    seed_everything(seed)
    declared = defense.randomized
    if step.attack is None:
        predictions, certificate = defense.evaluate(x)
        records = records_for(index, y, predictions, certificate, CLEAN, None, 0.0, None)
        target = defense.attack_model()
        varies = [] if declared else [Diagnostic(CLEAN, "undeclared-randomness", 0.0,
                                                 int(randomized_points(target, x).sum()), len(x))]
        randomized = declared or bool(varies and varies[0].count)
        if randomized:
            target = EOT(target, eot_draws)
        with frozen_parameters(target):
            probes = probe_clean(CLEAN, target, x, y, defense.predict, predictions, randomized)
        return StepResult(records, varies + probes)
    target = Connected(attack_target(defense, step.attack, surrogate))
    randomized = declared or (step.attack.target != "surrogate" and bool(randomized_points(target, x).any()))
    if randomized and step.attack.target != "surrogate":
        target = EOT(target, min(eot_draws, step.attack.max_eot_draws or eot_draws))
    # The defense's own prediction rule judges success inside the attacks too (AutoAttack's
    # cascade, the minimisation attacks' re-judging), not the attack model's argmax.
    adversarials = step.attack.run(target, x, y, list(step.epsilons), predict=defense.predict)
    judged = evaluate_each(defense, adversarials, distinct=not randomized)
    records, diagnostics = [], []
    for epsilon, x_adv, (predictions, certificate) in zip(step.epsilons, adversarials, judged):
        distance = perturbation_norm(x_adv - x, step.attack.norm)
        records += records_for(index, y, predictions, certificate, step.name, step.attack.norm, epsilon, distance)
        if randomized:
            flips = int(verdict_flips(defense.predict, x_adv, y, predictions).sum())
            diagnostics.append(Diagnostic(step.name, "verdict-flips", float(epsilon), flips, len(x)))
        log(f"[{label}] {step.name} eps={epsilon:g}: accuracy {float((predictions == y).float().mean()):.4f}")
    return StepResult(records, diagnostics)


def evaluate_each(
    defense: Defense, inputs: Sequence[torch.Tensor], distinct: bool = True,
) -> list[tuple[torch.Tensor, Certificate | None]]:
    """``defense.evaluate`` of each batch in ``inputs`` (one attack's batches, smallest budget
    first); with ``distinct``, an input equal to the previous batch's at its index is not
    evaluated again.

    A point broken within a smaller budget carries the same adversarial input to every larger
    one, and a point misclassified clean is not attacked. On a deterministic defense their
    verdicts are equal, and an expensive certificate (RobustOpt's exact dual bound, most of its
    attack steps' time) is worth computing once: about a quarter fewer on MNIST at 5 L2 budgets.
    A randomized defense needs ``distinct=False``: fresh draws for every input.
    """
    results: list[tuple[torch.Tensor, Certificate | None]] = []
    for batch in inputs:
        if not distinct or not results or len(batch) != len(previous):
            results.append(defense.evaluate(batch))
        else:
            changed = (batch != previous).flatten(1).any(1)
            predictions, certificate = results[-1][0].clone(), results[-1][1]
            if changed.any():
                new_predictions, new_certificate = defense.evaluate(batch[changed])
                predictions[changed] = new_predictions
                if certificate is not None:
                    certificate = dataclasses.replace(certificate, **{
                        name: getattr(certificate, name).clone().index_put_((changed,), getattr(new_certificate, name))
                        for name in ("label", "radius", "certified")})
            results.append((predictions, certificate))
        previous = batch
    return results


def evaluate_steps(
    defense: Defense, steps: Sequence[Step], x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, *,
    seed: int = 0, eot_draws: int = 20, done: set[str] = frozenset(),
    commit: Callable[[StepResult], None] | None = None, log: Log = _quiet, label: str = "",
    surrogate: Callable[[], nn.Module | None] | None = None,
) -> list[StepResult]:
    """The clean step, then one step per attack; steps named in ``done`` are skipped, each other
    step's result goes to ``commit`` as soon as it exists (a store commits it atomically).
    ``surrogate`` builds the undefended surrogate for transfer attacks, once, when one needs it."""
    results: list[StepResult] = []
    built: list[nn.Module | None] = []
    for step in [Step(CLEAN), *steps]:
        if step.name in done:
            continue
        model = None
        if step.attack is not None and step.attack.target == "surrogate":
            if not built:
                built.append(surrogate() if surrogate is not None else None)
            model = built[0]
            if model is None:
                log(f"[{label}] {step.name} skipped: no surrogate model")
                continue
        part = evaluate_step(defense, step, x, y, index, seed=seed, eot_draws=eot_draws, log=log, label=label,
                             surrogate=model)
        if commit is not None:
            commit(part)
        results.append(part)
    return results


# -- where a run's records go ------------------------------------------------------------------------
class RunWriter:
    """A run's records in memory, or in a store: registered when it starts (or resumed from the
    stored steps of an unfinished run of the same spec that no live process owns), committed step
    by step, marked complete at the end, and handed back as ``interrupted`` on any failure.
    While it works, this process holds a lease on the run (``Store.hold``) and each commit records
    the seconds the step took; ``resume=False`` always starts a new run."""

    def __init__(self, store: Store | None, run: Run, log: Log = _quiet, resume: bool = True):
        self.store, self.run, self.done, self.resumed = store, run, set(), False
        self._records: list[Record] = []
        self._diagnostics: list[Diagnostic] = []
        if store is None:
            return
        if resume:
            store.wait_for_writer(run.spec_hash, lambda text: log(f"[{run.label}] {text}"))
        previous = store.resumable(run.spec_hash) if resume else None
        if previous is not None:
            stored, self.done = previous
            self.run = dataclasses.replace(run, run_id=stored.run_id, created=stored.created)
            self.resumed = True
            log(f"[{run.label}] resuming unfinished run {stored.run_id}: {', '.join(sorted(self.done)) or 'nothing'} already stored")
        else:
            store.begin_run(run)
        self.lease = store.hold(self.run.run_id)  # renewed while this process works; times each step

    def commit(self, result: StepResult) -> None:
        if self.store is not None:
            self.lease.commit(result.records, result.diagnostics)
        self._records += result.records
        self._diagnostics += result.diagnostics

    def work(self, step: str) -> None:
        """Record the seconds since the last commit as ``step`` (``train`` or ``load``)."""
        if self.store is not None:
            self.lease.work(step)

    def records(self) -> list[Record]:
        if self.store is None:
            return list(self._records)
        frame = self.store.records([self.run.run_id])
        return [Record(*tuple(row)[1:]) for row in frame.itertuples(index=False)]

    def diagnostics(self) -> list[Diagnostic]:
        if self.store is None:
            return list(self._diagnostics)
        return self.store.diagnostics(self.run.run_id)

    def finish(self, info: dict[str, Any], warnings: list[str]) -> None:
        if self.store is not None:
            # Every process that worked on the run (a resumed one's earlier ones too) is charged.
            work = self.store.work(self.run.run_id)
            info = {**info, "eval_seconds": float(work.seconds[~work.step.isin(MODEL_STEPS)].sum())}
        self.run = dataclasses.replace(self.run, info=info, warnings=warnings, status="complete")
        if self.store is not None:
            try:
                self.store.finish_run(self.run.run_id, info, warnings)
            finally:
                self.lease.stop()

    def abort(self) -> None:
        if self.store is not None:
            self.store.release(self.run.run_id)
            self.lease.stop()


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
        from bench.reports.load import Results as Selection
        from bench.reports.tables import tables_from

        return tables_from(Selection(self.runs, self._records), self.thresholds)

    @cached_property
    def records(self) -> pd.DataFrame:
        from bench.reports.load import with_run_keys

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
        from bench.reports.render import render

        return render(self.tables, "json")

    def report(self, path: Path | str, title: str = "Robustness benchmark report") -> Path:
        """Write the HTML report: ``path`` ending in ``.html`` is that one self-contained file;
        any other path is a directory that gets ``report.html``, the tables in every format and
        the figures. Returns the HTML file's path."""
        from bench.reports.html import write_report

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
        from bench.reports.labels import configuration_labels

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
    from bench.reports.load import load_results as load_selection

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


def fit_and_check(defense: Defense, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
    """Seed, train ``defense`` on ``x``, ``y``, and check that training worked: raises
    ``TrainingFailed`` when it diverged (NaN/inf loss or weights) or ended at chance
    (``bench.training.check_learned``). Every training of the harness goes through here."""
    seed_everything(config.seed)
    defense.fit(x, y, config)
    check_learned(defense.attack_model(), x, y, desc=defense_name(defense), seed=config.seed,
                  device=config.device)


def assess_run(records: list[Record], diagnostics: list[Diagnostic], steps: Sequence[Step], randomized: bool,
               eot_draws: int, input_dim: int | None) -> Assessment:
    """``bench.diagnostics.assess`` for a run with these steps."""
    kinds = {step.name: step.attack.kind for step in steps if step.attack is not None}
    audited = tuple(sorted({step.attack.norm for step in steps if step.attack.kind in ("gradient-free", "transfer")}))
    return assess(records, diagnostics, kinds=kinds, declared_randomized=randomized,
                  eot_draws=eot_draws if steps else None, input_dim=input_dim, audited_norms=audited)


def surrogate_for(defense: Defense, data: Data, *, seed: int = 0, data_dir: Path | str | None = None,
                  download: bool = False, device: str = "cpu", log: Log = _quiet) -> nn.Module | None:
    """An undefended surrogate for transfer attacks: a fresh copy of ``defense.model``'s
    architecture (every layer re-initialised), trained by standard training on ``data``'s
    training split with the baseline's defaults; ``None`` when ``data`` has no training split."""
    if not isinstance(data, (str, Dataset)):
        log("transfer attacks skipped: (x, y) tensors have no training split to train a surrogate on")
        return None
    try:
        name, x, y = train_data(data, train_size=None, seed=seed, data_dir=data_dir, download=download)
    except BenchError as error:
        log(f"transfer attacks skipped: {error}")
        return None
    seed_everything(seed)
    model = copy.deepcopy(defense.model).to(device)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    # The same architecture, initialisation, data and seed train the same surrogate: one per process.
    key = f"{fingerprint(model)}/{name}/{tensors_name(x, y)}/{seed}/{device}"
    if key not in _SURROGATES:
        surrogate = wrap("baseline", model, device=device)
        defaults = training_defaults("baseline", name)
        started = time.perf_counter()
        try:
            fit_and_check(surrogate, x, y, TrainConfig(epochs=defaults["epochs"], lr=defaults["lr"], seed=seed,
                                                       device=device))
        except Exception as error:  # noqa: BLE001 - the model's own code: a copy that cannot train is no surrogate
            log(f"transfer attacks skipped: a copy of the model could not be trained as a surrogate ({_one_line(error)})")
            return None
        log(f"trained the undefended surrogate for transfer attacks in {time.perf_counter() - started:.1f} s")
        while len(_SURROGATES) >= 4:
            _SURROGATES.pop(next(iter(_SURROGATES)))
        _SURROGATES[key] = surrogate.attack_model().eval()
    return _SURROGATES[key]


_SURROGATES: dict[str, nn.Module] = {}


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
    run = Run(
        run_id=uuid.uuid4().hex[:12], created=now(), dataset=test.name, defense=name, label=label, params=params,
        spec=dataclasses.asdict(spec), spec_hash=spec.hash(), training_hash=spec.training_hash(), seed=seed,
        versions=library_versions(), host=socket.gethostname(), info={}, warnings=[],
    )
    log(plan_line(label, test, test_size, steps, defense, eot_draws))
    writer = RunWriter(store, run, log)
    try:
        started = time.perf_counter()
        with using_threads(threads):
            evaluate_steps(defense, steps, test.x, test.y, test.index, seed=seed, eot_draws=eot_draws,
                           done=writer.done, commit=writer.commit, log=log, label=label,
                           surrogate=lambda: surrogate_for(defense, data, seed=seed, data_dir=data_dir,
                                                           download=download, device=device, log=log))
        eval_seconds = time.perf_counter() - started
        records = writer.records()
        assessment = assess_run(records, writer.diagnostics(), steps, defense.randomized, eot_draws,
                                int(np.prod(test.x.shape[1:])))
        warnings = assessment.warnings
        for warning in warnings:
            log(f"[{label}] warning: {warning}")
        info = {**assessment.info(),
            "eval_seconds": eval_seconds, "num_test": len(test.y), "device": device,
            "data_official": test.provenance, "randomized": defense.randomized, "certifies": defense.certifies,
            "resumed": writer.resumed, "argv": sys.argv,
        }
        writer.finish(info, warnings)
    except BaseException:
        writer.abort()
        raise
    return Results.from_runs([writer.run], [(writer.run.run_id, r) for r in records],
                             str(store.directory) if store is not None else "")

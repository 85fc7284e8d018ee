"""One evaluation step, and the loop over a run's steps: the code that produces every record.

``bench.evaluate`` (the public API) and the grid's evaluation jobs (``bench.jobs``) both call
:func:`evaluate_step`, so a record does not depend on which door the run came through. One step
(the clean inputs, or one attack over its epsilons) is the unit of work: it is seeded on its
own, committed to a store on its own, and described by a plain, picklable :class:`Step`, so a
resumed or parallel run writes exactly the records of a serial one.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from bench.attacks import EOT, Attack
from bench.attacks.base import Connected, frozen_parameters
from bench.defenses.base import Certificate, Defense
from bench.diagnostics import Diagnostic, probe_clean, randomized_points, verdict_flips
from bench.datasets.base import Dataset
from bench.errors import BenchError, one_line
from bench.inputs import Data, EvalData, tensors_name, train_data
from bench.provenance import fingerprint, seed_everything
from bench.registry import ATTACKS, DEFENSES, build_params, defense_name
from bench.spec import Epsilons, check_epsilon_keys, epsilons_for, scoped, unclaimed
from bench.training import TrainConfig, fit_and_check, training_defaults
from bench.types import CLEAN, Norm, Record
from bench.validation import check_epsilons

Log = Callable[[str], None]


def quiet(_: str) -> None:
    """A log that says nothing."""


def describe(defense: Defense, name: str, model_name: str) -> tuple[str, dict[str, Any]]:
    """A short label for tables (``pixeldp(L=0.3)``) and the full parameter dict."""
    params = dataclasses.asdict(defense.params)
    defaults = dataclasses.asdict(type(defense).Params())
    changed = [f"{k}={v}" for k, v in params.items() if defaults.get(k) != v]
    label = name + (f"({', '.join(changed)})" if changed else "")
    params["model"] = model_name
    return label, params


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
    attack: str, norm: Norm | None, epsilon: float, distance: torch.Tensor | None,
) -> list[Record]:
    return [
        Record(
            sample_index=int(indices[i]), attack=attack, norm=norm, epsilon=float(epsilon),
            prediction=int(predictions[i]), label=int(labels[i]), correct=bool(predictions[i] == labels[i]),
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
    seed: int = 0, eot_draws: int = 20, log: Log = quiet, label: str = "", surrogate: nn.Module | None = None,
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
        distance = Norm(step.attack.norm).size(x_adv - x)
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
    commit: Callable[[str, StepResult], None] | None = None, log: Log = quiet, label: str = "",
    surrogate: Callable[[], nn.Module | None] | None = None,
) -> list[StepResult]:
    """The clean step, then one step per attack; steps named in ``done`` are skipped, each other
    step's name and result go to ``commit`` as soon as it exists (a store commits it atomically).
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
            commit(step.name, part)
        results.append(part)
    return results


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


def surrogate_for(defense: Defense, data: Data, *, seed: int = 0, data_dir: Path | str | None = None,
                  download: bool = False, device: str = "cpu", log: Log = quiet) -> nn.Module | None:
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
        surrogate = DEFENSES.get("baseline").wrap(model, device=device)
        defaults = training_defaults("baseline", name)
        started = time.perf_counter()
        try:
            fit_and_check(surrogate, x, y, TrainConfig(epochs=defaults["epochs"], lr=defaults["lr"], seed=seed,
                                                       device=device))
        except Exception as error:  # noqa: BLE001 - the model's own code: a copy that cannot train is no surrogate
            log(f"transfer attacks skipped: a copy of the model could not be trained as a surrogate ({one_line(error)})")
            return None
        log(f"trained the undefended surrogate for transfer attacks in {time.perf_counter() - started:.1f} s")
        while len(_SURROGATES) >= 4:
            _SURROGATES.pop(next(iter(_SURROGATES)))
        _SURROGATES[key] = surrogate.attack_model().eval()
    return _SURROGATES[key]


_SURROGATES: dict[str, nn.Module] = {}

"""A run from its spec: the dataset, the zoo model and defense with every default resolved, and
the spec's attacks as evaluation steps. :mod:`bench.jobs` runs them (training, then the public
API's evaluation loop, committed job by job)."""
from __future__ import annotations

import dataclasses

from bench.evaluation import Step, attack_steps
from bench.provenance import seed_everything
from bench.datasets.base import Dataset
from bench.defenses.base import Defense
from bench.models import build_model, default_model
from bench.registry import DEFENSES, build_params
from bench.spec import DEFAULT_ATTACK_BATCH_SIZE, DEFAULT_EVAL_BATCH_SIZE, RunSpec, scoped
from bench.training import training_defaults


def build_defense(spec: RunSpec, dataset: Dataset, device: str) -> tuple[Defense, str]:
    """The defense with its zoo model (``--model``, else the defense's, else the dataset's default)
    and its parameters (``--param``, else the training defaults table's, else the defense's)."""
    defense_class = DEFENSES.get(spec.defense)
    fields = {f.name for f in dataclasses.fields(defense_class.Params)}
    chosen = {**training_defaults(spec.defense, spec.dataset)["params"], **scoped(spec.params, spec.defense, fields)}
    params = build_params(defense_class.Params, chosen, f"defense {spec.defense}")
    model_name = spec.model or defense_class.default_model or default_model(dataset.name, dataset.shape)
    seed_everything(spec.seed)
    model = build_model(model_name, dataset.shape, dataset.num_classes, dataset.mean, dataset.std)
    defense = defense_class(model, params, device=device)
    defense.model_name = model_name  # the zoo name, recorded in specs instead of a weight fingerprint
    defense.eval_batch_size = spec.eval_batch_size or DEFAULT_EVAL_BATCH_SIZE
    return defense, model_name


def resolved(spec: RunSpec, defense: Defense, model_name: str) -> RunSpec:
    """``spec`` with every resolved value spelled out, defaults included: the stored spec and its
    hashes then carry them, so a changed default never reuses a checkpoint trained under the old one."""
    defaults = training_defaults(spec.defense, spec.dataset)
    return dataclasses.replace(
        spec, model=model_name, epochs=spec.epochs or defaults["epochs"],
        lr=defaults["lr"] if spec.lr is None else spec.lr, test_size=spec.test_size or defaults["test_size"],
        params=dataclasses.asdict(defense.params),
    )


def spec_steps(spec: RunSpec) -> list[Step]:
    """The spec's attacks as evaluation steps, attacking ``--attack-batch-size`` images at a time."""
    steps = attack_steps(spec.attacks, spec.epsilons, spec.attack_params, spec.attack_backend)
    for step in steps:
        step.attack.chunk_size = spec.attack_batch_size or DEFAULT_ATTACK_BATCH_SIZE
    return steps

"""A run from its spec: the zoo model and defense, training (or the stored checkpoint), then the
public API's evaluation loop (:func:`bench.api.evaluate_steps`), committed step by step."""
from __future__ import annotations

import dataclasses
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.api import RunWriter, Step, attack_steps, describe, evaluate_steps, library_versions, now, seed_everything
from bench.datasets.base import Dataset, balanced_subset
from bench.errors import BenchError
from bench.log import LOGGER
from bench.metrics import sanity_warnings
from bench.models import build_model, default_model
from bench.registry import DATASETS, DEFENSES, build_params
from bench.spec import DEFAULT_ATTACK_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_EVAL_BATCH_SIZE, RunSpec, scoped
from bench.store import MODEL_STEPS, Run, Store
from bench.training import TrainConfig
from bench.types import Record
from bench.defenses.base import Defense


def load_dataset(spec: RunSpec, data_dir: Path | None, download: bool) -> Dataset:
    loader = DATASETS.get(spec.dataset)
    if data_dir is None and spec.dataset != "digits":
        data_dir = Path("data")
    return loader(data_dir=data_dir, download=download, image_size=spec.image_size)


def build_defense(spec: RunSpec, dataset: Dataset, device: str) -> tuple[Defense, str]:
    """The defense with its zoo model (``--model``, else the defense's, else the dataset's default)."""
    defense_class = DEFENSES.get(spec.defense)
    fields = {f.name for f in dataclasses.fields(defense_class.Params)}
    params = build_params(defense_class.Params, scoped(spec.params, spec.defense, fields), f"defense {spec.defense}")
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
    return dataclasses.replace(
        spec, model=model_name, epochs=spec.epochs or DEFAULT_EPOCHS.get(spec.dataset, 30),
        params=dataclasses.asdict(defense.params),
    )


def spec_steps(spec: RunSpec) -> list[Step]:
    """The spec's attacks as evaluation steps, attacking ``--attack-batch-size`` images at a time."""
    steps = attack_steps(spec.attacks, spec.epsilons, spec.attack_params, spec.attack_backend)
    for step in steps:
        step.attack.chunk_size = spec.attack_batch_size or DEFAULT_ATTACK_BATCH_SIZE
    return steps


@dataclass
class RunResult:
    run_id: str
    label: str
    clean_accuracy: float
    records: list[Record]
    info: dict[str, Any]
    warnings: list[str]


def execute(
    spec: RunSpec, dataset: Dataset, store: Store, device: str = "cpu", log=LOGGER.info, force: bool = False
) -> RunResult:
    """Train (or reuse the checkpoint), evaluate clean and under every attack, store the records.

    A spec whose run is already complete is not run again (its stored result is returned) unless
    ``force``, which starts a new run; an unfinished run of the spec whose process is gone is
    resumed from its stored steps.
    """
    defense, model_name = build_defense(spec, dataset, device)
    label, params = describe(defense, spec.defense, model_name)
    spec = resolved(spec, defense, model_name)
    if not force:
        complete = store.complete_run(spec.hash())
        if complete is not None:
            log(f"[{label}] already complete: run {complete.run_id}; --force starts a new one")
            stored = [Record(*tuple(row)[1:]) for row in store.records([complete.run_id]).itertuples(index=False)]
            clean = [r.correct for r in stored if r.attack == "clean"]
            return RunResult(complete.run_id, label, sum(clean) / len(clean), stored, complete.info, complete.warnings)
    steps = spec_steps(spec)

    train_index = balanced_subset(dataset.y_train, spec.train_size, spec.seed)
    test_index = balanced_subset(dataset.y_test, spec.test_size, spec.seed)
    x_test, y_test = dataset.x_test[test_index], dataset.y_test[test_index]

    # Registered as running, or the unfinished run of this spec resumed from its stored steps.
    writer = RunWriter(store, Run(
        run_id=uuid.uuid4().hex[:12], created=now(), dataset=dataset.name, defense=spec.defense, label=label,
        params=params, spec=dataclasses.asdict(spec), spec_hash=spec.hash(),
        training_hash=spec.training_hash(), seed=spec.seed, versions=library_versions(),
        host=socket.gethostname(), info={}, warnings=[],
    ), log, resume=not force)
    run_id = writer.run.run_id

    try:
        training_hash = spec.training_hash()
        state = store.load_checkpoint(training_hash)
        if state is not None:
            defense.load_state_dict(state)
            log(f"[{label}] reusing checkpoint {store.checkpoint_path(training_hash)}")
        else:
            if len(train_index) == 0:
                raise BenchError(f"dataset {dataset.name} has no training split here; train elsewhere or pass a checkpoint")
            config = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed, device=device)
            seed_everything(spec.seed)
            defense.fit(dataset.x_train[train_index], dataset.y_train[train_index], config)
            store.save_checkpoint(training_hash, defense.state_dict())
        writer.work("load" if state is not None else "train")

        # Each step is seeded on its own and committed on its own (with the seconds it took), so a
        # resumed run reproduces exactly the records an uninterrupted one would have written.
        evaluate_steps(defense, steps, x_test, y_test, test_index, seed=spec.seed, eot_draws=spec.eot_draws,
                       done=writer.done, commit=writer.commit, log=log, label=label)

        stored = writer.records()
        clean = [r.correct for r in stored if r.attack == "clean"]
        clean_accuracy = sum(clean) / len(clean)
        log(f"[{label}] clean accuracy {clean_accuracy:.4f} on {len(clean)} test images")
        warnings = sanity_warnings(
            stored, defense.randomized, spec.eot_draws if spec.attacks else None, input_dim=int(np.prod(dataset.shape))
        )
        for warning in warnings:
            log(f"[{label}] warning: {warning}")
        info = {
            **costs(store, run_id, training_hash),
            "resumed": writer.resumed,
            "num_train": len(train_index),
            "num_test": len(test_index),
            "device": device,
            "data_official": dataset.provenance,
            "randomized": defense.randomized,
            "certifies": defense.certifies,
            "argv": sys.argv,
        }
        writer.finish(info, warnings)
    except BaseException:
        # Hand the run back: stored steps stay, and the next run of this spec resumes it.
        writer.abort()
        raise
    return RunResult(run_id, label, clean_accuracy, stored, info, warnings)


def costs(store: Store, run_id: str, training_hash: str) -> dict[str, Any]:
    """Seconds summed over every process that worked on the run (a resumed run's earlier ones
    too): ``train_seconds`` (training, or loading the checkpoint), ``eval_seconds`` (clean and
    attack steps), and ``model_train_seconds``, the training of its model by whichever run did it."""
    work = store.work(run_id)
    model = work.step.isin(MODEL_STEPS)
    return {
        "train_seconds": float(work.seconds[model].sum()),
        "eval_seconds": float(work.seconds[~model].sum()),
        "model_train_seconds": store.training_seconds(training_hash),
        "reused_checkpoint": not bool((work.step == "train").any()),
        "processes": len(work[["host", "pid"]].drop_duplicates()),
    }

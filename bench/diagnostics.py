"""Diagnostics of an evaluation: can its attacks be trusted on this defense?

Carlini et al. 2019 ("On evaluating adversarial robustness") as numbers computed for every run,
from probes that run inside the evaluation steps (``probe_clean``, ``probe_attacked``; stored as
``Diagnostic`` counts beside the records) and from the records themselves (``assess``):

==========================  =======================================================  ==========================
name                        what is counted                                          fires when
==========================  =======================================================  ==========================
``zero-gradient``           clean points whose input gradient of the loss is 0        share > ``GRADIENT_SHARE``
``nonfinite-gradient``      clean points whose input gradient has a NaN or inf        any point
``undeclared-randomness``   points whose attack-model output differs between two      any point, on a defense that
                            calls on the same input                                   does not declare ``randomized``
``unreached``               probe points still right after a gradient walk whose      share > ``UNREACHED_SHARE``
                            L-inf budget 1 reaches every image
``gradient-free-wins``      per norm and epsilon: points a gradient-free or transfer  the share's 95% lower bound >
                            attack breaks and no gradient attack does                 ``BLACK_BOX_MARGIN`` + noise
``rises-with-epsilon``,     the checks of ``bench.metrics.sanity_warnings`` (accuracy  as there
``gray-image``, ``chance``,  rising with epsilon, not falling at a budget that
``eot-1``                   reaches the gray image, chance-level clean accuracy,
                            one EOT draw)
``verdict-flips``           randomized defenses: points whose verdict (right or       never: it is the noise the
                            wrong) differs between two calls of the defense's rule    other figures are read against
==========================  =======================================================  ==========================

A run whose diagnostics all ran and none fired is "clean"; one with a fired diagnostic is
flagged in every table, plot and summary; one whose diagnostics did not all run (no attack of a
norm, audit switched off) is neither.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from bench.confidence import clopper_pearson_bounds
from bench.metrics import STRENGTH_PREFIX, WORST_CASE, records_frame, sanity_warnings, strength_warnings
from bench.types import CLEAN

# Kinds of attack (``Attack.kind``) that do not follow the defense's own gradients.
GRADIENT_FREE_KINDS = ("gradient-free", "transfer")
GRADIENT_SHARE = 0.05  # zero gradients on more than 5% of the clean points: masked or saturated
UNREACHED_SHARE = 0.10  # with every image in reach, more than 10% of points left right: masked
BLACK_BOX_MARGIN = 0.02  # gradient-free attacks breaking 2 points in 100 that gradients miss
PROBE_SIZE = 64  # points per shard that the full-budget gradient walk probes
PROBE_STEPS = 20
ALPHA = 0.05


class Diagnostic(NamedTuple):
    """``count`` of ``n`` points of one evaluation ``step`` (at ``epsilon``) show ``name``."""

    step: str
    name: str
    epsilon: float
    count: int
    n: int


Predict = Callable[[torch.Tensor], torch.Tensor]


# -- probes (inside an evaluation step, on the model) ---------------------------------------------
def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point gradient of the cross-entropy loss with respect to the input (zeros where the
    model's output does not depend on the input through autograd)."""
    inputs = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        if not logits.requires_grad:
            return torch.zeros_like(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, inputs, allow_unused=True)
    return torch.zeros_like(x) if gradient is None else gradient


@torch.no_grad()
def output_varies(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per point: whether two calls of ``model`` on the same input give different outputs."""
    first, second = model(x), model(x)
    return ~((first == second) | (first.isnan() & second.isnan())).flatten(1).all(1)


def full_budget_walk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = PROBE_STEPS) -> torch.Tensor:
    """Signed-gradient ascent on the loss from ``x`` itself (no random start: that alone would
    reach a random image), with an L-inf budget of 1, so every image is within reach."""
    x_adv = x.clone()
    for _ in range(steps):
        gradient = input_gradients(model, x_adv, y)
        x_adv = (x_adv + (2.5 / steps) * torch.nan_to_num(gradient).sign()).clamp(0.0, 1.0)
    return x_adv


def verdict_flips(predict: Predict, x: torch.Tensor, y: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Per point: whether a second call of the rule judges it otherwise than ``first`` did."""
    second = predict(x).to(y.device)
    return (first.to(y.device) == y) != (second == y)


def probe_clean(
    step: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, predict: Predict,
    predictions: torch.Tensor, randomized: bool,
) -> list[Diagnostic]:
    """The diagnostics of the clean inputs: gradients, the full-budget walk and (for randomized
    defenses) the verdict noise. ``model`` is what gradient attacks see (EOT-wrapped for a
    randomized defense); ``predictions`` the rule's first judgement of ``x``."""
    n = len(x)
    gradient = input_gradients(model, x, y).flatten(1)
    finite = torch.isfinite(gradient).all(1)
    found = [
        Diagnostic(step, "zero-gradient", 0.0, int(((gradient == 0).all(1) & finite).sum()), n),
        Diagnostic(step, "nonfinite-gradient", 0.0, int((~finite).sum()), n),
    ]
    probe = slice(0, min(n, PROBE_SIZE))
    right = predictions[probe].to(y.device) == y[probe]
    reached = full_budget_walk(model, x[probe], y[probe])
    still = right & (predict(reached).to(y.device) == y[probe])
    found.append(Diagnostic(step, "unreached", 0.0, int(still.sum()), int(right.sum())))
    if randomized:
        found.append(Diagnostic(step, "verdict-flips", 0.0, int(verdict_flips(predict, x, y, predictions).sum()), n))
    return found


def randomized_points(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``output_varies`` in eval mode, the mode attacks and predictions use."""
    was_training = model.training
    model.eval()
    try:
        return output_varies(model, x)
    finally:
        model.train(was_training)


# -- assessment (from the stored records and diagnostics) -------------------------------------------
@dataclass
class Finding:
    """One diagnostic of a run: its ``count`` of ``n``, whether it ``fired``, and why."""

    name: str
    fired: bool
    count: int | None = None
    n: int | None = None
    message: str = ""
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Assessment:
    findings: list[Finding]
    warnings: list[str]  # fired findings' messages, then attack-strength notes
    complete: bool  # every diagnostic ran (then, with none fired, the run is clean)

    @property
    def flagged(self) -> bool:
        return any(finding.fired for finding in self.findings)

    def info(self) -> dict[str, Any]:
        """What a run stores: ``diagnostics`` (every finding) and ``diagnostics_complete``."""
        return {"diagnostics": [asdict(f) for f in self.findings], "diagnostics_complete": self.complete}


def diagnostics_frame(diagnostics: list[Diagnostic]) -> pd.DataFrame:
    return pd.DataFrame(list(diagnostics), columns=list(Diagnostic._fields))


def _summed(frame: pd.DataFrame, name: str) -> tuple[int, int] | None:
    rows = frame[frame.name == name]
    return None if rows.empty else (int(rows["count"].sum()), int(rows.n.sum()))


def _share(count: int, n: int) -> str:
    low, high = clopper_pearson_bounds(count, n, ALPHA / 2)
    return f"{count} of {n} ({count / max(n, 1):.1%}, 95% CI {float(low):.1%}-{float(high):.1%})"


def assess(
    records: list[tuple], diagnostics: list[Diagnostic], *, kinds: dict[str, str], declared_randomized: bool,
    eot_draws: int | None, input_dim: int | None = None, audited_norms: tuple[str, ...] = (),
) -> Assessment:
    """Every diagnostic of a run from its records and probe counts.

    ``kinds`` maps each attack name of the run to its ``Attack.kind``; ``audited_norms`` are the
    norms whose gradient attacks should face a gradient-free one (the norms the run attacked)."""
    frame = records_frame(records)
    probes = diagnostics_frame(diagnostics)
    findings: list[Finding] = []

    def counted(name: str, fires: Callable[[int, int], bool], message: Callable[[int, int], str]) -> None:
        summed = _summed(probes, name)
        if summed is not None:
            count, n = summed
            fired = n > 0 and fires(count, n)
            findings.append(Finding(name, fired, count, n, message(count, n) if fired else ""))

    counted("zero-gradient", lambda k, n: k > GRADIENT_SHARE * n,
            lambda k, n: f"zero-gradient: {_share(k, n)} clean points have an input gradient of exactly 0: gradient "
                         "attacks cannot move them (masked or saturated gradients); trust only gradient-free, "
                         "transfer or BPDA attacks here")
    counted("nonfinite-gradient", lambda k, n: k > 0,
            lambda k, n: f"nonfinite-gradient: {_share(k, n)} clean points have NaN or infinite input gradients: "
                         "gradient attacks are broken on this defense")
    counted("undeclared-randomness", lambda k, n: k > 0,
            lambda k, n: f"undeclared-randomness: the defense's output changed between two calls on the same input "
                         f"for {_share(k, n)} points, but it does not declare randomized = True; its attacks were run "
                         "through EOT and its predictions are noisy (see verdict-flips)")
    counted("unreached", lambda k, n: k > UNREACHED_SHARE * n,
            lambda k, n: f"unreached: a {PROBE_STEPS}-step gradient walk with an L-inf budget of 1 (every image within "
                         f"reach) left {_share(k, n)} correctly classified points right; a working gradient leaves "
                         "about none: gradients are masked")
    flips = _summed(probes[probes.step == CLEAN], "verdict-flips")
    noise = flips[0] / flips[1] if flips and flips[1] else 0.0
    if flips is not None:
        findings.append(Finding("verdict-flips", False, *flips, detail={
            "per_step": [dict(zip(("step", "epsilon", "count", "n"), row)) for row in
                         probes[probes.name == "verdict-flips"].groupby(["step", "epsilon"], sort=False)[["count", "n"]]
                         .sum().reset_index().itertuples(index=False)]}))

    findings += _gradient_free_wins(frame, kinds, noise, audited_norms)

    sanity = sanity_warnings(records, declared_randomized or noise > 0, eot_draws, input_dim)
    for name, marker in (("chance", "clean accuracy"), ("rises-with-epsilon", "rises with epsilon"),
                         ("gray-image", "uniform gray image"), ("eot-1", "--eot-draws 1")):
        fired = [w for w in sanity if marker in w and not w.startswith(STRENGTH_PREFIX)]
        findings.append(Finding(name, bool(fired), message="; ".join(fired)))
    # Strength notes between two gradient attacks are not alarms (the worst case is the figure);
    # gradient-free attacks against gradient ones are gradient-free-wins' business.
    strength = strength_warnings(frame, among=lambda name: kinds.get(name) not in GRADIENT_FREE_KINDS)
    probed = {"zero-gradient", "nonfinite-gradient", "unreached"} <= {f.name for f in findings}
    attacked_norms = set(frame[frame.attack != CLEAN].norm.dropna())
    complete = probed and attacked_norms <= set(audited_norms) and bool(attacked_norms)
    warnings = [f.message for f in findings if f.fired] + strength
    return Assessment(findings, warnings, complete)


def _gradient_free_wins(frame: pd.DataFrame, kinds: dict[str, str], noise: float, norms: tuple[str, ...]) -> list[Finding]:
    """Per audited norm: the epsilon where gradient-free and transfer attacks break the most points
    that every gradient attack of the norm misses."""
    findings = []
    attacked = frame[(frame.attack != CLEAN) & (frame.attack != WORST_CASE)]
    for norm in norms:
        rows = attacked[attacked.norm == norm]
        black = [a for a in rows.attack.unique() if kinds.get(a) in GRADIENT_FREE_KINDS]
        white = [a for a in rows.attack.unique() if kinds.get(a) not in GRADIENT_FREE_KINDS]
        if not black or not white:
            continue
        correct = rows.pivot_table(index=["epsilon", "sample_index"], columns="attack", values="correct", aggfunc="min")
        correct = correct.dropna()
        if correct.empty:
            continue
        missed = (correct[white].min(axis=1) == 1) & (correct[black].min(axis=1) == 0)
        by_epsilon = missed.groupby(level="epsilon").agg(["sum", "size"])
        eps = float((by_epsilon["sum"] / by_epsilon["size"]).idxmax())
        count, n = int(by_epsilon.loc[eps, "sum"]), int(by_epsilon.loc[eps, "size"])
        low, _ = clopper_pearson_bounds(count, n, ALPHA)
        # Significantly more than the margin above the verdict noise: a handful of points that
        # Square finds by luck among a few dozen is not masking.
        fired = float(low) > BLACK_BOX_MARGIN + noise
        message = ""
        if fired:
            at = correct.loc[eps]
            message = (f"gradient-free-wins ({norm}): at {norm} epsilon {eps:g} the gradient-free and transfer attacks "
                       f"({', '.join(sorted(black))}) break {_share(count, n)} points that every gradient attack "
                       f"({', '.join(sorted(white))}) misses (gradient attacks leave {float(at[white].min(axis=1).mean()):.1%}, "
                       f"the worst case {float(at.min(axis=1).mean()):.1%}): the defense masks its gradients; its "
                       "figure is the worst case, and an adaptive attack (bpda-*, EOT) may go lower")
        findings.append(Finding(f"gradient-free-wins-{norm}", fired, count, n, message,
                                {"epsilon": eps, "noise": noise}))
    return findings

"""Attacks: budgets, backend agreement, CW thresholding, EOT, sanity warnings, and the CLI end to end.

One small digits CNN is trained once for the session (conftest's ``digits_baseline``); every attack
runs with few steps on a few dozen images so the file stays fast on 2 shared CPU cores.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench.attacks import EOT
from bench.types import Norm
from bench.attacks.cw import CarliniWagnerL2, CarliniWagnerLinf, CWL2Params, CWLinfParams
from bench.provenance import seed_everything
from bench.attacks.pgd import L2PGD, LinfPGD, PGDParams
from bench.errors import BenchError
from bench.metrics import sanity_warnings

from conftest import FAST
from helpers import float32_sum_tolerance, perturbation_tolerance


@pytest.fixture(scope="module")
def model(digits_baseline):
    # The session's shared baseline (tests/conftest.py); one thread per process is set there too.
    return digits_baseline.attack_model().eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


FAST_ATTACKS = [
    (LinfPGD, PGDParams(steps=5, restarts=1), "foolbox"),
    (LinfPGD, PGDParams(steps=5, restarts=2), "art"),
    (L2PGD, PGDParams(steps=5, restarts=2), "foolbox"),
    (L2PGD, PGDParams(steps=5, restarts=1), "art"),
    (CarliniWagnerL2, CWL2Params(binary_search_steps=2, steps=10, learning_rate=0.05, initial_const=1.0), "foolbox"),
    (CarliniWagnerL2, CWL2Params(binary_search_steps=2, steps=10, learning_rate=0.05, initial_const=1.0), "art"),
    (CarliniWagnerLinf, CWLinfParams(steps=5, learning_rate=0.1, initial_const=1.0, decrease_factor=0.5), "art"),
]


@pytest.mark.parametrize("attack_class, params, backend", FAST_ATTACKS, ids=lambda v: getattr(v, "name", None))
def test_adversarials_stay_in_the_box_and_the_budget(model, digits, attack_class, params, backend):
    count = 4 if attack_class is CarliniWagnerLinf else 24  # ART's CW-Linf runs one image at a time
    x, y = digits.x_test[:count], digits.y_test[:count]
    epsilons = [0.0, 0.05, 0.5] if attack_class.norm == "linf" else [0.0, 0.5, 2.0]
    attack = attack_class(params, backend=backend)
    adversarials = attack.run(model, x, y, epsilons)
    assert len(adversarials) == len(epsilons)
    for eps, x_adv in zip(epsilons, adversarials):
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert Norm(attack.norm).size(x_adv - x).max() <= eps + perturbation_tolerance(eps, attack.norm, x[0].numel())
    assert torch.equal(adversarials[0], x)
    assert accuracy(model, adversarials[-1], y) < accuracy(model, x, y)


def test_foolbox_and_art_pgd_agree(model, digits):
    x, y = digits.x_test[:128], digits.y_test[:128]
    epsilons = [0.05, 0.1, 0.2]
    results = {}
    for backend in ("foolbox", "art"):
        torch.manual_seed(0)
        # One walk each: the backends are compared, not the restarts (both share the restart loop).
        adversarials = LinfPGD(PGDParams(steps=10, restarts=1), backend=backend).run(model, x, y, epsilons)
        results[backend] = [accuracy(model, x_adv, y) for x_adv in adversarials]
    for fb, art in zip(results["foolbox"], results["art"]):
        assert abs(fb - art) <= 0.06, results


class RowCounter(nn.Module):
    """The wrapped model, recording how many rows each forward pass gets."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("backend", ["foolbox", "art"])
def test_pgd_restarts_run_only_on_points_still_robust(model, digits, backend):
    """Restart k+1 walks only the points no earlier walk broke; a point broken by the first walk
    keeps that walk's adversarial (same seed: the first walk is the same walk)."""
    x, y = digits.x_test[:128], digits.y_test[:128]
    eps, steps = 0.12, 5
    seed_everything(0)  # torch draws foolbox's random starts, numpy ART's
    one = LinfPGD(PGDParams(steps=steps, restarts=1), backend=backend, chunk_size=len(x)).run(model, x, y, [eps])[0]
    robust_after_one = accuracy(model, one, y)
    assert 0 < robust_after_one < 1  # some points break, some are left for the restarts
    counter = RowCounter(model).eval()
    seed_everything(0)
    three = LinfPGD(PGDParams(steps=steps, restarts=6), backend=backend, chunk_size=len(x)).run(counter, x, y, [eps])[0]
    with torch.no_grad():
        broken_by_one = model(one).argmax(1) != y
    assert torch.equal(three[broken_by_one], one[broken_by_one])
    assert accuracy(model, three, y) <= robust_after_one
    # The first walk passes over the points the model gets right unattacked (ART first asks one row
    # for the class count); every later pass sees only the points the first walk left robust,
    # fewer as later walks break some.
    with torch.no_grad():
        right = int((model(x).argmax(1) == y).sum())
    rows = counter.rows[counter.rows.index(right):-1]  # the last pass: the sweep's verdict on all attacked
    later = rows[next(i for i, n in enumerate(rows) if n < right):]
    assert later[0] == round(robust_after_one * len(x))
    assert later == sorted(later, reverse=True) and later[-1] < later[0]


def test_pgd_restarts_follow_the_defenses_rule_not_the_models_argmax(model, digits):
    """Which points get another walk is the defense's verdict (``predict``), e.g. PixelDP's
    300-draw rule, not the attacked model's argmax."""
    x, y = digits.x_test[:32], digits.y_test[:32]

    def passes(restarts: int, label: int) -> int:
        counter = RowCounter(model).eval()
        LinfPGD(PGDParams(steps=2, restarts=restarts)).run(
            counter, x, y, [0.3], predict=lambda inputs: torch.full((len(inputs),), label))
        return sum(counter.rows)

    assert passes(4, -1) == 0  # the rule calls every point wrong even unattacked: nothing is attacked
    assert 0 in y and (y != 0).any()
    # The rule says "label 0" everywhere: the points of class 0 are right, stay robust and get all
    # 4 walks, whatever the model's argmax says; the others are wrong unattacked and get none.
    one_walk = passes(1, 0)
    assert one_walk == 2 * int((y == 0).sum())  # 2 steps, one forward pass each, class 0 only
    assert passes(4, 0) == 4 * one_walk


def test_pgd_costs_one_forward_and_one_backward_pass_per_step_and_chunk(model, digits):
    """One walk is what `bench perf` compares with a hand-written loop: no success check, no
    weight gradients."""
    counted = {"forward": 0, "backward": 0}
    first_layer = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    hooks = [model.register_forward_hook(lambda *_: counted.__setitem__("forward", counted["forward"] + 1)),
             first_layer.register_full_backward_hook(lambda *_: counted.__setitem__("backward", counted["backward"] + 1))]
    weights = [p.requires_grad for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    try:
        LinfPGD(PGDParams(steps=3, restarts=1), chunk_size=8).run(model, digits.x_test[:20], digits.y_test[:20], [0.1])
    finally:
        for hook in hooks:
            hook.remove()
    # 3 steps x 3 chunks (8, 8, 4), and per chunk the sweep's two verdicts (unattacked, attacked)
    assert counted == {"forward": 3 * 3 + 2 * 3, "backward": 3 * 3}
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert [p.requires_grad for p in model.parameters()] == weights


def test_cw_minimal_norms_match_thresholded_accuracy(model, digits):
    x, y = digits.x_test[:48], digits.y_test[:48]
    attack = CarliniWagnerL2(CWL2Params(binary_search_steps=3, steps=20, learning_rate=0.05, initial_const=0.001))
    smallest = attack.smallest_adversarials(model, x, y)
    norms = Norm("l2").size(smallest - x)
    with torch.no_grad():
        clean_correct = model(x).argmax(1) == y
        broken = (model(smallest).argmax(1) != y) & clean_correct
    assert broken.any()
    epsilons = [0.25, 0.5, 1.0, 2.0, 4.0]
    accuracies = [accuracy(model, x_adv, y) for x_adv in attack.run(model, x, y, epsilons)]
    for eps, acc in zip(epsilons, accuracies):
        # PixelDP's definition: correct points whose smallest successful perturbation exceeds eps.
        expected = float((clean_correct & ~(broken & (norms <= eps))).float().mean())
        assert acc == expected  # both count the same points over the same 48: exact
    assert accuracies == sorted(accuracies, reverse=True)


def test_cw_failures_stay_clean(model, digits):
    """foolbox returns an all-zero image where CW fails; those points must stay clean (not broken)."""
    x, y = digits.x_test[:32], digits.y_test[:32]
    weak = CarliniWagnerL2(CWL2Params(binary_search_steps=1, steps=2, learning_rate=0.001, initial_const=1e-4))
    smallest = weak.smallest_adversarials(model, x, y)
    with torch.no_grad():
        failed = model(smallest).argmax(1) == y
    assert failed.sum() > 0
    assert torch.equal(smallest[failed], x[failed])
    at_large = weak.run(model, x, y, [100.0])[0]
    assert accuracy(model, at_large, y) >= float(failed.float().mean())


class FlipNoise(nn.Module):
    """A randomized model whose noise misleads single-draw gradients.

    With probability ``p`` a draw returns ``-alpha * logits``: nearly uniform scores, so the
    expected prediction (what the defense predicts) is still the clean one, but the gradient of
    such a draw points the wrong way; with p = 0.7 most single-draw PGD steps walk back. The mean
    over draws is dominated by the honest draws' scores, so EOT follows the right direction.
    """

    def __init__(self, model: nn.Module, p: float = 0.7, alpha: float = 0.001):
        super().__init__()
        self.model, self.p, self.alpha = model, p, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        flip = torch.rand(len(x), 1) < self.p
        return torch.where(flip, -self.alpha * logits, logits)

    @torch.no_grad()
    def expected_prediction(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        scores = (1 - self.p) * logits.softmax(1) + self.p * (-self.alpha * logits).softmax(1)
        return scores.argmax(1)


def test_eot_breaks_what_single_draw_gradients_miss(model, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    noisy = FlipNoise(model)
    attack = LinfPGD(PGDParams(steps=10, restarts=1))  # one walk: EOT, not restarts, must make the difference
    results = {}
    for draws in (1, 10):
        torch.manual_seed(0)
        x_adv = attack.run(EOT(noisy, draws), x, y, [0.1])[0]
        results[draws] = float((noisy.expected_prediction(x_adv) == y).float().mean())
    clean = float((noisy.expected_prediction(x) == y).float().mean())
    assert results[10] <= results[1] - 0.2, (clean, results)


def test_eot_is_the_log_mean_softmax(model, digits):
    x = digits.x_test[:5]

    class Alternating(nn.Module):
        # Deterministic stand-in for noise: the k-th call scales logits by k; keeps what it returned.
        def __init__(self):
            super().__init__()
            self.outputs = []

        def forward(self, inputs):
            self.outputs.append(model(inputs) * (len(self.outputs) + 1))
            return self.outputs[-1]

    noise = Alternating()
    eot = EOT(noise, draws=4, max_batch=10)  # two draws per call
    with torch.no_grad():
        out = eot(x)
    # Draws 1, 2 come from the first call (scale 1), draws 3, 4 from the second (scale 2).
    assert len(noise.outputs) == 2 and all(o.shape == (10, 10) for o in noise.outputs)
    draws = torch.cat(noise.outputs).view(4, len(x), -1)  # draw-major rows
    # The reference in float64 from the very logits EOT saw: the comparison carries only EOT's own
    # float32 rounding (log_softmax over 10 classes, logsumexp over 4 draws, minus log 4: n + 4 terms),
    # relative to the spread of the logits it exponentiates.
    expected = draws.double().softmax(2).mean(0).log()
    spread = float((draws.max(2).values - draws.min(2).values).max())
    tolerance = float32_sum_tolerance(draws.shape[2] + len(draws) + 4) * (1 + spread)
    assert (out.double() - expected).abs().max() <= tolerance
    assert not eot.training  # foolbox warns about models in training mode


def test_undefended_model_goes_to_zero_at_large_epsilon(model, digits):
    x, y = digits.x_test[:64], digits.y_test[:64]
    x_adv = LinfPGD(PGDParams(steps=10)).run(model, x, y, [0.3])[0]
    assert accuracy(model, x_adv, y) <= 0.05


def test_cw_linf_has_no_foolbox_backend():
    with pytest.raises(BenchError, match="art"):
        CarliniWagnerLinf(backend="foolbox")


def records(accuracies: dict[float, float], attack: str = "pgd-linf", norm: str = "linf", n: int = 100):
    rows = []
    for i in range(n):
        rows.append((i, "clean", None, 0.0, i % 10, i % 10, 1, None, None, None, None))
        for eps, acc in accuracies.items():
            correct = int(i < acc * n)
            rows.append((i, attack, norm, eps, i % 10, i % 10, correct, eps, None, None, None))
    return rows


def test_sanity_warns_about_clean_accuracy_at_chance():
    rows = records({})  # 100 test inputs, 10 balanced classes, all right

    def right_on_first(count):  # the same records with the prediction right on the first `count` inputs only
        return [row[:4] + (row[5] if row[0] < count else (row[5] + 1) % 10, row[5], int(row[0] < count)) + row[7:]
                for row in rows]

    guessing, learned = right_on_first(19), right_on_first(21)
    # 21 of 100 right is significant at 0.001 against guessing at 0.1 (scipy: binom.sf(20, 100, 0.1) = 0.0008); 19 is not.
    (warning,) = sanity_warnings(guessing, False, None)
    assert warning.startswith("clean accuracy 0.190 <= chance 0.100 (the largest class's share) + 0.100") and "100 test inputs:" in warning
    assert sanity_warnings(learned, False, None) == [] and sanity_warnings(rows, False, None) == []


def test_sanity_warns_about_gradient_masking_at_very_large_epsilon():
    masked = records({0.1: 0.8, 0.5: 0.7})
    assert any("gradient masking" in w for w in sanity_warnings(masked, False, None))
    working = records({0.1: 0.5, 0.5: 0.1})
    assert sanity_warnings(working, False, None) == []
    small = records({0.1: 0.8, 0.3: 0.7})  # 0.3 is not very large in linf: no verdict
    assert sanity_warnings(small, False, None) == []
    l2 = records({1.0: 0.9, 4.0: 0.8}, attack="pgd-l2", norm="l2")  # 0.5 * sqrt(64) = 4
    assert sanity_warnings(l2, False, None) == []  # needs the input dimension
    assert any("gradient masking" in w for w in sanity_warnings(l2, False, None, input_dim=64))
    assert sanity_warnings(l2, False, None, input_dim=784) == []
    assert any("non-adaptive" in w for w in sanity_warnings(working, True, 1))


def test_cli_run_and_json_report(bench, tmp_path):
    code, out, err = bench(
        "run", "--attack", "pgd-linf", "--attack-param", "steps=5", "--epsilons", "0.05,0.3",
        *FAST, "--out", str(tmp_path),
    )
    assert code == 0, err
    assert "pgd-linf" in out
    code, out, err = bench("report", "--results", str(tmp_path), "--format", "json")
    assert code == 0, err
    rows = [r for r in json.loads(out)["accuracy_under_attack"] if r["attack"] == "pgd-linf"]
    by_epsilon = {r["epsilon"]: r for r in rows}
    assert sorted(by_epsilon) == [0.0, 0.05, 0.3]
    assert all(r["norm"] == "linf" and r["n"] == 60 for r in rows)
    assert by_epsilon[0.3]["accuracy"] <= by_epsilon[0.05]["accuracy"] <= by_epsilon[0.0]["accuracy"]
    assert by_epsilon[0.3]["accuracy"] <= 0.2

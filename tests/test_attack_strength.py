"""AutoAttack (standard cascade and rand), FMN, CW through EOT and the strength check.

A small digits CNN is trained once for the module; attacks run with few steps and queries
(parameters, not code paths) on a few dozen images.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.attacks import EOT
from bench.types import Norm
from bench.attacks import autoattack
from bench.attacks.autoattack import AutoAttackParams, L2AutoAttack, LinfAutoAttack
from bench.attacks.cw import CarliniWagnerL2, CWL2Params
from bench.attacks.fmn import FMNParams, L2FMN, LinfFMN
from bench.attacks.pgd import L2PGD, LinfPGD, PGDParams
from bench.datasets.digits import load_digits
from bench.defenses.baseline import Baseline
from bench.defenses.pixeldp import PixelDP
from bench.metrics import records_frame, sanity_warnings, strength_warnings
from bench.models import build_model
from bench.training import TrainConfig

from conftest import FAST
from helpers import float32_sum_tolerance, perturbation_tolerance

SMALL_AA = AutoAttackParams(steps=5, target_classes=2, square_queries=30)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def model(digits, one_thread):
    torch.manual_seed(0)
    net = build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std)
    defense = Baseline(net)
    defense.fit(digits.x_train[:800], digits.y_train[:800], TrainConfig(epochs=6, seed=0))
    return defense.attack_model().eval()


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1) == y


@pytest.mark.parametrize("attack_class, eps", [(LinfAutoAttack, 0.1), (L2AutoAttack, 0.5)])
def test_autoattack_is_at_most_pgd_and_stays_in_budget(model, digits, attack_class, eps):
    x, y = digits.x_test[:24], digits.y_test[:24]
    torch.manual_seed(0)
    x_aa = attack_class(SMALL_AA).run(model, x, y, [0.0, eps])
    pgd_class = LinfPGD if attack_class.norm == "linf" else L2PGD
    x_pgd = pgd_class(PGDParams(steps=5, restarts=1)).run(model, x, y, [eps])[0]
    assert torch.equal(x_aa[0], x)
    assert Norm(attack_class.norm).size(x_aa[1] - x).max() <= eps + perturbation_tolerance(
        eps, attack_class.norm, x[0].numel())
    assert x_aa[1].min() >= 0 and x_aa[1].max() <= 1
    aa, pgd = correct(model, x_aa[1], y), correct(model, x_pgd, y)
    assert aa.float().mean() <= pgd.float().mean()
    assert aa.float().mean() < correct(model, x, y).float().mean()


def test_cascade_attacks_only_points_still_robust(monkeypatch):
    """Stage 1 breaks every other point it sees; stage 2 must see exactly the rest, and a point
    keeps the adversarial of the first stage that broke it."""
    torch.manual_seed(0)
    x = torch.rand(10, 1, 2, 2) * 0.5 + 0.25
    y = torch.ones(10, dtype=torch.long)
    y[[3, 7]] = 2  # misclassified from the start: never attacked
    originals = x.clone()

    def predict(inputs):  # label 1 on an untouched original, 0 on anything changed
        untouched = (inputs.unsqueeze(1) == originals.unsqueeze(0)).flatten(2).all(2).any(1)
        return torch.where(untouched, 1, 0)

    seen = {}

    def breaks_every_other(model, xs, ys, eps, norm, params, classes):
        # Two candidates, best first: the first breaks nothing, so the cascade must fall back to
        # the second where the first is not confirmed.
        seen["first"] = xs.clone()
        out = xs.clone()
        out[::2] += eps
        return [xs.clone(), out]

    def breaks_all(model, xs, ys, eps, norm, params, classes):
        # The first candidate breaks every point: the second (which would move them the other
        # way) must not replace it.
        seen["second"] = xs.clone()
        return [xs - eps, xs + eps / 2]

    monkeypatch.setitem(autoattack.COMPONENTS, "apgd-ce", breaks_every_other)
    monkeypatch.setitem(autoattack.COMPONENTS, "apgd-t", breaks_all)
    attack = LinfAutoAttack(AutoAttackParams(attacks="apgd-ce,apgd-t"))
    (x_adv,) = attack.run(nn.Flatten(), x, y, [0.1], predict=predict)
    robust_at_start = torch.tensor([i for i in range(10) if i not in (3, 7)])
    assert torch.equal(seen["first"], x[robust_at_start])
    assert torch.equal(seen["second"], x[robust_at_start[1::2]])
    assert torch.allclose(x_adv[robust_at_start[::2]], x[robust_at_start[::2]] + 0.1)
    assert torch.allclose(x_adv[robust_at_start[1::2]], x[robust_at_start[1::2]] - 0.1)
    assert torch.equal(x_adv[[3, 7]], x[[3, 7]])


def test_unconfirmed_points_keep_the_latest_candidate_only_on_randomized_models(model, digits, monkeypatch):
    """Where the defense's rule confirms no candidate, a deterministic defense keeps the clean
    input (as the reference does) and a randomized one the latest candidate (its expected
    accuracy counts every call of the noisy rule)."""
    x, y = digits.x_test[:8], torch.zeros(8, dtype=torch.long)
    monkeypatch.setitem(autoattack.COMPONENTS, "apgd-ce", lambda m, xs, ys, eps, *rest: [xs + eps, xs - eps])
    never_broken = lambda inputs: torch.zeros(len(inputs), dtype=torch.long)  # noqa: E731
    attack = LinfAutoAttack(AutoAttackParams(attacks="apgd-ce"))
    (deterministic,) = attack.run(model, x, y, [0.01], predict=never_broken)
    (randomized,) = attack.run(EOT(model, draws=2), x, y, [0.01], predict=never_broken)
    assert torch.equal(deterministic, x)
    # two float32 roundings (the stage's subtraction, the projection's) on values in [0,1]
    assert torch.allclose(randomized, (x - 0.01).clamp(0, 1), rtol=0, atol=float32_sum_tolerance(2))


def test_rand_version_is_chosen_for_eot_models_and_gets_the_draws(model, digits, monkeypatch):
    calls = []

    def record(name):
        def component(m, xs, ys, eps, norm, params, classes):
            calls.append((name, m))
            return [xs]
        return component

    for name in autoattack.COMPONENTS:
        monkeypatch.setitem(autoattack.COMPONENTS, name, record(name))
    x, y = digits.x_test[:8], digits.y_test[:8]
    LinfAutoAttack().run(model, x, y, [0.1])
    assert [name for name, _ in calls] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    calls.clear()
    eot = EOT(model, draws=20)
    LinfAutoAttack().run(eot, x, y, [0.1])
    assert [name for name, _ in calls] == ["apgd-ce", "apgd-dlr", "pgd-margin"]
    assert all(m is eot and m.draws == 20 for _, m in calls)
    calls.clear()
    LinfAutoAttack(AutoAttackParams(version="standard")).run(eot, x, y, [0.1])
    assert [name for name, _ in calls] == ["apgd-ce", "apgd-t", "fab-t", "square"]


@pytest.mark.parametrize("attack_class, eps", [(LinfAutoAttack, 0.1), (L2AutoAttack, 0.5)])
def test_rand_versions_margin_walk_breaks_points_within_budget(model, digits, attack_class, eps):
    """The margin walk alone (the rand version's third stage) is a real attack: on the digits
    CNN it breaks a large share of the points (PGD at these budgets leaves about 55%) and every
    adversarial stays in the ball and in [0,1]."""
    x, y = digits.x_test[:64], digits.y_test[:64]
    (x_adv,) = attack_class(AutoAttackParams(attacks="pgd-margin", steps=20)).run(model, x, y, [eps])
    with torch.no_grad():
        clean, attacked = (float((model(inputs).argmax(1) == y).float().mean()) for inputs in (x, x_adv))
    assert attacked <= clean - 0.2
    assert float(Norm(attack_class.norm).size(x_adv - x).max()) <= eps + perturbation_tolerance(
        eps, attack_class.norm, x[0].numel())
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


@pytest.mark.parametrize("attack_class, epsilons", [(L2FMN, [0.25, 0.5, 1.0, 2.0]), (LinfFMN, [0.02, 0.05, 0.1, 0.3])])
def test_fmn_distances_match_thresholded_accuracy(model, digits, attack_class, epsilons):
    x, y = digits.x_test[:24], digits.y_test[:24]
    attack = attack_class(FMNParams(steps=20))
    smallest = attack.smallest_adversarials(model, x, y)
    norms = Norm(attack.norm).size(smallest - x)
    clean = correct(model, x, y)
    broken = clean & ~correct(model, smallest, y)
    assert broken.float().mean() >= 0.5
    accuracies = [float(correct(model, a, y).float().mean()) for a in attack.run(model, x, y, epsilons)]
    for eps, acc in zip(epsilons, accuracies):
        assert acc == pytest.approx(float((clean & ~(broken & (norms <= eps))).float().mean()))
    assert accuracies == sorted(accuracies, reverse=True)


def test_cw_breaks_pixeldp_at_large_l2():
    """Through EOT, judged by PixelDP's own 50-draw prediction. Two classes, dark and bright
    images: their means are 0.25 apart in every pixel, so an L2 step of 3 (0.375 per pixel on
    average) crosses from either side and a working attack can break every point. The noise keeps
    the expected top probability near 0.53, so CW's minimal adversarials sit on a boundary that
    fresh draws flip back about half the time: confirmed outward by the defense's rule."""
    torch.manual_seed(0)
    defense = PixelDP(build_model("digits-cnn", (1, 8, 8), 2, (0.5,), (0.3,)), PixelDP.Params(L=0.1, draws=50))
    y = torch.arange(96) % 2
    x = torch.rand(96, 1, 8, 8) * 0.5 + 0.5 * y.view(-1, 1, 1, 1)
    defense.fit(x, y, TrainConfig(epochs=4, batch_size=16, seed=0))
    x, y = x[:16], y[:16]
    assert float((defense.predict(x) == y).float().mean()) >= 0.9
    attack = CarliniWagnerL2(CWL2Params(binary_search_steps=3, steps=30, learning_rate=0.05, initial_const=1.0))
    torch.manual_seed(0)
    small, large = attack.run(EOT(defense.attack_model(), 8), x, y, [0.1, 3.0], predict=defense.predict)
    # Without the outward confirmation half the points flip back (0.5 measured); with it at least 70% break.
    assert float((defense.predict(large) == y).float().mean()) <= 0.3
    assert float((defense.predict(small) == y).float().mean()) >= 0.9  # 0.1 is far too small to cross


def frame(correct_by_attack: dict[str, list[int]], norm: str = "linf", eps: float = 0.1):
    n = len(next(iter(correct_by_attack.values())))
    rows = [(i, "clean", None, 0.0, 0, 0, 1, None, None, None, None) for i in range(n)]
    for attack, flags in correct_by_attack.items():
        rows += [(i, attack, norm, eps, 0, 0, c, eps, None, None, None) for i, c in enumerate(flags)]
    return rows


def test_strength_warning_names_both_figures_when_attacks_disagree():
    pgd = [1] * 50 + [0] * 50  # 50.0%
    stronger = [1] * 40 + [0] * 60  # breaks 10 points pgd misses: 40.0%
    warnings = sanity_warnings(frame({"pgd-linf": pgd, "autoattack-linf": stronger}), False, None)
    (warning,) = [w for w in warnings if w.startswith("attack strength")]
    assert "pgd-linf leaves 50.0%" in warning and "autoattack-linf: 40.0%" in warning and "40.0%" in warning
    one_point = [1] * 49 + [0] * 51  # 1 point apart: not above the margin
    assert strength_warnings(records_frame(frame({"pgd-linf": pgd, "autoattack-linf": one_point}))) == []
    other_norm = frame({"pgd-l2": pgd}, norm="l2")  # different norms never compare
    assert strength_warnings(records_frame(frame({"pgd-linf": stronger}) + other_norm[100:])) == []


def test_html_report_shows_the_strength_warning_beside_the_table(bench, tmp_path):
    code, _, err = bench(
        "run", "--attack", "pgd-linf", "--attack-param", "pgd-linf.steps=1", "--attack-param", "pgd-linf.rel_stepsize=0.05",
        "--attack", "fmn-linf", "--attack-param", "fmn-linf.steps=20", "--epsilons", "0.1", *FAST, "--out", str(tmp_path),
    )
    assert code == 0, err
    code, _, err = bench("report", "--results", str(tmp_path), "--out", str(tmp_path / "report"))
    assert code == 0, err
    page = (tmp_path / "report" / "report.html").read_text()
    table = page.index("Accuracy under attack: digits")
    warning = page.index("attack strength (linf)", table)
    assert warning < page.index("<h3>", table + 1) or page.find("<h3>", table + 1) == -1
    assert "pgd-linf leaves" in page

"""RobustOpt: soundness of the certificates against a strong PGD, the per-input epsilon and
layer rewrites against the library's own scalar bounds, refusals, and the CLI."""
from __future__ import annotations

import pytest
import torch

from bench.attacks.pgd import L2PGD, LinfPGD
from bench.errors import BenchError
from bench.models import build_model
from bench.registry import DATASETS
from bench.training import TrainConfig
from conftest import FAST
from bench.defenses.robustopt import RobustOpt, upper_margins


def trained(norm: str, epsilon: float) -> tuple[RobustOpt, torch.Tensor, torch.Tensor]:
    data = DATASETS.get("digits")()
    torch.manual_seed(0)
    model = build_model("wk-small", data.shape, 10, data.mean, data.std)
    params = RobustOpt.Params(norm=norm, epsilon=epsilon, ramp_epochs=1, max_radius=2 * epsilon, bisection_steps=2)
    defense = RobustOpt(model, params)
    defense.fit(data.x_train[:400], data.y_train[:400], TrainConfig(epochs=3))
    return defense, data.x_test[:48], data.y_test[:48]


@pytest.mark.parametrize("norm,epsilon,attack", [("linf", 0.1, LinfPGD), ("l2", 0.5, L2PGD)])
def test_strong_pgd_never_breaks_a_certified_radius(norm, epsilon, attack):
    defense, x, _ = trained(norm, epsilon)
    certificate = defense.certify(x)
    assert certificate.norm == norm
    certified = certificate.radius > 0
    assert certified.sum() >= 10  # enough certified points for the check to mean something
    # Two bisection steps on [0, 2 epsilon]: radii are multiples of epsilon / 2, few PGD runs.
    pgd = attack(attack.Params(steps=40, restarts=5))
    for radius in certificate.radius[certified].unique():
        chosen = certificate.radius == radius
        labels = certificate.label[chosen]
        x_adv = pgd.run(defense.attack_model(), x[chosen], labels, [float(radius)])[0]
        assert torch.equal(defense.predict(x_adv), labels), f"PGD broke a certificate at radius {radius:.4f}"


@pytest.mark.parametrize("model_name,norm", [("wk-small", "linf"), ("digits-cnn", "linf"), ("digits-cnn", "l2")])
def test_bounds_are_the_logit_gaps_at_zero_and_per_input_epsilon_matches_scalar(model_name, norm):
    # digits-cnn's 3x3/2 conv on 8x8 goes through the asymmetric-padding rewrite.
    torch.manual_seed(0)
    model = build_model(model_name, (1, 8, 8), 10, (0.3,), (0.4,))
    defense = RobustOpt(model, RobustOpt.Params(norm=norm))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)
        labels = logits.argmax(1)
        net = defense.dual_net(x)
        gaps = logits - logits.gather(1, labels[:, None])
        assert torch.allclose(upper_margins(net, x, labels, 0.0, norm), gaps, atol=1e-5)
        epsilons = torch.tensor([0.0, 0.01, 0.03, 0.05])
        together = upper_margins(net, x, labels, epsilons, norm)
        for i, eps in enumerate(epsilons.tolist()):
            alone = upper_margins(net, x[i:i + 1], labels[i:i + 1], eps, norm)
            assert torch.allclose(together[i], alone[0], atol=1e-5)


def test_unsupported_layers_are_refused_in_one_line():
    model = build_model("wrn-10-1", (3, 8, 8), 10, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(BenchError, match="supports only Conv2d/Linear/ReLU/Flatten") as error:
        RobustOpt(model).dual_net(torch.rand(1, 3, 8, 8))
    assert "\n" not in str(error.value)


def test_epsilon_ramps_up_then_holds():
    defense = RobustOpt(build_model("wk-small", (1, 8, 8), 10, (0.3,), (0.4,)),
                        RobustOpt.Params(epsilon=0.1, start_epsilon=0.01, ramp_epochs=1))
    defense._ramp_steps, defense._step = 10, 0
    assert defense.current_epsilon() == pytest.approx(0.01)
    defense._step = 5
    assert defense.current_epsilon() == pytest.approx(0.055)
    defense._step = 10
    assert defense.current_epsilon() == pytest.approx(0.1)


def test_cli_end_to_end(bench, tmp_path):
    code, out, err = bench(
        "run", "--defense", "robustopt", *FAST, "--attack", "pgd-linf", "--epsilons", "0.05",
        "--attack-param", "steps=5", "--param", "bisection_steps=2", "--out", str(tmp_path),
    )
    assert code == 0, err
    assert "robustopt" in out and "linf" in out

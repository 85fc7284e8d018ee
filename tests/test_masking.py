"""A zoo of defenses known to be broken (Athalye et al. 2018), written as plug-ins the way a user
writes them: the default evaluation must flag every one of them, and must not flag the honest ones.

Each broken defense wraps the same trained digits CNN and hides its gradients in one of the ways
Athalye et al. name: input quantization (shattered: zero almost everywhere), preprocessing outside
autograd, saturated logits, a random transformation that does not declare itself randomized
(stochastic), shattered gradients (a tiny high-frequency term whose derivative swamps the
model's), vanishing gradients (a saturating squash) and exploding gradients (a square root at 0).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import bench
from bench.attacks.audit import StraightThrough
from bench.defenses.base import Defense
from bench.models import build_model
from bench.registry import DEFENSES

SETTINGS = dict(epsilons=[0.1], test_size=100, attack_params={"restarts": 1, "square-linf.queries": 300})


def quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 4) / 4


class Preprocessed(nn.Module):
    def __init__(self, preprocess, model: nn.Module):
        super().__init__()
        self.preprocess, self.model = preprocess, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


class Broken(Defense):
    """Base of the zoo: the trained model behind a preprocessing step."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attack_model(self) -> nn.Module:
        return Preprocessed(self.preprocess, self.model).eval()


@DEFENSES.register("test-quantized")
class Quantized(Broken):
    """Bit-depth reduction to 5 levels (zero gradient almost everywhere); offers a BPDA approximation."""

    def preprocess(self, x):
        return quantize(x)

    def bpda_model(self):
        return StraightThrough(quantize, self.model)


@DEFENSES.register("test-outside-autograd")
class OutsideAutograd(Broken):
    """A blur computed in numpy: autograd never sees the input."""

    def preprocess(self, x):
        array = x.detach().cpu().numpy()
        blurred = (array + np.roll(array, 1, axis=-1) + np.roll(array, -1, axis=-1)) / 3
        return torch.from_numpy(blurred.astype(np.float32))


@DEFENSES.register("test-saturated")
class Saturated(Defense):
    """Logits scaled by 1e4: the softmax saturates and the cross-entropy gradient is 0."""

    def attack_model(self):
        return nn.Sequential(self.model, Scale(1e4)).eval()


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


@DEFENSES.register("test-undeclared-random")
class UndeclaredRandom(Broken):
    """Random pixel noise on every call, without ``randomized = True``."""

    def preprocess(self, x):
        return (x + 0.3 * torch.randn_like(x)).clamp(0, 1)


@DEFENSES.register("test-shattered")
class Shattered(Broken):
    """A term of size 1e-3 whose derivative (1e3 cos) drowns the model's gradient."""

    def preprocess(self, x):
        return x + 1e-3 * torch.sin(1e6 * x)


@DEFENSES.register("test-vanishing")
class Vanishing(Broken):
    """Binarisation by a steep sigmoid: its derivative underflows to 0 away from 0.5."""

    def preprocess(self, x):
        return torch.sigmoid(200 * (x - 0.5))


@DEFENSES.register("test-exploding")
class Exploding(Broken):
    """The identity in value, with the gradient of a square root: infinite at the black pixels."""

    def preprocess(self, x):
        root = torch.sqrt(x)
        return x + 1e-3 * (root - root.detach())


@pytest.fixture(scope="module")
def trained():
    dataset = bench.load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("digits-cnn", dataset.shape, dataset.num_classes, dataset.mean, dataset.std)
    bench.train(model, "digits", epochs=10)
    return model.eval()


def diagnostics(results) -> dict:
    return {d["name"]: d for d in results.runs["info"][0]["diagnostics"]}


def headline(results) -> float:
    table = results.accuracy_under_attack
    return float(table[(table.attack == "worst-case") & (table.epsilon == 0.1)].accuracy.iloc[0])


@pytest.mark.parametrize("name, expected", [
    ("test-quantized", {"zero-gradient", "unreached"}),
    ("test-outside-autograd", {"zero-gradient", "unreached"}),
    ("test-saturated", {"zero-gradient", "unreached"}),
    ("test-undeclared-random", {"undeclared-randomness"}),
    ("test-shattered", {"gradient-free-wins-linf"}),
    ("test-vanishing", {"unreached"}),  # tiny (denormal) gradients, not zero ones
    ("test-exploding", {"nonfinite-gradient"}),
])
def test_the_default_evaluation_flags_every_broken_defense(trained, name, expected):
    results = bench.evaluate(bench.wrap(name, trained), "digits", ["pgd-linf"], **SETTINGS)
    found = diagnostics(results)
    fired = {n for n, d in found.items() if d["fired"]}
    assert expected <= fired, found
    assert results.runs["config"][0].endswith("⚠ FLAGGED")
    assert results.tables["diagnostics"].verdict[0] == "flagged"
    assert all(found[n]["message"] in results.warnings for n in fired)


def test_the_honest_baseline_is_not_flagged_and_bpda_brings_quantization_down(trained):
    honest = bench.evaluate(trained, "digits", ["pgd-linf"], **SETTINGS)
    assert not any(d["fired"] for d in diagnostics(honest).values()), diagnostics(honest)
    assert honest.tables["diagnostics"].verdict[0] == "clean"
    # The adaptive attack by name: BPDA through the straight-through approximation the adapter offers.
    quantized = bench.wrap("test-quantized", trained)
    adaptive = bench.evaluate(quantized, "digits", ["bpda-linf"], epsilons=[0.1], test_size=100, audit=False)
    table = adaptive.accuracy_under_attack
    bpda = float(table[(table.attack == "bpda-linf") & (table.epsilon == 0.1)].accuracy.iloc[0])
    plain = bench.evaluate(quantized, "digits", ["pgd-linf"], epsilons=[0.1], test_size=100,
                           attack_params={"restarts": 1}, audit=False)
    masked = float(plain.accuracy_under_attack.query("epsilon == 0.1").accuracy.iloc[0])
    assert bpda < masked - 0.1  # PGD alone is fooled by the quantization; BPDA is not


def test_a_flagged_run_is_named_in_every_output_also_on_a_rerun(tmp_path, capsys):
    from bench.cli import main

    run = ["run", "--defense", "test-quantized", "--attack", "pgd-linf", "--epsilons", "0.1", "--test-size", "60",
           "--epochs", "5", "--attack-param", "restarts=1", "--attack-param", "square-linf.queries=200",
           "--out", str(tmp_path), "--quiet"]
    for attempt in ("first", "rerun"):  # the rerun has nothing to do and must say it all the same
        assert main(run) == 0
        out = capsys.readouterr().out
        assert "test-quantized ⚠ FLAGGED" in out.split("## Diagnostics")[0]  # in the tables
        diagnostics = out.split("## Diagnostics")[1]
        assert "- digits · test-quantized ⚠ FLAGGED:" in diagnostics and "zero-gradient:" in diagnostics, attempt
    assert main(["report", "--results", str(tmp_path), "--format", "md"]) == 0
    assert "zero-gradient:" in capsys.readouterr().out.split("## Diagnostics")[1]
    assert main(["report", "--results", str(tmp_path), "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["diagnostics"]
    assert row["verdict"] == "flagged" and "zero-gradient" in row["fired"]
    assert main(["report", "--results", str(tmp_path), "--format", "csv", "--table", "diagnostics"]) == 0
    (row,) = pd.read_csv(io.StringIO(capsys.readouterr().out)).itertuples()
    assert row.verdict == "flagged" and any(m.startswith("zero-gradient:") for m in json.loads(row.messages))
    assert main(["report", "--results", str(tmp_path), "--format", "robustbench"]) == 0
    assert {card["diagnostics"] for card in json.loads(capsys.readouterr().out)} == {"flagged"}
    assert main(["report", "--results", str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    first_section = page.split('<h2 id="warnings">')[1].split("<h2")[0]
    assert 'class="alarm"' in first_section and "zero-gradient:" in first_section
    assert '<span class="flag">⚠ FLAGGED</span>' in page.split('<h2 id="tables">')[1]
    assert "no diagnostic fired" not in page


# -- the verdict of a point, its noise, and the assessment on records whose answer is known ----------
def test_a_point_wrong_on_its_clean_input_is_robust_at_no_epsilon():
    from bench.metrics import accuracy_under_attack, records_frame
    from bench.types import Record

    def record(index, attack, correct, epsilon=0.0):
        return Record(index, attack, None if attack == "clean" else "linf", epsilon, correct and 1 or 2, 1,
                      int(correct), None, None, None, None)

    # point 0: right clean, right attacked; point 1: wrong clean, "right" attacked (a lucky call)
    rows = [record(0, "clean", True), record(1, "clean", False),
            record(0, "pgd-linf", True, 0.1), record(1, "pgd-linf", True, 0.1)]
    table = accuracy_under_attack(records_frame(rows))
    assert table.set_index("epsilon").accuracy.to_dict() == {0.0: 0.5, 0.1: 0.5}


@DEFENSES.register("test-noisy")
class Noisy(Broken):
    """An honest randomized defense: pixel noise on every call, declared; one draw per prediction."""

    randomized = True

    def preprocess(self, x):
        return (x + 0.5 * torch.randn_like(x)).clamp(0, 1)


def test_a_randomized_defense_reports_how_often_its_verdict_flips(trained):
    results = bench.evaluate(bench.wrap("test-noisy", trained), "digits", ["pgd-l2"], epsilons=[0.5], test_size=40,
                             eot_draws=2, attack_params={"steps": 3, "restarts": 1}, audit=False)
    flips = {d["name"]: d for d in results.runs["info"][0]["diagnostics"]}["verdict-flips"]
    assert flips["n"] == 40 and 0 < flips["count"] <= 40 and not flips["fired"]
    table = results.accuracy_under_attack.set_index("epsilon")
    assert table.verdict_flips[0.0] == flips["count"] / 40
    per_step = {(s["step"], s["epsilon"]): s["count"] / s["n"] for s in flips["detail"]["per_step"]}
    assert table.verdict_flips[0.5] == per_step[("pgd-l2", 0.5)]
    assert results.tables["diagnostics"].verdict_flips[0] == flips["count"] / 40
    from bench.reports.display import display_tables

    (shown,) = [t for name, t in display_tables(results.tables).items() if name.startswith("Accuracy under attack")]
    largest = max(table.verdict_flips[0.0], table.verdict_flips[0.5])
    assert shown.set_index("attack")["verdict flips"]["pgd-l2"] == f"{largest:.1%}"


def test_gradient_free_wins_fires_only_beyond_its_margin_and_the_verdict_noise():
    from bench.diagnostics import BLACK_BOX_MARGIN, Diagnostic, assess
    from bench.types import Record

    n = 200
    kinds = {"pgd-linf": "gradient", "square-linf": "gradient-free"}

    def assessed(extra_broken: int, flips: int = 0):
        rows = [Record(i, "clean", None, 0.0, 1, 1, 1, None, None, None, None) for i in range(n)]
        rows += [Record(i, "pgd-linf", "linf", 0.1, 1, 1, 1, 0.1, None, None, None) for i in range(n)]
        rows += [Record(i, "square-linf", "linf", 0.1, 1, 1, int(i >= extra_broken), 0.1, None, None, None)
                 for i in range(n)]
        probes = [Diagnostic("clean", "verdict-flips", 0.0, flips, n)] if flips else []
        found = assess(rows, probes, kinds=kinds, declared_randomized=bool(flips), eot_draws=20,
                       audited_norms=("linf",))
        return {f.name: f for f in found.findings}["gradient-free-wins-linf"]

    from scipy.stats import beta

    def significant(k: int, noise: float = 0.0) -> bool:  # the rule, computed independently
        return k > 0 and beta.ppf(0.05, k, n - k + 1) > BLACK_BOX_MARGIN + noise

    for k in (0, 4, 8, 12, 20):
        assert assessed(k).fired == significant(k) and assessed(k).count == k
    assert not assessed(4).fired and assessed(12).fired  # 2% of the points is within the margin, 6% is not
    # on a randomized defense whose verdict flips for 10% of the points, 6% is noise
    assert not assessed(12, flips=n // 10).fired and not significant(12, 0.1)


def test_a_flagged_configuration_is_red_in_plot_legends():
    import matplotlib.colors as colors
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from bench.reports.labels import FLAG
    from bench.reports.plots import _legend

    figure = plt.figure()
    _legend(figure, [Line2D([], [], label="baseline"), Line2D([], [], label=f"quantized {FLAG}")], "configuration")
    (legend,) = figure.legends
    shown = {text.get_text(): colors.to_hex(text.get_color()) for text in legend.get_texts()}
    plt.close(figure)
    assert shown[f"quantized {FLAG}"] == "#c00000" and shown["baseline"] != "#c00000"


def test_a_grid_shares_its_baseline_as_the_surrogate_and_two_workers_write_the_serial_records(tmp_path, bench):
    from bench.store import Store

    grid = ["--dataset", "digits", "--defense", "baseline", "--defense", "madry", "--epochs", "3", "--batch-size", "16", "--train-size", "150",
            "--test-size", "20", "--attack", "pgd-linf", "--epsilons", "0.1", "--attack-param", "steps=3",
            "--attack-param", "restarts=1", "--attack-param", "square-linf.queries=50", "--quiet"]
    records = {}
    for jobs in ("1", "2"):
        out = tmp_path / jobs
        code, _, err = bench("run", *grid, "--jobs", jobs, "--out", str(out))
        assert code == 0, err
        # two trainings: the baseline run's checkpoint is madry's surrogate
        assert len(list((out / "checkpoints").glob("*.pt"))) == 2
        store = Store(out)
        names = {run.run_id: run.defense for run in store.runs()}
        frame = store.records()
        frame["run_id"] = frame.run_id.map(names)
        records[jobs] = frame.sort_values(["run_id", "attack", "epsilon", "sample_index"]).reset_index(drop=True)
        assert set(frame.attack) == {"clean", "pgd-linf", "square-linf", "transfer-linf"}
        assert all(run.info["diagnostics_complete"] for run in store.runs())
    __import__("pandas").testing.assert_frame_equal(records["1"], records["2"])


def test_honest_madry_and_pixeldp_raise_no_alarm(tmp_path):
    from bench.cli import main
    from bench.store import Store

    assert main(["run", "--defense", "madry", "--defense", "pixeldp", "--param", "pixeldp.draws=20", "--epochs", "8",
                 "--train-size", "500", "--test-size", "60", "--attack", "pgd-linf", "--attack", "pgd-l2",
                 "--epsilons", "linf=0.1", "--epsilons", "l2=0.5", "--eot-draws", "5", "--attack-param", "restarts=2",
                 "--attack-param", "square-linf.queries=200", "--attack-param", "square-l2.queries=200",
                 "--out", str(tmp_path), "--quiet"]) == 0
    for run in Store(tmp_path).runs():
        fired = [d["message"] for d in run.info["diagnostics"] if d["fired"]]
        assert fired == [] and run.info["diagnostics_complete"], (run.defense, fired)


class NoGrad(nn.Sequential):
    """A model that computes under torch.no_grad(): no input gradient exists at all."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


def test_a_model_without_input_gradients_is_evaluated_and_flagged_not_refused(trained):
    model = NoGrad(*trained.children()).eval()
    results = bench.evaluate(model, "digits", ["pgd-linf"], **SETTINGS)
    fired = {d["name"] for d in diagnostics(results).values() if d["fired"]}
    assert {"zero-gradient", "unreached"} <= fired
    # PGD's walks could not move a point (only its random starts could); the gradient-free audit did
    table = results.accuracy_under_attack.set_index(["attack", "epsilon"]).accuracy
    assert table["pgd-linf", 0.1] > table["worst-case", 0.1]


def test_strength_notes_compare_gradient_attacks_only():
    from bench.diagnostics import assess
    from bench.metrics import STRENGTH_PREFIX
    from bench.types import Record

    n = 100
    kinds = {"pgd-linf": "gradient", "autoattack-linf": "gradient", "square-linf": "gradient-free"}
    breaks = {"pgd-linf": 30, "autoattack-linf": 40, "square-linf": 10}  # points 0..k-1 broken
    rows = [Record(i, "clean", None, 0.0, 1, 1, 1, None, None, None, None) for i in range(n)]
    rows += [Record(i, attack, "linf", 0.1, 1, 1, int(i >= k), 0.1, None, None, None)
             for attack, k in breaks.items() for i in range(n)]
    notes = [w for w in assess(rows, [], kinds=kinds, declared_randomized=False, eot_draws=20,
                               audited_norms=("linf",)).warnings if w.startswith(STRENGTH_PREFIX)]
    # autoattack breaks 10 points pgd misses: one note; Square, weaker than both, is no one's note
    assert len(notes) == 1 and "pgd-linf leaves 70.0%" in notes[0] and "square" not in notes[0]
    assert notes[0].endswith("quote the per-sample worst case over linf attacks, 60.0%")

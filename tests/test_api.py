"""The public API: any nn.Module evaluated from Python, Results as DataFrames, stores round-trip,
defenses around outside models, and one-line errors for requests that cannot work."""
from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import beta, norm
from torch import nn

import bench
import bench.evaluation
import bench.provenance
from bench.cli import main
from bench.errors import BenchError


@pytest.fixture
def bench_cli(capsys):
    """``bench`` in-process (the ``bench`` fixture of conftest is shadowed by the module here)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def mlp(seed: int = 0, classes: int = 10) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))


class Constant(nn.Module):
    """Logits that favour one class whatever the input."""

    def __init__(self, label: int, classes: int = 10):
        super().__init__()
        self.register_buffer("logits", torch.eye(classes)[label] * 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


class LogInput(nn.Module):
    """A model made for inputs above 0 (log scale): -inf at a black pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def digits_test(size: int):
    dataset = bench.load_dataset("digits")
    return dataset.x_test[:size], dataset.y_test[:size]


def test_an_outside_model_is_evaluated_sample_by_sample():
    model = mlp()
    x, y = digits_test(40)
    results = bench.evaluate(model, (x, y), ["pgd-linf"], epsilons=[0.0, 0.1], attack_params={"steps": 5}, audit=False)
    with torch.no_grad():
        expected = model(x).argmax(1)
    records = results.records
    clean = records[records.attack == "clean"].sort_values("sample_index")
    assert clean.prediction.tolist() == expected.tolist()
    assert clean.true_label.tolist() == y.tolist() and clean.sample_index.tolist() == list(range(40))
    # epsilon 0 of an attack is the clean input itself
    zero = records[(records.attack == "pgd-linf") & (records.epsilon == 0)].sort_values("sample_index")
    assert zero.prediction.tolist() == expected.tolist() and (zero.distance == 0).all()
    attacked = records[(records.attack == "pgd-linf") & (records.epsilon == 0.1)]
    assert (attacked.distance <= 0.1 + 1e-6).all()  # float32 rounding of a 0.1 step
    (row,) = results.clean.itertuples()
    k = int((expected == y).sum())
    assert row.accuracy == k / 40 and row.n == 40
    assert row.ci_low == pytest.approx(beta.ppf(0.025, k, 40 - k + 1), rel=1e-9)
    assert row.ci_high == pytest.approx(beta.ppf(0.975, k + 1, 40 - k), rel=1e-9)
    under = results.accuracy_under_attack.set_index("epsilon").accuracy
    assert under[0.1] == attacked.correct.mean() and under[0.1] <= under[0.0]
    assert results.runs.defense.tolist() == ["baseline"] and results.records["params.model"].str.startswith("Sequential@").all()


def test_results_round_trip_through_a_store(tmp_path):
    model = mlp(1)
    kept = bench.evaluate(model, "digits", ["pgd-l2"], epsilons=[0.5], test_size=30, seed=3,
                          attack_params={"steps": 5}, store=tmp_path)
    loaded = bench.load_results(tmp_path)
    key = ["attack", "epsilon", "sample_index"]
    pd.testing.assert_frame_equal(loaded.records.sort_values(key).reset_index(drop=True),
                                  kept.records.sort_values(key).reset_index(drop=True), check_dtype=False)
    for name in ("clean", "accuracy_under_attack", "certified"):
        pd.testing.assert_frame_equal(loaded.tables[name], kept.tables[name], check_dtype=False)
    assert loaded.runs.spec[0]["test_size"] == 30 and loaded.runs.seed[0] == 3
    # nothing is written without a store
    bench.evaluate(model, "digits", test_size=10)
    assert len(bench.load_results(tmp_path).runs) == 1


def test_load_results_equals_the_json_contract(bench_cli, tmp_path):
    bench.evaluate(mlp(2), "digits", ["pgd-linf"], epsilons=[0.05], test_size=20,
                   attack_params={"steps": 3}, store=tmp_path)
    bench.evaluate(bench.wrap("smoothing", mlp(2), n=20, n0=5), "digits", test_size=10, store=tmp_path)
    code, stdout, _ = bench_cli("report", "--results", str(tmp_path), "--format", "json")
    assert code == 0
    printed = json.loads(stdout)
    loaded = bench.load_results(tmp_path)
    for name in ("clean", "accuracy_under_attack", "certified"):
        assert json.loads(loaded.tables[name].to_json(orient="records")) == printed[name]
    assert json.loads(loaded.to_json()) == printed
    assert set(loaded.records.defense) == {"baseline", "smoothing"}
    assert "params.sigma" in loaded.records and "config" in loaded.records


def test_smoothing_wraps_an_outside_model():
    n, n0, alpha, sigma = 200, 10, 0.001, 0.5
    x, y = digits_test(6)
    smoothed = bench.wrap("smoothing", Constant(3), sigma=sigma, n=n, n0=n0, alpha=alpha)
    results = bench.evaluate(smoothed, (x, y))
    clean = results.records
    # every draw votes 3: the one-sided Clopper-Pearson bound is alpha^(1/n), radius sigma * Phi^-1 of it
    assert (clean.certified_label == 3).all() and (clean.prediction == 3).all()
    expected = sigma * norm.ppf(alpha ** (1 / n))
    assert clean.certified_radius.to_numpy() == pytest.approx(np.full(6, expected), rel=1e-6)

    class CoinFlip(nn.Module):
        """Class 1 where the noisy first pixel is above its clean value 0.5: half of the draws."""

        def forward(self, x):
            above = (x.flatten(1)[:, :1] > 0.5).float()
            return torch.cat([1 - above, above, torch.zeros(len(x), 8)], 1)

    half = torch.full((4, 1, 8, 8), 0.5)
    undecided = bench.evaluate(bench.wrap("smoothing", CoinFlip(), sigma=sigma, n=n, n0=n0), (half, torch.zeros(4).long()))
    assert (undecided.records.certified_label == -1).all() and (undecided.records.certified_radius == 0).all()
    assert (undecided.records.prediction == -1).all()  # PREDICT abstains where the votes are even


def test_evaluating_a_model_at_chance_reports_it(caplog):
    """bench.evaluate measures what it is given (an untrained model is a fair baseline), and says
    when the clean accuracy is no better than guessing; bench.train raises instead (test_training)."""
    results = bench.evaluate(Constant(3), "digits", test_size=100, log=logging.getLogger("test").warning)
    (warning,) = [w for w in results.warnings if w.startswith("clean accuracy")]
    assert warning.startswith("clean accuracy 0.100 <= chance 0.100 (the largest class's share) + ")
    assert f"warning: {warning}" in caplog.text


def test_pixeldp_autoencoder_in_front_of_a_frozen_outside_classifier():
    classifier = mlp(4)
    bench.train(classifier, "digits", epochs=3, batch_size=16, train_size=300)  # an outside classifier arrives trained
    frozen = {k: v.clone() for k, v in classifier.state_dict().items()}
    defense = bench.wrap("pixeldp", classifier, autoencoder=True, draws=10)
    with pytest.raises(BenchError, match="must be trained"):
        bench.evaluate(defense, "digits", test_size=5)
    bench.train(defense, "digits", epochs=4, batch_size=16, train_size=200)
    assert defense.autoencoder is not None and defense.sensitivity > 0
    assert all(torch.equal(frozen[k], v) for k, v in classifier.state_dict().items())
    results = bench.evaluate(defense, "digits", test_size=10)
    assert set(results.records.certified_norm) == {"l2"} and (results.records.certified_radius >= 0).all()
    # the trained auto-encoder is part of the identity a stored run is resumed by
    assert results.runs.spec[0]["model"] == f"Sequential@{bench.provenance.fingerprint(defense.state_dict())}"
    assert bench.provenance.fingerprint(defense.state_dict()) != bench.provenance.fingerprint({"model": classifier.state_dict()})


@pytest.mark.parametrize(
    "defense, model, params, fragment",
    [
        ("pixeldp", mlp(), {}, "pixeldp noise_at=conv1 puts the noise after the model's first layer"),
        ("robustopt", Constant(0), {}, "needs a zoo model or an nn.Sequential"),
        ("robustopt", nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10)), {}, "not BatchNorm1d"),
        ("smoothing", mlp(), {"sigma": "wide"}, "sigma='wide' is not a finite number"),
        ("nosuch", mlp(), {}, "unknown defense 'nosuch'"),
    ],
)
def test_a_defense_that_cannot_wrap_a_model_says_why_in_one_line(defense, model, params, fragment):
    with pytest.raises(BenchError) as error:
        bench.wrap(defense, model, **params)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_outside_models_that_other_defenses_accept():
    assert bench.wrap("pixeldp", mlp(), noise_at="input").pretrained
    assert bench.wrap("madry", mlp()).pretrained
    robust = bench.wrap("robustopt", mlp(5))
    x, y = digits_test(4)
    certificate = robust.certify(x)
    with torch.no_grad():
        assert certificate.label.tolist() == mlp(5)(x).argmax(1).tolist()
    # a bound the dual network proves at radius r holds: PGD at the smallest proved radius flips
    # no point certified there
    proved = certificate.radius > 0
    assert certificate.norm == "linf" and proved.any()
    radius = float(certificate.radius[proved].min())
    pgd = bench.evaluation.attack_steps(["pgd-linf"], [radius], {"steps": 20})[0].attack
    (x_adv,) = pgd.run(robust.model, x[proved], certificate.label[proved], [radius])
    with torch.no_grad():
        assert robust.model(x_adv).argmax(1).tolist() == certificate.label[proved].tolist()


@pytest.mark.parametrize(
    "model, data, kwargs, fragment",
    [
        (mlp(classes=5), "digits", {}, "returns 5 logits per image; digits has 10 classes"),
        (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), "digits", {}, "does not accept digits images (1x8x8"),
        (nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Flatten(0)), "digits", {}, "must return logits of shape (batch, classes)"),
        (nn.Sequential(LogInput(), nn.Flatten(), nn.Linear(64, 10)), "digits", {}, "non-finite logits"),
        (mlp(), (torch.rand(4, 1, 8, 8) * 255, torch.zeros(4).long()), {}, "images must be in [0, 1]"),
        (mlp(), (torch.rand(4, 1, 8, 8), torch.zeros(3).long()), {}, "y must be 4 integer labels"),
        (mlp(), "digits", {"attacks": ["nosuch"]}, "unknown attack 'nosuch'"),
        (mlp(), "digits", {"attacks": ["pgd-linf"], "epsilons": {"l3": [0.1]}}, "'l3' is neither a norm"),
        (mlp(), "digits", {"attacks": ["pgd-linf"], "epsilons": [-0.1]}, "epsilons of pgd-linf must be finite numbers >= 0"),
        (mlp(), "digits", {"seed": -1}, "seed must be an integer from 0"),
        (mlp(), "digits", {"eot_draws": 0}, "eot_draws must be a positive integer"),
        ("not a model", "digits", {}, "expected an nn.Module"),
    ],
)
def test_a_request_that_cannot_work_is_a_one_line_error_before_any_work(tmp_path, model, data, kwargs, fragment):
    with pytest.raises(BenchError) as error:
        bench.evaluate(model, data, store=tmp_path, test_size=10, **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "results.sqlite").exists()


def test_an_interrupted_evaluation_resumes_from_its_stored_steps(tmp_path):
    from bench.attacks.base import Attack

    class Flaky(Attack):
        """Fails on its first call, then returns the clean inputs."""

        name = "flaky"
        norm = "linf"
        calls = 0

        def perturb_chunk(self, model, x, y, epsilons, predict):
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("boom")
            return [x.clone() for _ in epsilons]

    model = mlp(6)
    with pytest.raises(RuntimeError):
        bench.evaluate(model, "digits", [Flaky()], epsilons=[0.1], test_size=20, store=tmp_path, audit=False)
    stored = bench.load_results(tmp_path)
    assert stored.runs.empty  # an unfinished run is not in the tables
    resumed = bench.evaluate(model, "digits", [Flaky()], epsilons=[0.1], test_size=20, store=tmp_path, audit=False)
    assert resumed.runs["info"][0]["resumed"] and len(resumed.records) == 40
    fresh = bench.evaluate(model, "digits", [Flaky()], epsilons=[0.1], test_size=20, audit=False)
    key = ["attack", "sample_index"]
    columns = ["attack", "sample_index", "prediction", "correct"]
    assert resumed.records.sort_values(key)[columns].values.tolist() == fresh.records.sort_values(key)[columns].values.tolist()


def test_results_write_the_html_report(tmp_path):
    results = bench.evaluate(mlp(), "digits", test_size=10)
    page = results.report(tmp_path / "one" / "report.html")
    assert page.is_file() and "<html" in page.read_text()[:200].lower()
    full = results.report(tmp_path / "full")
    assert full == tmp_path / "full" / "report.html" and (tmp_path / "full" / "tables.json").is_file()


# -- bench eval: the same evaluation from the command line ---------------------------------------------
MODEL_FILE = """
import torch
from torch import nn

def factory():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def five_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 5))

def mnist_sized():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

def not_a_model():
    return "a string"
"""


class Payload:
    """Pickled into a checkpoint: unpickling would call ``touch`` on the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models" / "my_models.py"
    path.parent.mkdir()
    path.write_text(MODEL_FILE)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    return path, tmp_path / "weights.pt", model


def test_bench_eval_gives_the_records_of_evaluate(bench_cli, model_file, tmp_path):
    path, weights, model = model_file
    code, stdout, stderr = bench_cli(
        "eval", "--model", f"{path}:factory", "--checkpoint", str(weights), "--dataset", "digits", "--test-size", "30",
        "--attack", "pgd-linf", "--epsilons", "0.05,0.1", "--attack-param", "steps=5", "--seed", "2",
        "--out", str(tmp_path / "cli"), "--quiet")
    assert code == 0, stderr
    assert "Accuracy under attack" in stdout
    python = bench.evaluate(model, "digits", ["pgd-linf"], [0.05, 0.1], test_size=30, seed=2, attack_params={"steps": 5})
    cli = bench.load_results(tmp_path / "cli")
    columns = ["attack", "epsilon", "sample_index", "prediction", "true_label", "correct", "distance"]
    ordered = lambda frame: frame[columns].sort_values(["attack", "epsilon", "sample_index"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ordered(cli.records), ordered(python.records))
    # the checkpoint's weights, not the factory's fresh ones
    assert cli.runs.spec[0]["model"] == f"{path}:factory@{bench.provenance.fingerprint({'model': model.state_dict()})}"


def test_bench_eval_finds_a_module_in_the_current_folder(bench_cli, model_file, monkeypatch):
    path, weights, _ = model_file
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(path.parent))])
    code, stdout, stderr = bench_cli("eval", "--model", "my_models:factory", "--checkpoint", str(weights),
                                     "--test-size", "10", "--format", "json", "--quiet")
    assert code == 0, stderr
    assert json.loads(stdout)["clean"][0]["n"] == 10


@pytest.mark.parametrize(
    "factory, checkpoint, fragment",
    [
        ("five_classes", None, "returns 5 logits per image; digits has 10 classes"),
        ("mnist_sized", None, "does not accept digits images (1x8x8, values in [0,1])"),
        ("not_a_model", None, "not_a_model() returned a str, not a torch nn.Module"),
        ("nope", None, "has no attribute 'nope'"),
        ("factory", "five", "does not fit"),
        ("factory", "code", "is not loadable (it holds more than tensors"),
        ("factory", "missing", "does not exist"),
        ("factory", "directory", "is a directory; give the state-dict file itself"),
    ],
)
def test_bench_eval_refuses_a_model_that_does_not_fit_in_one_line(bench_cli, model_file, tmp_path, factory, checkpoint, fragment):
    path, _, _ = model_file
    args = ["eval", "--model", f"{path}:{factory}", "--test-size", "10", "--out", str(tmp_path / "out")]
    marker = tmp_path / "ran"
    if checkpoint == "five":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).state_dict(), tmp_path / "five.pt")
        args += ["--checkpoint", str(tmp_path / "five.pt")]
    elif checkpoint == "code":
        torch.save({"model": Payload(marker)}, tmp_path / "code.pt")
        args += ["--checkpoint", str(tmp_path / "code.pt")]
    elif checkpoint == "missing":
        args += ["--checkpoint", str(tmp_path / "missing.pt")]
    elif checkpoint == "directory":
        args += ["--checkpoint", str(tmp_path)]
    code, _, stderr = bench_cli(*args)
    assert code == 2 and stderr.startswith("bench: error:") and fragment in stderr
    assert stderr.count("\n") == 1 and not marker.exists()
    assert not (tmp_path / "out" / "results.sqlite").exists()


# -- the README's Python example, exactly as written --------------------------------------------------
def readme_example() -> str:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = text.split("## Evaluate your own model from Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    records, results = namespace["records"], namespace["results"]
    # the audit (square-*, transfer-*) runs beside the gradient attacks of each norm, at their epsilons
    audit = {"square-linf", "transfer-linf", "square-l2", "transfer-l2"}
    assert set(records.attack) == {"clean", "pgd-linf", "pgd-l2"} | audit and len(records) == 100 * (1 + 6 * 3)
    table = results.accuracy_under_attack
    assert table.accuracy[table.epsilon == 0].iloc[0] > 0.8  # the trained model, evaluated clean
    assert (table.groupby(["attack", "norm"]).accuracy.apply(lambda a: a.is_monotonic_decreasing)).all()
    assert "certified_accuracy" in capsys.readouterr().out


def test_the_readme_example_runs_beside_a_users_attacks_defenses_and_reports(tmp_path):
    import os
    import subprocess
    import sys

    for name in ("attacks", "defenses", "reports"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py was imported')\n")
    environment = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    # `python -` puts the current folder first on sys.path, as a notebook in that folder does
    done = subprocess.run([sys.executable, "-"], input=readme_example(), cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "accuracy.png").is_file() and (tmp_path / "results" / "results.sqlite").is_file()


def test_a_step_is_a_plain_picklable_unit_of_work():
    import pickle

    x, y = digits_test(12)
    smoothed = bench.wrap("smoothing", mlp(8), n=30, n0=5)
    (step,) = bench.evaluation.attack_steps(["pgd-l2"], [0.5], {"steps": 3})
    here = bench.evaluation.evaluate_step(smoothed, step, x, y, torch.arange(12), seed=4, eot_draws=2)
    step_copy, defense_copy = pickle.loads(pickle.dumps((step, smoothed)))
    there = bench.evaluation.evaluate_step(defense_copy, step_copy, x, y, torch.arange(12), seed=4, eot_draws=2)
    assert there == here and len(here.records) == 12


def test_evaluate_and_train_use_the_threads_asked_for_and_restore_the_callers(monkeypatch):
    from bench import evaluation

    seen = []
    evaluate_step = evaluation.evaluate_step

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate_step(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_step", recording)
    before = torch.get_num_threads()
    bench.evaluate(mlp(), "digits", test_size=10, threads=2)
    assert seen == [2] and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # without threads=: the rule, which takes the user's choice
    bench.evaluate(mlp(), "digits", test_size=10)
    assert seen == [2, 3] and torch.get_num_threads() == before
    with pytest.raises(BenchError, match="threads must be a positive integer"):
        bench.train(mlp(), "digits", epochs=1, threads=0)

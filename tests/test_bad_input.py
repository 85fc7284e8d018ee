"""Every bad input is caught before any work: one line ``bench: error: ...`` on stderr, exit
status 2, no traceback, nothing stored (no run, no record, no checkpoint, no results folder).

One table of bad inputs, command-line flags and TOML configs alike, run in-process through
``bench.cli.main``; a few run as real processes to check the exit status and what was imported.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.errors import BenchError
from bench.spec import RunSpec
from bench.validation import validate_request

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")


def row(args: str | list[str], fragment: str, toml: str | None = None, marks=()):
    """``args``: the command line after ``bench``; ``{out}`` is a fresh results folder, ``{file}`` a
    regular file, ``{config}`` the TOML text ``toml`` written to a file, ``{readonly}`` a folder
    without write permission."""
    argv = args.split(" ") if isinstance(args, str) else args
    return pytest.param(argv, fragment, toml, marks=marks, id=" ".join(argv) + (f" | {toml!r}" if toml else ""))


ROWS = [
    # -- epsilons ------------------------------------------------------------------------------
    row("run --epsilons nan", "got nan"),
    row("run --epsilons inf", "got inf"),
    row("run --epsilons=-inf", "got -inf"),
    row("run --epsilons 0.1,nan", "got nan"),
    row("run --epsilons -0.1", "got -0.1"),
    row("run --epsilons abc", "'abc' is not a comma-separated list of numbers"),
    row(["run", "--epsilons", ""], "epsilons must be a non-empty list"),
    row("run --epsilons 0.1;0.2", "is not a comma-separated list"),
    row("run --attack pgd-linf --epsilons linf=nan", "epsilons.linf must be finite numbers >= 0"),
    row("run --attack pgd-linf --epsilons pgd-linf=-1", "epsilons.pgd-linf must be finite numbers >= 0"),
    row("run --attack pgd-linf --epsilons l3=0.1", "'l3' is neither a norm"),
    row("run --attack pgd-linf --epsilons l2=0.1", "no selected attack has norm l2"),
    row("run --attack pgd-linf --epsilons 0.1 --epsilons linf=0.2", "not both"),
    # -- seed, sizes, training settings -------------------------------------------------------
    row("run --seed 99999999999999999999999", "seed must be an integer from 0 to 2**63-1"),
    row("run --seed 9223372036854775808", "seed must be an integer from 0 to 2**63-1"),
    row("run --seed -1", "seed must be an integer from 0"),
    row("run --seed abc", "'abc' is not an integer"),
    row("run --seed 1.5", "'1.5' is not an integer"),
    row("run --epochs 0", "epochs must be a positive integer"),
    row("run --epochs -4", "epochs must be a positive integer"),
    row("run --epochs five", "'five' is not an integer"),
    row("run --batch-size 0", "batch_size must be a positive integer"),
    row("run --train-size 0", "train_size must be a positive integer"),
    row("run --test-size -1", "test_size must be a positive integer"),
    row("run --image-size 0", "image_size must be a positive integer"),
    row("run --eot-draws 0", "eot_draws must be a positive integer"),
    row("run --lr nan", "lr must be a finite number above 0"),
    row("run --lr inf", "lr must be a finite number above 0"),
    row("run --lr 0", "lr must be a finite number above 0"),
    row("run --lr -0.1", "lr must be a finite number above 0"),
    row("run --lr abc", "'abc' is not a number"),
    # -- device --------------------------------------------------------------------------------
    row("run --device cuda", "device 'cuda' is not available", marks=NO_CUDA),
    row("run --device cuda:0", "device 'cuda:0' is not available", marks=NO_CUDA),
    row("run --device mps", "device 'mps' is not available", marks=NO_MPS),
    row("run --device banana", "device 'banana' is not accepted; use cpu, cuda"),
    row("run --device cuda:x", "device 'cuda:x' is not accepted"),
    row(["run", "--device", ""], "device '' is not accepted"),
    # -- output folder -------------------------------------------------------------------------
    row("run --out /proc/foo", "--out /proc/foo is not writable"),
    row("run --out /proc/self/foo/bar", "is not writable"),
    row("run --out /sys/foo", "--out /sys/foo is not writable"),
    row("run --out {file}", "is a file; give a directory"),
    row("run --out {file}/results", "is a file, not a directory"),
    row("run --out {readonly}/results", "is not writable", marks=NOT_ROOT),
    # -- names and parameters ------------------------------------------------------------------
    row("run --defense nosuch", "unknown defense 'nosuch'; available:"),
    row("run --attack nosuch", "unknown attack 'nosuch'; available:"),
    row("run --dataset nosuch", "unknown dataset 'nosuch'; available:"),
    row("run --model nosuch", "unknown model 'nosuch'; available:"),
    row("run --model wrn-15-2", "depth must be 6n+4"),
    row("run --param L=abc", "without --defense the defense is baseline (parameters: none); defenses with 'L': pixeldp"),
    row("run --defense baseline --defense pixeldp --param pixeldp.L=abc", "pixeldp parameter L='abc' is not a finite number"),
    row("run --defense baseline --defense pixeldp --param L=-1", "pixeldp parameter L=-1.0 must be positive"),
    row("run --defense pixeldp --param L=0", "L=0.0 must be positive"),
    row("run --defense pixeldp --param L=nan", "L='nan' is not a finite number"),
    row("run --defense pixeldp --param L=inf", "L='inf' is not a finite number"),
    row("run --defense pixeldp --param epsilon=2", "epsilon=2.0 must be in (0, 1]"),
    row("run --defense pixeldp --param delta=1", "delta=1.0 must be in (0, 1)"),
    row("run --defense pixeldp --param draws=0", "draws=0 must be at least 2"),
    row("run --defense pixeldp --param draws=1.5", "draws='1.5' is not an integer"),
    row("run --defense pixeldp --param mechanism=uniform", "choose one of gaussian, laplace"),
    row("run --defense pixeldp --param autoencoder=maybe", "is not a boolean"),
    row("run --defense pixeldp --param nosuch=1", "no selected defense has parameter 'nosuch'"),
    row("run --defense pixeldp --param pixeldp.nosuch=1", "pixeldp has no parameter 'nosuch'; accepted:"),
    row("run --param pixeldp.L=0.1", "names 'pixeldp', which is not selected"),
    row("run --param no-equals-sign", "is malformed; expected KEY=VALUE"),
    row("run --defense smoothing --param sigma=-1", "smoothing parameters need sigma > 0"),
    row("run --defense smoothing --param alpha=1", "smoothing parameters need"),
    row("run --defense madry --param steps=0", "madry parameters need"),
    row("run --defense madry --param adversarial_fraction=2", "madry parameters need"),
    row("run --defense robustopt --param epsilon=0", "robustopt parameters need epsilon > 0"),
    row("run --attack pgd-linf --attack-param steps=0", "pgd steps must be at least 1"),
    row("run --attack pgd-linf --attack-param steps=abc", "steps='abc' is not an integer"),
    row("run --attack pgd-linf --attack-param random_start=false", "pgd random_start=false needs restarts=1 (got 10"),
    row("run --attack pgd-linf --attack-param rel_stepsize=nan", "rel_stepsize='nan' is not a finite number"),
    row("run --attack pgd-linf --attack-param nosuch=1", "no selected attack has parameter 'nosuch'"),
    row("run --attack cw-l2 --attack-param learning_rate=-1", "cw-l2 learning_rate and initial_const must be positive"),
    row("run --attack-param steps=10", "no attack is selected (--attack NAME); attacks with 'steps':"),
    row("run --attack cw-linf --attack-backend foolbox", "attack cw-linf has no 'foolbox' backend"),
    row("run --attack-backend torch", "invalid choice: 'torch'"),
    row("run --nosuch-flag", "unrecognized arguments: --nosuch-flag"),
    row("run --config {out}/missing.toml", "missing.toml does not exist"),
    row("run --profile cpu", "give --config FILE too"),
    row("run --config {readonly}", "is not readable: Is a directory"),
    row("run --config /proc/self/exe", "is not valid TOML"),
    row("run --config /proc/self/mem", "is not readable"),
    row("run --config {file}", "is not valid TOML"),
    row("run --dataset mnist --data-dir {file}", "a-file is a file; give the folder"),
    # -- TOML configs: the same checks as the flags ---------------------------------------------
    row("run --config {config}", "defense must be a name or a list of names", "defense = 5"),
    row("run --config {config}", "attack must be a name or a list of names", 'attack = ["pgd-linf", 3]'),
    row("run --config {config}", "epsilons must be a non-empty list of numbers", 'epsilons = "0.1"'),
    row("run --config {config}", "epsilons must be a non-empty list of numbers", "epsilons = []"),
    row("run --config {config}", "got 'a'", 'epsilons = [0.1, "a"]'),
    row("run --config {config}", "got nan", "epsilons = [nan]"),
    row("run --config {config}", "epsilons.linf must be", 'attack = "pgd-linf"\n[epsilons]\nlinf = [inf]'),
    row("run --config {config}", "epsilons.linf must be a non-empty list", 'attack = "pgd-linf"\n[epsilons]\nlinf = 0.1'),
    row("run --config {config}", "epochs must be a positive integer", 'epochs = "five"'),
    row("run --config {config}", "epochs must be a positive integer", "epochs = -4"),
    row("run --config {config}", "epochs must be a positive integer", "epochs = 2.5"),
    row("run --config {config}", "batch_size must be a positive integer", "batch_size = 0"),
    row("run --config {config}", "train_size must be a positive integer", "train_size = true"),
    row("run --config {config}", "lr must be a finite number above 0", "lr = nan"),
    row("run --config {config}", "lr must be a finite number above 0", 'lr = "0.1"'),
    row("run --config {config}", "seed must be an integer from 0 to 2**63-1", "seed = 18446744073709551616"),
    row("run --config {config}", "seed must be an integer", "seed = true"),
    row("run --config {config}", "device 'banana' is not accepted", 'device = "banana"'),
    row("run --config {config}", "download must be true or false", 'download = "yes"'),
    row("run --config {config}", "attack_backend 'torch' is not accepted", 'attack_backend = "torch"'),
    row("run --config {config}", "--out /proc/foo is not writable", 'out = "/proc/foo"'),
    row("run --config {config}", "unknown key 'epoch'", "epoch = 3"),
    row("run --config {config}", "is not valid TOML", "epochs = "),
    row("run --config {config}", "config key 'param' must be a table", "param = 5"),
    row("run --config {config}", "pixeldp parameter L='abc' is not a finite number", 'defense = "pixeldp"\n[param]\nL = "abc"'),
    row("run --config {config}", "L=0.0 must be positive", 'defense = ["baseline", "pixeldp"]\n[param.pixeldp]\nL = 0'),
    row("run --config {config}", "defenses with 'L': pixeldp", "[param]\nL = 0.1"),
    row("run --config {config}", "choose one of gaussian, laplace", 'defense = "pixeldp"\nparam = {mechanism = 5}'),
    row("run --config {config}", "epochs must be a positive integer", '[[runs]]\ndefense = "baseline"\n[[runs]]\nepochs = 0'),
    row("run --config {config} --epochs 0", "epochs must be a positive integer", "epochs = 3"),
    row("run --attack bpda-linf", "attack bpda-linf runs through the defense's differentiable approximation, and defense baseline offers none"),
    row("run --jobs 100000", "--jobs 100000 is more worker processes than this machine can run"),
    row("run --scheduler notaurl", "--scheduler 'notaurl' is not a scheduler address"),
    row("run --scheduler tcp://host", "expected PROTOCOL://HOST:PORT"),
    # -- report ----------------------------------------------------------------------------------
    row("report --out /proc/foo", "report --out /proc/foo is not writable"),
    row("report --out {file}", "is a file; give a directory"),
    row("report --thresholds nan", "thresholds must be finite numbers >= 0"),
    row("report --thresholds -1", "thresholds must be finite numbers >= 0"),
    row("report --dpi 0", "'0' must be a positive integer"),
    row("report --format pdf", "invalid choice: 'pdf'"),
    row("report --dpi 100000", "'100000' is above 1200; give a resolution from 1 to 1200 dpi"),
    # -- epsilons beyond the image domain, unused epsilons, subsets larger than the split -----------
    row("run --attack pgd-linf --epsilons 1e308", "pgd-linf: linf epsilon 1e+308 is larger than the distance between any "
                                                 "two images in [0, 1] of digits (1), so it constrains nothing; accepted: 0 to 1"),
    row("run --attack pgd-l2 --epsilons l2=1e9", "pgd-l2: l2 epsilon 1e+09 is larger than the distance between any two "
                                                "images in [0, 1] of digits (sqrt(d) = 8 for d = 64 values)"),
    row("run --attack fmn-l1 --epsilons 65", "accepted: 0 to 64"),
    row("run --dataset mnist --attack pgd-l2 --epsilons 30", "sqrt(d) = 28 for d = 784 values"),
    row("run --epsilons 0.1", "--epsilons sets attack sizes, but no attack is selected; add --attack NAME"),
    row("run --test-size 100000", "test_size 100000 is larger than the digits test split (500 images)"),
    row("run --train-size 5000", "train_size 5000 is larger than the digits train split (1297 images)"),
    # -- bench eval: models that cannot be attacked or are not models ------------------------------
    row("eval --model {models}:net --attack pgd-linf --epsilons 5", "pgd-linf: linf epsilon 5 is larger than"),
    row("eval --model {models}:net --attack pgd-l2 --epsilons l2=8.5", "accepted: 0 to 8"),
    row("eval --model {models}:net --epsilons 0.1", "--epsilons sets attack sizes, but no attack is selected"),
    row("eval --model {models}:net --test-size 100000", "test_size 100000 is larger than the digits test split (500 images)"),
    row("eval --model {models}:integer_logits", "returns torch.int64 outputs; logits must be floating point"),
    row("eval --model {models}:exits", "calling exits() failed: it called sys.exit(0)"),
    row("eval --model {models}:net --checkpoint {readonly}", "ro is a directory; give the state-dict file itself"),
    row("nosuch", "invalid choice: 'nosuch'"),
]


# Outside models for bench eval: {models}:NAME.
MODELS = """
import sys

import torch
from torch import nn


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class Constant(nn.Module):
    def forward(self, x):
        return torch.zeros(len(x), 10)


def constant():
    return Constant()


class NoGrad(nn.Sequential):
    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


def no_grad():
    return NoGrad(nn.Flatten(), nn.Linear(64, 10))


class IntegerLogits(nn.Module):
    def forward(self, x):
        return (x.flatten(1)[:, :10] * 10).long()


def integer_logits():
    return IntegerLogits()


def exits():
    sys.exit(0)
"""


def prepare(tmp_path: Path, argv: list[str], toml: str | None) -> tuple[list[str], Path]:
    out = tmp_path / "out"
    paths = {"out": out, "file": tmp_path / "a-file", "config": tmp_path / "config.toml", "readonly": tmp_path / "ro",
             "models": tmp_path / "models.py"}
    paths["file"].write_text("not a folder\n")
    paths["models"].write_text(MODELS)
    paths["readonly"].mkdir(mode=0o555)
    if toml is not None:
        paths["config"].write_text(toml + "\n")
    argv = [arg.format(**paths) for arg in argv]
    if argv[0] in ("run", "eval") and "--out" not in argv and (toml is None or "out =" not in toml):
        argv += ["--out", str(out)]
    return argv, out


def assert_nothing_stored(tmp_path: Path, out: Path) -> None:
    assert not out.exists(), "validation must not create the results folder"
    assert not list(tmp_path.rglob("results.sqlite")) and not list(tmp_path.rglob("*.pt"))


def test_the_table_has_at_least_60_rows():
    assert len(ROWS) >= 60


@pytest.mark.parametrize("argv, fragment, toml", ROWS)
def test_bad_input_is_one_line_exit_2_and_nothing_stored(tmp_path, capsys, argv, fragment, toml):
    argv, out = prepare(tmp_path, argv, toml)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("bench: error: ") and captured.err.count("\n") == 1, captured.err
    assert fragment in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
    assert_nothing_stored(tmp_path, out)


HEAVY = {"torch", "foolbox", "art", "scipy", "pandas"}
# Runs bench.cli.main in a fresh interpreter and prints which heavy libraries it imported.
PROBE = (
    "import sys\nfrom bench.cli import main\ncode = main(sys.argv[1:])\n"
    f"print(*sorted({{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}))\nsys.exit(code)\n"
)


def run_process(tmp_path: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("args", ["run --epsilons nan", "run --seed 99999999999999999999999", "run --out /proc/foo",
                                  "run --epochs five", "run --lr nan"])
def test_a_value_typo_fails_before_any_heavy_import(tmp_path, args):
    process = run_process(tmp_path, args.split(" "))
    assert process.returncode == 2
    assert process.stderr.startswith("bench: error:") and process.stderr.count("\n") == 1
    assert process.stdout.strip() == "", f"imported before failing: {process.stdout}"


def test_a_parameter_typo_fails_before_attack_libraries_and_scipy_load(tmp_path):
    process = run_process(tmp_path, "run --defense baseline --defense pixeldp --attack pgd-linf --param pixeldp.L=abc".split())
    assert process.returncode == 2 and process.stderr.count("\n") == 1
    assert process.stdout.split() == ["torch"], "only torch (the Params classes import it) may load first"
    assert not (tmp_path / "results").exists()


def test_the_console_script_exits_2_with_one_line(tmp_path):
    process = subprocess.run([sys.executable, "-m", "bench.cli", "run", "--device", "banana"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert process.returncode == 2 and process.stderr.startswith("bench: error: device 'banana'")
    assert process.stderr.count("\n") == 1 and not (tmp_path / "results").exists()


def test_a_read_only_file_system_is_a_one_line_error(tmp_path):
    """A read-only tmpfs mounted in a private mount namespace (needs ``unshare -m``: root with
    CAP_SYS_ADMIN, as in this project's containers; skipped elsewhere)."""
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mount = f"mount -t tmpfs -o ro tmpfs {readonly}"
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here (unshare -m needs CAP_SYS_ADMIN)")
    for argv in (["run", "--out", f"{readonly}/results"], ["report", "--out", f"{readonly}/report"]):
        process = subprocess.run(["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", sys.executable, "-m",
                                  "bench.cli", *argv], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert process.returncode == 2 and process.stderr.count("\n") == 1, process.stderr
        assert process.stderr.startswith(f"bench: error: {'report --out' if argv[0] == 'report' else '--out'} {readonly}/")
        assert "is not writable" in process.stderr and "Read-only file system" in process.stderr
    assert not list(tmp_path.rglob("results.sqlite"))


def test_validate_request_is_the_api_entry_point(tmp_path):
    assert validate_request([RunSpec("baseline"), RunSpec("pixeldp", params={"L": 0.3})], out=tmp_path / "r") == []
    assert not (tmp_path / "r").exists()
    with pytest.raises(BenchError, match="L=-1.0 must be positive"):
        validate_request([RunSpec("baseline"), RunSpec("pixeldp", params={"pixeldp.L": -1})])
    with pytest.raises(BenchError, match="lr must be a finite number"):
        validate_request([RunSpec("baseline", lr=float("nan"))])
    with pytest.raises(BenchError, match="epsilons must be finite"):
        validate_request([RunSpec("baseline", attacks=["pgd-linf"], epsilons=[float("inf")])])
    with pytest.raises(BenchError, match="nothing to run"):
        validate_request([])


def test_epsilons_are_bounded_by_the_distance_between_any_two_images():
    # digits: d = 1 x 8 x 8 = 64 values in [0, 1]: L-inf at most 1, L2 at most sqrt(64) = 8, L1 at most 64
    assert validate_request([RunSpec("baseline", attacks=["pgd-linf", "pgd-l2", "fmn-l1"],
                                     epsilons={"linf": [1.0], "l2": [8.0], "l1": [64.0]})]) == []
    for attack, epsilon, bound in (("pgd-linf", 1.5, "0 to 1"), ("pgd-l2", 8.5, "0 to 8"), ("fmn-l1", 65.0, "0 to 64")):
        with pytest.raises(BenchError, match=f"{attack}: .* epsilon {epsilon:g} is larger than .*accepted: {bound}$"):
            validate_request([RunSpec("baseline", attacks=[attack], epsilons=[epsilon])])
    # mnist: d = 784, sqrt(d) = 28; the bound needs no data file
    assert validate_request([RunSpec("baseline", dataset="mnist", attacks=["pgd-l2"], epsilons=[28.0])]) == []
    with pytest.raises(BenchError, match="sqrt"):
        validate_request([RunSpec("baseline", dataset="mnist", attacks=["pgd-l2"], epsilons=[28.5])])


def test_epsilons_without_an_attack_in_a_config_entry_warn():
    (warning,) = validate_request([RunSpec("baseline", epsilons=[0.1]), RunSpec("baseline", attacks=["pgd-linf"],
                                                                                 epsilons=[0.1])])
    assert "epsilons are set but run baseline on digits has no attack" in warning


def test_an_unexpected_error_before_any_step_does_not_claim_stored_steps(tmp_path, capsys, monkeypatch):
    import bench.datasets.base

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug while loading")

    monkeypatch.setattr(bench.datasets.base, "load_dataset", broken)
    with pytest.raises(RuntimeError):
        main(["run", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "unexpected error" in err and "nothing was stored" in err and "completed steps are stored" not in err


def test_an_unexpected_error_after_a_step_says_completed_steps_are_stored(tmp_path, capsys, monkeypatch):
    import bench.reports.tables

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug after the steps were stored")

    # (A failing attack or defense is not an unexpected error: its job is recorded as failed.)
    monkeypatch.setattr(bench.reports.tables, "build_tables", broken)
    with pytest.raises(RuntimeError):
        main(["run", "--dataset", "digits", "--epochs", "2", "--batch-size", "16", "--train-size", "100", "--test-size", "20", "--quiet",
              "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "unexpected error" in err and "completed steps are stored and the same command resumes" in err


def test_api_bad_input_is_a_bench_error_before_any_work(tmp_path):
    import bench
    from torch import nn

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    cases = [
        (lambda: bench.load_model(123), "load_model: expected a string 'MODULE:CALLABLE'"),
        (lambda: bench.wrap("smoothing", "notamodel"), "model must be a torch nn.Module"),
        (lambda: bench.evaluate(model, "digits", ["pgd-linf"], epsilons=-1, store=tmp_path / "r"),
         "epsilons must be a list of numbers"),
        (lambda: bench.evaluate(model, "digits", ["pgd-l2"], epsilons=[9.0], store=tmp_path / "r"), "accepted: 0 to 8"),
        (lambda: bench.evaluate(model, "digits", epsilons=[0.1], store=tmp_path / "r"), "no attack is given"),
        (lambda: bench.evaluate(model, "digits", test_size=501, store=tmp_path / "r"), "larger than the digits test split"),
        (lambda: bench.train(model, "digits", train_size=1298, epochs=1), "larger than the digits train split (1297"),
    ]
    for call, fragment in cases:
        with pytest.raises(BenchError) as error:
            call()
        assert fragment in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "r").exists()


def test_a_single_attack_name_is_one_attack():
    import bench
    from torch import nn

    results = bench.evaluate(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), "digits", "pgd-linf", [0.05],
                             test_size=10, attack_params={"steps": 1, "restarts": 1}, audit=False)
    assert set(results.records.attack) == {"clean", "pgd-linf"}


def write_mnist_files(directory: Path) -> None:
    from test_datasets import write_mnist

    write_mnist(directory, train=20, test=10)


def test_an_unreadable_data_file_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """Simulated (tests run as root here, whom permission bits do not stop): reading the file
    raises PermissionError, as it does for a file mode 000 to other users."""
    import bench.datasets.base

    write_mnist_files(tmp_path / "data")
    locked = tmp_path / "data" / "t10k-images-idx3-ubyte.gz"

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(bench.datasets.base, "md5", refused)
    out = tmp_path / "out"
    code = main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("bench: error: mnist: cannot read ") and "Permission denied" in err
    assert str(tmp_path / "data") in err and "check its permissions" in err
    assert_nothing_stored(tmp_path, out)
    assert locked.is_file()


@NOT_ROOT
def test_a_data_file_without_read_permission_is_one_line_exit_2(tmp_path, capsys):
    write_mnist_files(tmp_path / "data")
    locked = tmp_path / "data" / "t10k-images-idx3-ubyte.gz"
    locked.chmod(0)
    code = main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"cannot read {locked}: Permission denied" in err

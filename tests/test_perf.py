"""`bench perf`: its references do the same work as our code paths, and its verdicts come from
an honest interval of the per-round ratios (no timing is asserted here)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from bench import perf
from bench.attacks.cw import CarliniWagnerL2, CWL2Params
from bench.attacks.pgd import LinfPGD
from helpers import float32_sum_tolerance


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(20, 1, 4, 4)
    return model, x, model(x).argmax(1).detach()


def test_the_pgd_reference_walks_exactly_as_our_default_pgd(small_model):
    """Same seed, same random starts, same restarts on the same points: the same adversarials,
    bit for bit (the reference is foolbox's arithmetic written in torch)."""
    model, x, y = small_model
    pgd = LinfPGD(LinfPGD.Params(steps=10, restarts=5), chunk_size=8)
    torch.manual_seed(0)
    ours = pgd.run(model, x, y, [0.05])[0]
    torch.manual_seed(0)
    reference = perf.torch_pgd(model, x, y, 0.05, chunk=8, steps=10, restarts=5)
    broken = model(reference).argmax(1) != y
    assert 0 < int(broken.sum()) < len(y)  # some walks succeed, some restarts are needed
    assert torch.equal(ours, reference)


def test_the_cw_reference_is_carlini_wagner_as_foolbox_computes_it(small_model):
    model, x, y = small_model
    params = CWL2Params(binary_search_steps=3, steps=20)
    torch.manual_seed(0)
    ours = CarliniWagnerL2(params, chunk_size=8).smallest_adversarials(model, x, y)
    reference = perf.torch_cw(model, x, y, params, chunk=8)
    moved = (reference - x).flatten(1).abs().amax(1) > 0
    assert int(moved.sum()) >= len(x) // 2
    # Rounding only: per Adam iteration a sum over the 16 pixels and about 10 elementwise
    # operations, over 3 x 20 iterations, to first order.
    assert torch.allclose(ours, reference, rtol=0, atol=float32_sum_tolerance(3 * 20 * (16 + 10)))


def test_the_pixeldp_floor_computes_the_scores_of_evaluate():
    """The floor keeps the sums the certificate needs: with the noise switched off every draw is
    the same pass, so its mean, mean square and votes are those of one forward pass."""
    defense, shape = perf._mnist_pixeldp(draws=4)
    net = defense.attack_model().eval()
    net.add_noise = lambda h: h  # no noise: every draw equal
    x = torch.rand(5, *shape)
    mean, square, votes = perf.pixeldp_floor(net, x, draws=4, rows=6)  # passes cut across images
    with torch.no_grad():
        expected = torch.softmax(net.post(net.pre(x)), dim=1)
    assert torch.allclose(mean, expected, rtol=0, atol=float32_sum_tolerance(4))
    assert torch.allclose(square, expected**2, rtol=0, atol=float32_sum_tolerance(4))
    assert torch.equal(votes.argmax(1), expected.argmax(1)) and torch.equal(votes.sum(1), torch.full((5,), 4.0))


def test_the_median_interval_is_the_order_statistics_of_the_binomial_table():
    """Textbook values (e.g. Conover, Practical Nonparametric Statistics, table A3): at 95% the
    interval of the median of 6 values is (x1, x6), of 20 values (x6, x15); 5 give none."""
    assert perf.median_interval([5.0, 1.0, 4.0, 2.0, 3.0]) == (0.0, float("inf"))
    assert perf.median_interval([6.0, 2.0, 1.0, 5.0, 3.0, 4.0]) == (1.0, 6.0)
    assert perf.median_interval([float(v) for v in range(1, 21)]) == (6.0, 15.0)


def _row(ratios: list[float], target: float | None = 1.05) -> perf.Row:
    return perf.Row("w", "ours", "ref", [r for r in ratios], [1.0] * len(ratios), None, None, target)


def test_a_verdict_is_given_only_when_the_interval_is_on_one_side_of_the_target():
    assert _row([0.9, 0.95, 1.0, 0.97, 0.93, 0.99]).verdict == "ok"
    assert _row([1.2, 1.3, 1.1, 1.25, 1.4, 1.15]).verdict == "ABOVE TARGET"
    assert _row([0.9, 1.1, 1.0, 1.2, 0.95, 1.0]).verdict.startswith("noisy")
    assert _row([0.9, 0.95, 1.0, 0.97, 0.93]).verdict.startswith("noisy")  # 5 rounds give no 95% interval
    assert _row([0.9] * 6, target=None).verdict == ""


def test_rounds_go_on_until_the_verdict_is_decided_or_the_budget_ends(monkeypatch):
    """A fake clock: each call advances it by a fixed time, so the ratios are known exactly."""
    clock = [0.0]
    monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(perf.time, "thread_time", lambda: clock[0])
    monkeypatch.setattr(perf.time, "monotonic", lambda: clock[0])

    def taking(seconds):
        def call():
            clock[0] += seconds
        return call

    decided = perf.measure("w", ("ours", taking(1.0)), ("ref", taking(2.0)), 1.05, perf.Budget(rounds=6, max_rounds=30))
    assert decided.verdict == "ok" and len(decided.times) == 6  # decided at the first possible round
    durations = iter([1.0, 1.2] * 100)  # ours alternates 1.0 and 1.2 s against 1.05 s: straddles
    straddling = perf.measure("w", ("ours", lambda: taking(next(durations))()), ("ref", taking(1.05)), 1.05,
                              perf.Budget(rounds=6, max_rounds=10, seconds=1e9), warm_up=False)
    assert straddling.verdict.startswith("noisy") and len(straddling.times) == 10
    durations = iter([0.9, 1.1] * 100)
    timed_out = perf.measure("w", ("ours", lambda: taking(next(durations))()), ("ref", taking(1.0)), 1.0,
                             perf.Budget(rounds=6, max_rounds=30, seconds=5.0), warm_up=False)
    assert len(timed_out.times) == 6 and timed_out.verdict.startswith("noisy")


@pytest.mark.parametrize("flag,value", [("--rounds", "0"), ("--row-seconds", "nan"), ("--row-seconds", "-1"),
                                        ("--only", "everything")])
def test_bad_perf_options_are_one_line_errors(bench, flag, value):
    code, out, err = bench("perf", flag, value)
    assert code == 2 and flag in err and len(err.strip().splitlines()) <= 2


def test_work_in_this_process_on_one_thread_is_timed_by_cpu_time_not_by_waiting():
    """A side that waits for a core (modelled by a sleep) is charged only for its work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        name, clock = perf.work_clock(in_process=True)
        begun = clock()
        time.sleep(0.2)
        waited = clock() - begun
        assert name == "cpu" and waited < 0.05
        assert perf.work_clock(in_process=False)[0] == "wall"
        torch.set_num_threads(2)
        assert perf.work_clock(in_process=True)[0] == "wall"  # several threads: their CPU times would add up
    finally:
        torch.set_num_threads(threads)


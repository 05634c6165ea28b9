"""Tests for risk_pomdp.py: beta-vector math against brute force, planning, bonuses, estimators, CLI."""

import itertools

import numpy as np
import pytest
import tyro
from conftest import run_script

import risk_pomdp as rp


def history_index(obs, acts, nO, nA):
    """Row-major index of f_h = (o_1, a_1, ..., o_h) over dims (O, A, O, ..., O), the script's convention."""
    idx = obs[0]
    for a, o in zip(acts, obs[1:], strict=False):
        idx = (idx * nA + a) * nO + o
    return idx


def brute_force(model, policy, f):
    """E[f(sum_h r_h)] by enumerating every (s_1..s_H, o_1..o_H, a_1..a_H)."""
    H, nS, nA = model.r.shape
    nO = model.O.shape[2]
    total = 0.0
    for s in itertools.product(range(nS), repeat=H):
        for o in itertools.product(range(nO), repeat=H):
            for a in itertools.product(range(nA), repeat=H):
                p, ret = model.mu[s[0]], 0.0
                for h in range(H):
                    i = history_index(o[: h + 1], a[:h], nO, nA)
                    p *= model.O[h, s[h], o[h]] * policy[h][i, a[h]]
                    if h + 1 < H:
                        p *= model.T[h, s[h], a[h], s[h + 1]]
                    ret += model.r[h, s[h], a[h]]
                total += p * f(ret)
    return total


def random_policy(nO, nA, H, rng):
    """A stochastic history-dependent policy: pi_h(.|f_h) drawn independently per history."""
    return [rng.dirichlet(np.ones(nA), size=nO * (nO * nA) ** h) for h in range(H)]


@pytest.mark.parametrize("gamma", [-1.5, -0.3, 0.7, 2.0])
def test_beta_vector_value_equals_brute_force(gamma):
    rng = np.random.default_rng(0)
    for sizes in [(2, 2, 2, 3), (3, 2, 2, 2), (2, 3, 2, 2)]:
        nS, nO, nA, H = sizes
        model = rp.make_random_pomdp(nS, nO, nA, H, rng)
        for policy in [
            random_policy(nO, nA, H, rng),
            [rng.integers(nA, size=nO * (nO * nA) ** h) for h in range(H)],
        ]:
            as_probs = [np.eye(nA)[p] if p.ndim == 1 else p for p in policy]
            expected = np.log(brute_force(model, as_probs, lambda R: np.exp(gamma * R))) / gamma
            assert rp.evaluate(model, policy, gamma) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_small_gamma_tends_to_expectation():
    rng = np.random.default_rng(1)
    model = rp.make_random_pomdp(2, 2, 2, 3, rng)
    policy = random_policy(2, 2, 3, rng)
    mean = brute_force(model, policy, lambda R: R)
    assert rp.evaluate(model, policy, 0.0) == pytest.approx(mean, rel=1e-12)
    gaps = [abs(rp.evaluate(model, policy, g) - mean) for g in (1e-1, 1e-2, 1e-3, -1e-3, -1e-4)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[4] < gaps[3]
    # J_gamma = E[R] + gamma/2 Var[R] + O(gamma^2) and Var[R] <= H^2 / 4
    assert all(
        gap <= abs(g) * 3**2 / 8 + 10 * g**2
        for gap, g in zip(gaps, (1e-1, 1e-2, 1e-3, -1e-3, -1e-4), strict=True)
    )


def brute_force_optimum(model, gamma):
    """max_pi J_gamma(pi) over every deterministic history-dependent policy (H = 2, O = 2, A = 2)."""
    nO, nA = model.O.shape[-1], model.r.shape[-1]
    sizes = [nO, nO * nO * nA]  # |F_1| = 2, |F_2| = 8 -> 2^10 policies
    best = -np.inf
    for flat in itertools.product(range(nA), repeat=sum(sizes)):
        best = max(best, rp.evaluate(model, [np.array(flat[: sizes[0]]), np.array(flat[sizes[0] :])], gamma))
    return best


@pytest.mark.parametrize("gamma", [-2.0, -0.5, 0.5, 2.0])
def test_exact_planning_beats_every_deterministic_policy(gamma):
    for seed in range(2):
        model = rp.make_random_pomdp(2, 2, 2, 2, np.random.default_rng(seed))
        policy, value = rp.plan(model, gamma)
        assert rp.evaluate(model, policy, gamma) == pytest.approx(value, abs=1e-12)
        assert value == pytest.approx(brute_force_optimum(model, gamma), abs=1e-12)


@pytest.mark.parametrize(
    "env, gamma, gap",
    [("gamble", -2.0, 0.3335), ("gamble", 2.0, 0.2067), ("scout", -2.0, 0.1372), ("scout", 2.0, 0.0)],
)
def test_risk_instances_optimum_and_gap(env, gamma, gap):
    """The documented instances: the optimum agrees with brute force over policies, and the risk gap
    J_gamma(pi*_gamma) - J_gamma(pi*_neutral) is what the README reports (>= 0.1 of the return range 2)."""
    model = rp.make_env(rp.Args(env=env), 0)
    value = rp.plan(model, gamma)[1]
    assert value == pytest.approx(brute_force_optimum(model, gamma), abs=1e-12)
    assert value - rp.evaluate(model, rp.plan(model, 0.0)[0], gamma) == pytest.approx(gap, abs=1e-4)


def test_batched_rows_equal_single_runs():
    rng = np.random.default_rng(5)
    models = [rp.make_random_pomdp(3, 2, 2, 3, rng) for _ in range(3)]
    batch = rp.Pomdp(*map(np.stack, zip(*models, strict=True)))
    b = rng.uniform(0, 0.3, size=(3, 3, 3, 2))
    for gamma in (-1.0, 0.0, 1.5):
        policies, values = rp.plan(batch, gamma, b)
        for j, m in enumerate(models):
            policy, value = rp.plan(m, gamma, b[j])
            assert all(np.array_equal(p[j], q) for p, q in zip(policies, policy, strict=True))
            assert values[j] == pytest.approx(value, abs=1e-12)
            assert rp.evaluate(batch, policies, gamma)[j] == pytest.approx(
                rp.evaluate(m, policy, gamma), abs=1e-12
            )


@pytest.mark.parametrize("gamma", [-1.0, 1.0, 0.0])
def test_exact_model_gives_zero_bonus_and_zero_regret(gamma):
    rng = np.random.default_rng(2)
    model = rp.make_random_pomdp(3, 2, 2, 3, rng)
    H, nS, nA = model.r.shape
    iota = np.log(100 * H * nS * 2 * nA / 0.1)
    b = rp.bonus(np.full((H, nS, nA), np.inf), np.full((H, nS), np.inf), model.T, 2, gamma, iota)
    assert np.all(b == 0)
    # with unknown counts the bonus is positive and saturates at |e^{gamma(H-h+1)} - 1|
    b0 = rp.bonus(np.zeros((H, nS, nA)), np.zeros((H, nS)), model.T, 2, gamma, iota)
    n = H - np.arange(H)
    assert np.allclose(b0.max(axis=(1, 2)), n if gamma == 0 else np.abs(np.expm1(gamma * n)))
    J_star = rp.plan(model, gamma)[1]
    tiger = rp.make_tiger(3)
    J_star_tiger = rp.plan(tiger, gamma)[1]
    for _ in range(5):  # every episode with the exact model and zero bonus plays an optimal policy
        policy, optimistic = rp.plan(model, gamma, b)
        assert optimistic == pytest.approx(J_star, abs=1e-12)
        assert J_star - rp.evaluate(model, policy, gamma) == pytest.approx(0.0, abs=1e-12)
        policy = rp.plan(tiger, gamma, np.zeros((3, 2, 3)))[0]
        assert J_star_tiger - rp.evaluate(tiger, policy, gamma) == pytest.approx(0.0, abs=1e-12)


def test_hindsight_estimators_converge():
    rng = np.random.default_rng(3)
    nS, nO, nA, H = 3, 2, 2, 2
    model = rp.make_random_pomdp(nS, nO, nA, H, rng)
    B = 8  # 8 rows of the same model, pooled: 8000 episodes
    batch = rp.Pomdp(*(np.repeat(x[None], B, 0) for x in model))
    N_mu, N_T, N_O = np.zeros((B, nS)), np.zeros((B, H, nS, nA, nS)), np.zeros((B, H, nS, nO))
    errors = []
    for k in range(1, 1001):
        policy = [rng.integers(nA, size=(B, nO * (nO * nA) ** h)) for h in range(H)]
        s, o, a = rp.sample_episodes(batch, policy, rng)
        rp.update_counts(N_mu, N_T, N_O, s, o, a)
        if k in (60, 1000):
            est = rp.estimate(N_mu.sum(0), N_T.sum(0), N_O.sum(0))
            errors.append(
                max(
                    np.abs(est.mu - model.mu).max(),
                    np.abs(est.T - model.T).max(),
                    np.abs(est.O - model.O).max(),
                )
            )
    assert N_T.sum((0, -1)).min() > 0 and N_mu.sum() == B * 1000
    assert errors[1] < 0.06 and errors[1] < errors[0]


def test_cli_smoke(tmp_path):
    for learner in ("bvvi", "neutral"):
        res = run_script(
            "risk_pomdp.py",
            *("--env", "tiger", "--horizon", "2", "--episodes", "40", "--gamma", "-0.5", "--num-seeds", "2"),
            *("--learner", learner, "--print-every", "20", "--plot", "--out-dir", str(tmp_path)),
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert "cumulative_regret=" in res.stdout
    csvs, pngs = sorted(tmp_path.glob("*.csv")), sorted(tmp_path.glob("*.png"))
    assert len(csvs) == 2 and len(pngs) == 2
    data = np.loadtxt(csvs[0], delimiter=",", skiprows=1)
    assert data.shape == (80, 4) and np.all(data[:, 2] >= -1e-9)


def test_unwritable_out_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:
        rp.main(tyro.cli(rp.Args, args=["--episodes", "3", "--out-dir", str(blocker / "runs")]))
    assert str(e.value).startswith("error: --out-dir") and "\n" not in str(e.value)
    assert blocker.read_text() == ""


def test_cli_bad_input(tmp_path):
    (tmp_path / "f").write_text("")
    for bad in (
        ["--gamma", "0"],
        ["--num-states", "0"],
        ["--env", "tiger", "--horizon", "12"],
        ["--out-dir", str(tmp_path / "f" / "runs")],
    ):
        res = run_script("risk_pomdp.py", *bad, "--episodes", "5", timeout=60)
        assert res.returncode != 0
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1, (
            res.stderr
        )

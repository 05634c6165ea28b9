"""ReinFlow: sampler against scorer, chain log-likelihood, PPO ratio and gradients, noise bounds, SFT, the
chunk routine on both env paths, determinism and exact resume, bad inputs, CLI runs (CPU, batched path)."""

import json
import math
import shutil

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import assert_one_line_error, read_scalars, run_script
from torch.distributions import Normal

import reinflow as rf

SIG_MIN, SIG_MAX = 0.1, 0.24


def make_policy(obs_dim=3, Ta=2, Da=2, hidden=16, shortcut=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return rf.FlowPolicy(obs_dim, Ta, Da, hidden, shortcut).to(dtype)


def main(*argv):
    return rf.main(tyro.cli(rf.Args, args=list(argv)))


# ---------------------------------------------------------------- the math
@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("shortcut", [False, True])
def test_chain_log_prob_matches_torch_distributions(K, shortcut):
    pol = make_policy(shortcut=shortcut)
    s = torch.randn(32, 3, dtype=torch.float64)
    chain, stored = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
    logp, ent = rf.chain_log_prob(pol, s, chain, K, SIG_MIN, SIG_MAX)
    # independent reference: the velocity and noise nets called directly, Gaussians from torch.distributions
    ref_lp = Normal(0.0, 1.0).log_prob(chain[:, 0]).sum(-1)
    ref_ent = Normal(torch.zeros_like(chain[:, 0]), 1.0).entropy().sum(-1)
    for k in range(K):
        t = torch.full((32,), k / K, dtype=torch.float64)
        v, te = pol.v(chain[:, k], t, s, torch.full_like(t, 1 / K))
        mu = (chain[:, k] + v / K).clamp(-1, 1)
        h = pol.sigma_net(torch.cat([te, s], -1))
        lo, hi = math.log(SIG_MIN**2), math.log(SIG_MAX**2)
        logvar = lo + (hi - lo) * (torch.tanh(h) + 1) / 2
        dist = Normal(mu, torch.exp(0.5 * logvar))
        ref_lp = ref_lp + dist.log_prob(chain[:, k + 1]).sum(-1)
        ref_ent = ref_ent + dist.entropy().sum(-1)
    n = (K + 1) * chain.shape[-1]
    torch.testing.assert_close(logp, ref_lp / n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stored, ref_lp / n, rtol=1e-10, atol=1e-10)  # the sampler's own log-prob
    torch.testing.assert_close(ent, ref_ent / n, rtol=1e-10, atol=1e-10)
    assert chain[:, -1].abs().max() <= 1.0


def scorer_steps(pol, s, chain, K):
    """mu_k, sigma_k of every step, from the policy's transition on the grid t_k = k/K (the scorer's)."""
    return zip(*(pol.transition(chain[:, k], k / K, K, s, SIG_MIN, SIG_MAX) for k in range(K)), strict=True)


def test_sampler_draws_what_the_scorer_scores():
    """z = (x_{k+1} - mu_k) / sigma_k of the sampler's chains, with the scorer's mu_k, sigma_k: on the steps
    k < K-1 it is N(0, 1) clipped at +-3 (the fraction at +-3, mean and variance of the clipped normal, and a
    KS distance of the unclipped values to the normal truncated at +-3); on the last step, where the chain
    keeps clip(x_K, -1, 1), the fraction of clipped entries is the tail mass beyond +-1."""
    K, B, c = 4, 20000, rf.EPS_CLIP
    pol = make_policy(hidden=32)
    s = torch.randn(B, 3, dtype=torch.float64)
    torch.manual_seed(1)
    chain, _ = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
    with torch.no_grad():
        mus, sigmas = scorer_steps(pol, s, chain, K)
    z = torch.cat([((chain[:, k + 1] - mus[k]) / sigmas[k]).flatten() for k in range(K - 1)])
    n, Phi = len(z), torch.special.ndtr
    p_clip = 2 * Phi(torch.tensor(-c, dtype=torch.float64)).item()
    at_clip = (z.abs() > c - 1e-6).double().mean().item()
    assert abs(at_clip - p_clip) < 4 * math.sqrt(p_clip / n), at_clip
    var = 1 - 2 * c * math.exp(-(c**2) / 2) / math.sqrt(2 * math.pi) + (c**2 - 1) * p_clip  # E[clip(eps)^2]
    assert abs(z.mean().item()) < 4 * math.sqrt(var / n), z.mean()
    assert abs(z.var().item() - var) < 4 * math.sqrt(2 / n), (z.var(), var)
    inside = z[z.abs() < c - 1e-6].sort().values
    cdf = (Phi(inside) - p_clip / 2) / (1 - p_clip)
    ks = (torch.arange(1, len(inside) + 1, dtype=inside.dtype) / len(inside) - cdf).abs().max()
    assert ks < 1.63 / math.sqrt(len(inside)), ks  # the 1 % critical value
    b_hi, b_lo = (1 - mus[-1]) / sigmas[-1], (1 + mus[-1]) / sigmas[-1]
    tail = torch.where(b_hi <= c, Phi(-b_hi), 0) + torch.where(b_lo <= c, Phi(-b_lo), 0)
    clipped = (chain[:, -1].abs() == 1).double()
    assert abs(clipped.mean() - tail.mean()) < 4 * clipped.std() / math.sqrt(clipped.numel())


def test_score_function_identity():
    """E[grad log pi(x_0:K-1 | s)] = 0 over the sampler's chains, within Monte Carlo error, for every
    parameter of the velocity and noise nets (the steps before the clipped last one, whose density is exact up
    to the 0.27 % of noise entries clipped at +-3)."""
    K, groups, B = 4, 16, 512
    pol = make_policy(hidden=8)
    params = [p for p in pol.parameters() if p.requires_grad]
    torch.manual_seed(2)
    grads = []
    for _ in range(groups):
        s = torch.randn(B, 3, dtype=torch.float64)
        chain, _ = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
        logp, _ = rf.chain_log_prob(pol, s, chain[:, :K], K, SIG_MIN, SIG_MAX)
        g = torch.autograd.grad(logp.mean(), params, allow_unused=True, materialize_grads=True)
        grads.append(torch.cat([x.flatten() for x in g]))
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(groups)
    t = mean[se > 1e-12] / se[se > 1e-12]
    assert len(t) > 100 and (t**2).mean() < 1.6, (t**2).mean()  # E[t^2] = 15/13 for 16 groups


def test_clamp_fraction():
    """The measured size quoted in the module docstring: the fraction of x_K entries on the clip at
    initialisation (PickCube sizes: obs 42, Ta = Da = 4, K = 4, hidden 256, default sigma bounds)."""
    torch.manual_seed(0)
    pol = rf.FlowPolicy(42, 4, 4, 256)
    chain, _ = rf.sample_chain(pol, torch.randn(4096, 42), 4, SIG_MIN, SIG_MAX)
    frac = (chain[:, -1].abs() == 1).float().mean().item()
    assert 0.13 <= frac <= 0.18, frac


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ratio_is_one_with_unchanged_params(dtype):
    """PickCube sizes: the log-prob stored by the sampler (batches of 2 envs) against the scorer's in a
    shuffled minibatch of another size. Exact in float64; in float32 GEMMs of other batch sizes round
    differently, hence the script's bounds."""
    pol = rf.FlowPolicy(42, 4, 4, 256).to(dtype)
    K = 4
    s = torch.randn(40, 2, 42, dtype=dtype)
    chains, logps = zip(*(rf.sample_chain(pol, s[t], K, SIG_MIN, SIG_MAX) for t in range(40)), strict=True)
    b_s, b_c = s.reshape(80, 42), torch.stack(chains).reshape(80, K + 1, 16)
    b_lp = torch.stack(logps).flatten()
    mb = torch.randperm(80)[:27]
    new_lp, _ = rf.chain_log_prob(pol, b_s[mb], b_c[mb], K, SIG_MIN, SIG_MAX)
    _, ratio, kl, clipfrac = rf.ppo_policy_loss(new_lp, b_lp[mb], torch.randn(27, dtype=dtype), 0.01)
    if dtype == torch.float64:
        assert (ratio - 1).abs().max() < 1e-12
    assert (ratio.mean() - 1).abs() < 1e-6 and (ratio - 1).abs().max() < 1e-4
    assert clipfrac == 0


def test_ppo_loss_raises_the_log_prob_of_positive_advantages():
    new_logp = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=torch.float64)
    loss, *_ = rf.ppo_policy_loss(new_logp, torch.zeros(4, dtype=torch.float64), adv, 0.2)
    loss.backward()
    torch.testing.assert_close(new_logp.grad, -adv / 4)  # descending the loss raises log pi where A > 0
    new_logp = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)  # ratio e^0.5 > 1 + 0.2
    ones = torch.ones(2, dtype=torch.float64)
    loss, *_ = rf.ppo_policy_loss(new_logp, 0 * ones, ones, 0.2)
    loss.backward()
    assert (new_logp.grad == 0).all() and loss.item() == pytest.approx(-1.2)  # clipped: no further push


def test_ppo_loss_gradcheck_velocity_and_noise_params():
    pol = make_policy(hidden=8)
    K, B = 3, 6
    s = torch.randn(B, 3, dtype=torch.float64)
    chain, old_lp = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
    old_lp = old_lp + 0.003 * torch.randn(B).double()
    adv = torch.randn(B, dtype=torch.float64)
    names = ["v.net.0.bias", "v.net.6.weight", "v.net.6.bias", "sigma_net.0.bias", "sigma_net.4.weight"]
    params = tuple(dict(pol.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    pol_lp = LogProb(pol)

    def f(*ps):
        new_lp, ent = torch.func.functional_call(
            pol_lp, {"pol." + n: p for n, p in zip(names, ps, strict=True)}, (s, chain, K)
        )
        pg, *_ = rf.ppo_policy_loss(new_lp, old_lp, adv, 0.01)
        return pg - 0.03 * ent.mean()

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)
    grads = torch.autograd.grad(f(*params), params)
    assert all(g.abs().sum() > 0 for g in grads), "every checked parameter gets a gradient"


class LogProb(torch.nn.Module):
    def __init__(self, pol):
        super().__init__()
        self.pol = pol

    def forward(self, s, chain, K):
        return rf.chain_log_prob(self.pol, s, chain, K, SIG_MIN, SIG_MAX)


def test_sigma_stays_in_bounds():
    h = torch.linspace(-1e4, 1e4, 10001)
    sig = rf.squash_sigma(h, SIG_MIN, SIG_MAX)
    assert sig.min() >= SIG_MIN * (1 - 1e-6) and sig.max() <= SIG_MAX * (1 + 1e-6)
    torch.testing.assert_close(sig[[0, -1]], torch.tensor([SIG_MIN, SIG_MAX]))
    pol = make_policy(dtype=torch.float32)
    with torch.no_grad():
        for p in pol.sigma_net.parameters():
            p.mul_(100)  # saturate the noise net
        s = 100 * torch.randn(256, 3)
        for k in range(4):
            _, sigma = pol.transition(torch.randn(256, 4), k / 4, 4, s, SIG_MIN, 0.15)
            assert sigma.min() >= SIG_MIN * (1 - 1e-6) and sigma.max() <= 0.15 * (1 + 1e-6)
    # the sigma_max schedule holds, then anneals to sigma_min + 0.7 (sigma_max - sigma_min)
    sched = [rf.sigma_max_schedule(i, 100, SIG_MIN, SIG_MAX) for i in range(101)]
    assert sched[0] == sched[35] == SIG_MAX
    assert abs(sched[100] - (SIG_MIN + 0.7 * (SIG_MAX - SIG_MIN))) < 1e-12
    assert all(a >= b for a, b in zip(sched, sched[1:], strict=False))


MODES = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])


def test_sft_on_toy_multimodal_data():
    """1-Rectified Flow on four modes: the loss drops (to its floor, > 0 for multimodal data) and 8-step
    ODE samples land on the modes, each mode getting its share."""
    torch.manual_seed(0)
    pol = rf.FlowPolicy(1, 1, 2, 64)
    opt = torch.optim.Adam(pol.v.parameters(), lr=3e-3)
    losses = []
    for _ in range(800):
        a = MODES[torch.randint(0, 4, (256,))] + 0.02 * torch.randn(256, 2)
        loss = rf.rectified_flow_loss(pol.v, torch.zeros(256, 1), a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-100:]) < 0.7 * np.mean(losses[:20])
    with torch.no_grad():
        x = rf.ode_action(pol, torch.zeros(1000, 1), 8, torch.randn(1000, 2))
    near, which = torch.cdist(x, MODES).min(1)
    assert (near < 0.2).float().mean() > 0.7, (near < 0.2).float().mean()
    counts = torch.bincount(which[near < 0.2], minlength=4)
    assert (counts > 100).all(), counts  # all four modes are covered, none collapsed


def test_gae_argument_order():
    r, v, d = torch.ones(3, 1), torch.zeros(3, 1), torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = rf.gae(r, v, d, torch.full((1,), 10.0), gamma=0.5, gae_lambda=1.0)
    torch.testing.assert_close(adv.flatten(), torch.tensor([1.5, 1.0, 6.0]))  # the end at t=1 cuts t=0's sum


# ---------------------------------------------------------------- the chunk routine and evaluation
@pytest.mark.parametrize("env_id, vector_env", [("Pendulum-v1", "gymnasium"), ("PickCube-v1", "maniskill")])
def test_episode_end_inside_a_chunk_drops_the_leftover_actions(env_id, vector_env):
    """3-step episodes, chunks of 2: the second chunk ends the episode at its first action; its second action
    must not start the next episode, which begins fresh after the chunk (the batched path autoreset inside
    the chunk before, so the new episode was one step old)."""
    args = rf.Args(env_id=env_id, max_episode_steps=3, vector_env=vector_env, num_envs=1, num_eval_envs=1)
    rf.check_args(args, rf.is_maniskill(env_id))
    envs = rf.make_envs(args, 1)
    low, high = (x.astype(np.float32) for x in (envs.single_action_space.low, envs.single_action_space.high))
    obs, ep = rf.reset_all(envs, 0), rf.new_episode_stats(1)
    chunk = np.full((1, 2, len(low)), 0.5, np.float32)
    obs, *_ = rf.step_chunk(envs, obs, chunk, ep, low, high)
    trace = []
    obs, r, term, trunc, end_obs, eps = rf.step_chunk(envs, obs, chunk, ep, low, high, trace)
    assert trunc.tolist() == [True] and [e["episode_length"] for e in eps] == [3]
    assert [alive.tolist() for _, _, alive in trace] == [[True], [False]]
    elapsed = envs.unwrapped.elapsed_steps if vector_env == "maniskill" else envs.envs[0]._elapsed_steps
    assert int(elapsed[0] if vector_env == "maniskill" else elapsed) == 0  # a fresh episode, no leftover step
    obs, *_, eps = rf.step_chunk(envs, obs, chunk, ep, low, high)
    assert eps == [] and ep["length"].tolist() == [2]
    envs.close()


class FakeEnv:
    """Episodes of `length` steps with return `length` (reward 1 per step); a reset's obs shows its seed (-1:
    unseeded)."""

    def __init__(self, length):
        import gymnasium as gym

        self.length, self.t = length, 0
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)

    def reset(self, seed=None):
        self.t = 0
        return np.array([-1 if seed is None else seed, 0, 0], np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(3, np.float32), 1.0, False, self.t == self.length, {}


def test_evaluate_takes_the_same_number_of_episodes_from_each_env():
    """Env 0's episodes take 1 step, env 1's 5: the first 4 episodes to end would all be env 0's (mean
    return 1); 2 per env gives (1 + 1 + 5 + 5) / 4 = 3."""
    envs = rf.InProcessEnvs([lambda: FakeEnv(1), lambda: FakeEnv(5)])
    pol = make_policy(Ta=1, dtype=torch.float32)
    bounds = (-np.ones(2, np.float32), np.ones(2, np.float32))
    m = rf.evaluate(pol, envs, torch.as_tensor, 2, 4, 0, bounds)
    assert m["episode_return"] == 3.0 and m["episode_length"] == 3.0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_evaluation_episode_i_starts_from_the_reset_seeded_seed_plus_i(n):
    """Whatever the number of eval envs and episode lengths, episode i is the reset with seed + i: every
    script's --evaluate with one --seed plays the same initial states."""
    envs = rf.InProcessEnvs([lambda i=i: FakeEnv(1 + 2 * i) for i in range(n)])
    pol = make_policy(Ta=1, dtype=torch.float32)
    bounds = (-np.ones(2, np.float32), np.ones(2, np.float32))
    trajectories = []
    rf.evaluate(pol, envs, torch.as_tensor, 2, 5, 100, bounds, trajectories)
    assert [obs[0, 0] for obs, _, _ in trajectories] == [100, 101, 102, 103, 104]


# ---------------------------------------------------------------- runs: determinism, exact resume, guards
PENDULUM = "--env-id Pendulum-v1 --num-envs 2 --num-eval-envs 1 --eval-episodes 1 --num-steps 25"
PENDULUM += " --hidden-dim 16 --total-timesteps 1000 --eval-freq 400 --critic-warmup-iters 1"
PENDULUM += " --update-epochs 2 --num-minibatches 7"


def test_same_seed_same_numbers_and_exact_resume(tmp_path, monkeypatch):
    """(Minibatches of 7 from 50 samples: the one left over joins the last one, no NaN advantage std.)
    The same command twice logs identical scalars; a run resumed from its step-400 ckpt.pt (a copy taken
    when it was written) logs what the unbroken run logged from there on."""
    monkeypatch.chdir(tmp_path)
    saved = rf.save_checkpoint

    def save_and_copy(path, state):
        saved(path, state)
        if state.get("global_step") == 400:
            shutil.copy(path, tmp_path / "at400.pt")

    main(*PENDULUM.split(), "--exp-name", "a")
    monkeypatch.setattr(rf, "save_checkpoint", save_and_copy)
    main(*PENDULUM.split(), "--exp-name", "b")
    monkeypatch.setattr(rf, "save_checkpoint", saved)
    main(*PENDULUM.split(), "--exp-name", "c", "--checkpoint", str(tmp_path / "at400.pt"))
    a, b, c = (read_scalars(next((tmp_path / "runs").glob(f"*__{x}__*"))) for x in "abc")
    assert a == b and "losses/policy_loss" in a and "eval/return" in a
    after = {tag: [(s, v) for s, v in pts if s > 400] for tag, pts in a.items() if tag != "losses/sft_loss"}
    assert c == after and len(after["losses/policy_loss"]) == 3


def test_non_finite_loss_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = rf.ppo_policy_loss
    monkeypatch.setattr(rf, "ppo_policy_loss", lambda *a: (real(*a)[0] * math.nan, *real(*a)[1:]))
    with pytest.raises(SystemExit) as e:
        main(*PENDULUM.split())
    assert str(e.value).startswith("error: non-finite loss at step 200; last good checkpoint: runs/")


def write_h5(path, actions=True):
    with h5py.File(path, "w") as f:
        f["traj_0/obs"] = np.zeros((5, 42), np.float32)
        if actions:
            f["traj_0/actions"] = np.zeros((4, 4), np.float32)
    info = {"env_info": {"env_id": "PickCube-v1", "env_kwargs": {"control_mode": "pd_ee_delta_pos"}}}
    path.with_suffix(".json").write_text(json.dumps(info))


def test_bad_inputs_exit_with_one_line_before_any_env_or_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rf, "make_envs", lambda *a, **k: pytest.fail("built an env before failing"))
    write_h5(tmp_path / "good.h5")
    (tmp_path / "trunc.h5").write_bytes((tmp_path / "good.h5").read_bytes()[:300])
    (tmp_path / "notes.h5").write_text("not an h5 file")
    write_h5(tmp_path / "noact.h5", actions=False)
    for name in ("trunc", "notes"):
        shutil.copy(tmp_path / "good.json", tmp_path / f"{name}.json")
    torch.save({"agent": {}, "args": {}}, tmp_path / "other.pt")
    pick = ["--env-id", "PickCube-v1", "--demo-path"]
    cases = [
        (pick + [str(tmp_path / "trunc.h5")], "trunc.h5"),
        (pick + [str(tmp_path / "notes.h5")], "notes.h5"),
        (pick + [str(tmp_path / "noact.h5")], "noact.h5"),
        (pick + [str(tmp_path / "none.h5")], "not found"),
        (["--env-id", "Hopper-v5", "--num-envs", "0"], "--num-envs"),
        (["--env-id", "Hopper-v5", "--num-envs", "-1"], "--num-envs"),
        (["--env-id", "Hopper-v5", "--gamma", "2"], "--gamma"),
        (["--env-id", "Hopper-v5", "--sigma-min", "0.5", "--sigma-max", "0.1"], "--sigma-min"),
        (["--env-id", "Hopper-v5", "--num-envs", "1", "--num-steps", "3", "--num-minibatches", "2"], "< 2"),
        (["--env-id", "Hopper-v5", "--checkpoint", str(tmp_path / "other.pt")], "not written by reinflow.py"),
        (["--env-id", "Hopper-v5", "--checkpoint", str(tmp_path / "none.pt"), "--evaluate"], "not found"),
        (["--env-id", "Hopper-v5", "--evaluate"], "--checkpoint"),
        (["--env-id", "Hopper-v5", "--vector-env", "maniskill"], "--vector-env"),
        (["--env-id", "PickCube-v1", "--sim-backend=physx_cpu", "--vector-env=maniskill"], "--num-envs 1"),
        (["--env-id", "NoSuchEnv-v0"], "unknown --env-id"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as e:
            main(*argv)
        msg = str(e.value)
        assert msg.startswith("error:") and "\n" not in msg and needle in msg, (argv, msg)
    assert not (tmp_path / "runs").exists()
    # the command line itself: one line on stderr, no traceback
    r = run_script("reinflow.py", "--env-id", "Hopper-v5", "--gamma", "2", timeout=120)
    assert_one_line_error(r, "--gamma")


def test_demo_shape_error_before_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.npz"
    np.savez(bad, obs=np.zeros((10, 7)), actions=np.zeros((10, 3)), episode_ends=np.array([10]))
    with pytest.raises(SystemExit) as e:
        main("--env-id", "Hopper-v5", "--demo-path", str(bad))
    assert "obs dim 7" in str(e.value) and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- CLI runs
def checkpoints(stdout):
    return [ln.split("checkpoint ")[1] for ln in stdout.splitlines() if ln.startswith("checkpoint ")]


def test_relative_reward_is_the_difference_of_consecutive_rewards():
    """InvertedPendulum pays 1 per step: relative rewards are 1 at an episode's first step, then 0, and a
    reset of one env (reset_mask; env_idx in a batched env) restarts only that env's r_{t-1}."""
    envs = rf.make_envs(rf.Args(env_id="InvertedPendulum-v5"), 2, relative=True)
    try:
        envs.reset(seed=[0, 1])
        zero = np.zeros((2, 1), np.float32)
        assert envs.step(zero)[1].tolist() == [1.0, 1.0]
        envs.step(zero)
        assert envs.step(zero)[1].tolist() == [0.0, 0.0]
        envs.reset(options={"reset_mask": np.array([True, False])})
        assert envs.step(zero)[1].tolist() == [1.0, 0.0]
    finally:
        envs.close()

    class Batched(gym.Env):  # two envs in one, paying t² at their t-th step, as ManiSkill's tensors
        observation_space = action_space = gym.spaces.Box(-1, 1, (1,))
        t = torch.zeros(2)

        def reset(self, *, seed=None, options=None):
            self.t[(options or {}).get("env_idx", slice(None))] = 0
            return torch.zeros(2, 1), {}

        def step(self, action):
            self.t += 1
            return torch.zeros(2, 1), self.t**2, torch.zeros(2, dtype=bool), torch.zeros(2, dtype=bool), {}

    env = rf.RelativeReward(Batched())
    env.reset()
    assert [env.step(None)[1].tolist() for _ in range(3)] == [[1, 1], [3, 3], [5, 5]]
    env.reset(options={"env_idx": torch.tensor([0])})
    assert env.step(None)[1].tolist() == [1, 7]  # env 0: 1 - 0; env 1: 16 - 9


def test_smoke_mujoco_sft_finetune_evaluate_save_demos(tmp_path, monkeypatch, capsys):
    """Shortcut flow, K=2 on Hopper-v5 from a random-action npz; then --evaluate (the number logged in
    training, written to <ckpt>.eval.json) and --save-demos of the checkpoint."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    demos, saved = tmp_path / "random.npz", tmp_path / "saved.npz"
    np.savez(demos, obs=rng.normal(size=(60, 11)), actions=rng.uniform(-1, 1, (60, 3)), episode_ends=[30, 60])
    hop = "--env-id Hopper-v5 --num-envs 1 --num-eval-envs 1 --max-episode-steps 30 --flow shortcut".split()
    hop += ["--denoising-steps", "2", "--hidden-dim", "32"]
    ft = "--sft-steps 20 --total-timesteps 80 --num-steps 10 --eval-episodes 1 --critic-warmup-iters 0"
    main(*hop, "--demo-path", str(demos), *ft.split(), "--seed", "3")
    out = capsys.readouterr().out
    assert out.startswith("run runs/Hopper-v5__reinflow__3__") and "| demos 60 transitions" in out
    assert "step 80/80" in out and "eval step 80:" in out
    sft, *_, ckpt = checkpoints(out)
    assert sft.endswith("sft.pt") and ckpt.endswith("ckpt.pt")
    logged = [ln for ln in out.splitlines() if ln.startswith("eval step 80:")][0]
    main(*hop, "--checkpoint", ckpt, "--evaluate", "--eval-episodes", "1")
    # the checkpoint's seed 3 and its own x_0 generator: the number logged in training
    assert logged in capsys.readouterr().out
    m = json.load(open(ckpt.removesuffix(".pt") + ".eval.json"))
    assert m["episodes"] == 1 and m["step"] == 80 and np.isfinite(m["episode_return"])
    main(*hop, "--checkpoint", ckpt, "--save-demos", "2", "--demo-out", str(saved))
    d = np.load(saved)
    assert d["obs"].shape[1] == 11 and len(d["returns"]) == 2
    assert d["actions"].shape == (d["episode_ends"][-1], 3)


def test_batched_path_on_cpu_sft_train_resume_evaluate(pickcube_demos, tmp_path, monkeypatch):
    """The GPU code path (one batched ManiSkill env in ManiSkillVectorEnv) on physx_cpu: SFT, a few hundred
    env steps of PPO with evaluations and checkpoints, a resume that continues the run, then --evaluate."""
    monkeypatch.chdir(tmp_path)
    pick = "--env-id PickCube-v1 --sim-backend physx_cpu --vector-env maniskill --num-envs 1"
    pick += " --num-eval-envs 1 --eval-episodes 1 --max-episode-steps 12 --hidden-dim 32 --num-steps 8"
    pick += " --eval-freq 64"
    pick = pick.split()
    ft = "--sft-steps 30 --critic-warmup-iters 0 --bc-coef 0.1 --relative-reward".split()
    main(*pick, *ft, "--demo-path", str(pickcube_demos), "--total-timesteps", "192", "--exp-name", "first")
    run = next((tmp_path / "runs").glob("*__first__*"))
    assert {p.name for p in run.iterdir()} >= {"sft.pt", "ckpt.pt"}
    # actions are scaled by the demos' range, which the checkpoint keeps: chunk -> env gives the demo back
    episodes = rf.read_demos(str(pickcube_demos), "PickCube-v1", "pd_ee_delta_pos", None)
    sft = torch.load(run / "sft.pt", weights_only=False)
    low, high = sft["act_low"].numpy(), sft["act_high"].numpy()
    raw = np.concatenate([a for _, a in episodes])
    np.testing.assert_allclose((low, high), (raw.min(0), raw.max(0)))
    _, chunks, *range_ = rf.demo_chunks(episodes, 42, 4, 4)
    np.testing.assert_array_equal(range_, (low, high))
    assert chunks.min() == -1 and chunks.max() == 1
    np.testing.assert_allclose(low + (chunks[: len(episodes[0][1]), :4] + 1) * (high - low) / 2,
                               episodes[0][1], atol=1e-6)  # fmt: skip
    assert torch.load(run / "ckpt.pt", weights_only=False)["global_step"] == 192
    main(*pick, *ft, "--checkpoint", str(run / "ckpt.pt"), "--total-timesteps", "256", "--exp-name", "second")
    resumed = next((tmp_path / "runs").glob("*__second__*"))
    assert [s for s, _ in read_scalars(resumed)["losses/policy_loss"]] == [224, 256]
    m = main(*pick, "--checkpoint", str(resumed / "ckpt.pt"), "--evaluate")
    assert 0.0 <= m["success_once"] <= 1.0 and m["episode_length"] == 12

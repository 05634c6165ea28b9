"""flow_sde_ppo.py: Flow-SDE math vs closed forms and torch.distributions, the sampler vs the scorer, PPO
invariants, bad inputs, determinism and exact resume, the CPU and the batched (GPU) env paths."""

import json
import math
import re
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import tyro
from conftest import assert_one_line_error, read_scalars, run_script, snapshot

import flow_sde_ppo as F

# Gaussian data x_0 ~ N(m, S), noise x_1 ~ N(0, I), x_t = (1 − t)·x_0 + t·x_1: the marginal is
# N((1 − t)·m, (1 − t)²·S + t²·I) and the exact velocity E[x_1 − x_0 | x_t = x] is linear in x.
M = torch.tensor([1.0, -0.5], dtype=torch.float64)
L = torch.tensor([[0.6, 0.0], [0.3, 0.4]], dtype=torch.float64)
S = L @ L.T
EYE = torch.eye(2, dtype=torch.float64)


def marginal(t):
    return (1 - t) * M, (1 - t) ** 2 * S + t**2 * EYE


def exact_velocity(x, t):
    mu, cov = marginal(t)  # v = (t·I − (1 − t)·S)·Σ_t⁻¹·(x − μ_t) − m
    return (x - mu) @ torch.linalg.solve(cov, t * EYE - (1 - t) * S).T - M


def run_chain(a, sampler, K, n, seed, velocity=exact_velocity):
    """Integrates from x_1 ~ N(0, I) with the script's step; yields (t, samples) after every step."""
    gen = torch.Generator().manual_seed(seed)
    t, x = F.time_grid(K), torch.randn(n, 2, dtype=torch.float64, generator=gen)
    sigma = F.flow_sde_sigma(t, a)
    for k in range(K):
        mu, std = F.denoise_step(x, velocity(x, t[k]), t[k], t[k] - t[k + 1], sigma[k], a, sampler)
        x = mu + std * torch.randn(x.shape, dtype=x.dtype, generator=gen)
        yield t[k + 1], x


@pytest.mark.parametrize("a, sampler", [(0.5, "sde"), (1.0, "sde"), (0.0, "ode")])
def test_marginals_preserved(a, sampler):
    """Many SDE (and ODE) samples match the known marginal at t = 0.75, 0.5, 0.25, 0: every mean and
    covariance entry within 4 Monte Carlo standard errors."""
    K, n = 200, 20_000
    for t, x in run_chain(a, sampler, K, n, seed=0):
        if not torch.isclose(t * 4, torch.round(t * 4), atol=1e-9) or t == 1:
            continue
        mu, cov = marginal(t)
        var = torch.diag(cov)
        z_mean = (x.mean(0) - mu).abs() / (var / n).sqrt()
        z_cov = (torch.cov(x.T) - cov).abs() / ((var[:, None] * var[None] + cov**2) / n).sqrt()
        assert z_mean.max() < 4 and z_cov.max() < 4, (float(t), z_mean, z_cov)


def test_zero_noise_sde_is_the_ode_exactly():
    x, v = torch.randn(64, 8, 4), torch.randn(64, 8, 4)
    t = F.time_grid(4)
    sigma = F.flow_sde_sigma(t, 0.0)
    for k in range(4):
        mu_sde, std = F.denoise_step(x, v, t[k], t[k] - t[k + 1], sigma[k], 0.0, "sde")
        mu_ode, _ = F.denoise_step(x, v, t[k], t[k] - t[k + 1], sigma[k], 0.0, "ode")
        assert torch.equal(mu_sde, mu_ode) and torch.equal(std, torch.zeros_like(std))
    agent, o = F.Agent(10, 4, 8, 32), torch.randn(16, 10)
    torch.manual_seed(3)
    chain_sde, _ = agent.sample(o, 4, [0, 1, 2, 3], 0.0, "sde")
    torch.manual_seed(3)
    chain_ode, _ = agent.sample(o, 4, [], 0.0, "ode")
    assert torch.equal(chain_sde, chain_ode)


def test_cps_preserves_coefficients():
    """With an exact x̂_0 (point-mass data) CPS keeps x_t ~ N((1 − t)·m, t²·I) at every step, and with
    a = 0 it is the Euler step."""
    vel = lambda x, t: (x - (1 - t) * M) / t - M  # noqa: E731  (data = δ_m)
    n = 20_000
    for t, x in run_chain(0.7, "cps", 4, n, seed=1, velocity=vel):
        if t > 0:
            assert ((x.mean(0) - (1 - t) * M).abs() / (t / math.sqrt(n))).max() < 4
            assert ((torch.cov(x.T) - t**2 * EYE).abs() / (t**2 * math.sqrt(2 / n))).max() < 4
    x, v, t, dt = torch.randn(32, 3, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64), 0.75, 0.25
    mu, std = F.denoise_step(x, v, torch.tensor(t), torch.tensor(dt), None, 0.0, "cps")
    assert torch.allclose(mu, x - dt * v) and torch.all(std == 0)


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("logprob_type", ["chunk", "token"])
def test_single_step_log_prob_vs_torch_distributions(sampler, logprob_type):
    torch.manual_seed(0)
    K, H, A, C, a, B = 4, 8, 3, 5, 0.6, 32
    agent, o = F.Agent(7, A, H, 32).double(), torch.randn(B, 7, dtype=torch.float64)
    chain, _ = agent.sample(o, K, [0, 1, 2], a, sampler)
    idx = torch.randint(0, K - 1, (B, 1))
    got = F.reduce_log_prob(agent.log_prob(o, chain, idx, K, a, sampler), C, logprob_type)
    rows, k = torch.arange(B), idx[:, 0]
    t, dt = (1 - k / K).double()[:, None, None], 1 / K
    x, x_next = chain[rows, k], chain[rows, k + 1]
    v = agent.v(x, t[:, 0, 0], o)
    if sampler == "sde":  # written out from the issue: σ_t = a·sqrt(t/(1 − t)), 1 − t_1 = 1/K at t = 1
        sig = a * torch.sqrt(t / torch.where(t == 1, torch.full_like(t, 1 / K), 1 - t))
        mu = x * (1 - sig**2 * dt / (2 * t)) - v * dt * (1 + sig**2 * (1 - t) / (2 * t))
        std = sig * math.sqrt(dt)
    else:
        mu = (x - t * v) * (1 - t + dt) + (x + (1 - t) * v) * (t - dt) * math.cos(math.pi * a / 2)
        std = (t - dt) * math.sin(math.pi * a / 2)
    ref = torch.distributions.Normal(mu, std.expand_as(mu)).log_prob(x_next)[:, :C]
    ref = ref.sum((1, 2)) if logprob_type == "chunk" else ref
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert torch.allclose(
        F.flow_sde_sigma(F.time_grid(K), a)[0], torch.tensor(a * math.sqrt(K), dtype=torch.float64)
    )


@pytest.mark.parametrize("sde_steps", ["one", "all"])
@pytest.mark.parametrize("logprob_type", ["chunk", "token"])
@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_ratio_is_one_at_first_minibatch(sde_steps, logprob_type, sampler):
    torch.manual_seed(0)
    args = F.Args(sde_steps=sde_steps, logprob_type=logprob_type, sampler=sampler, update_epochs=1)
    args.num_minibatches, args.minibatch_size = 1, 48
    K, C, A = args.denoising_steps, args.num_action_chunks, 4
    agent = F.Agent(11, A, args.action_horizon, 64)
    rng, o = np.random.default_rng(0), torch.randn(48, 11)
    chains, idxs, logps = [], [], []
    for i in range(3):  # three chunk steps, each with its own k*
        ks = F.stochastic_steps(K, sde_steps, sampler, rng)
        chain, logp = agent.sample(o[16 * i : 16 * (i + 1)], K, ks, args.noise_level, sampler)
        chains.append(chain)
        idxs.append(torch.tensor(ks).expand(16, -1))
        logps.append(F.reduce_log_prob(logp, C, logprob_type))
    b = dict(obs=o, chain=torch.cat(chains), idx=torch.cat(idxs), logp=torch.cat(logps))
    new = F.reduce_log_prob(
        agent.log_prob(o, b["chain"], b["idx"], K, args.noise_level, sampler), C, logprob_type
    )
    torch.testing.assert_close(torch.exp(new - b["logp"]), torch.ones_like(new), rtol=0, atol=1e-5)
    with torch.no_grad():
        b["values"] = agent.value(o)
    b["adv"], b["returns"] = torch.randn(48), b["values"] + torch.randn(48)
    opt = torch.optim.Adam(agent.parameters(), lr=1e-3)
    stats = F.ppo_update(agent, opt, b, args)
    assert abs(stats["approx_kl"]) < 1e-9 and stats["clipfrac"] == 0


@pytest.mark.parametrize("shape", [(6,), (6, 5, 4)])
def test_ppo_loss_gradcheck(shape):
    torch.manual_seed(0)
    logp = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    old_logp = (logp + 0.3 * torch.randn(shape, dtype=torch.float64)).detach()
    value = torch.randn(6, dtype=torch.float64, requires_grad=True)
    old_value = (value + 0.5 * torch.randn(6, dtype=torch.float64)).detach()
    adv, ret = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64) * 5

    def loss(lp, v):
        pg, _, _ = F.policy_loss(lp, old_logp, adv, 0.2)
        return pg + F.value_loss(v, old_value, ret, huber_delta=1.0)

    assert torch.autograd.gradcheck(loss, (logp, value))
    # and through the SDE step into the velocity the actor's gradient flows through
    x, x_next = torch.randn(4, 8, 3, dtype=torch.float64), torch.randn(4, 8, 3, dtype=torch.float64)
    v = torch.randn(4, 8, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)[:, None, None]
    sig = 0.5 * torch.sqrt(t / torch.tensor([0.25, 0.25, 0.5, 0.75], dtype=torch.float64)[:, None, None])

    def step_logp(v):
        mu, std = F.denoise_step(x, v, t, torch.full_like(t, 0.25), sig, 0.5, "sde")
        return F.gaussian_log_prob(x_next, mu, std).sum()

    assert torch.autograd.gradcheck(step_logp, (v,))


class SeedEchoEnvs:
    """n envs, the vector API without autoreset: env i's episodes last 1 + 2i steps, and the first step's
    reward is the seed of the reset that began the episode (-1: unseeded): the return says where it began."""

    def __init__(self, n):
        self.num_envs, self.t, self.seed = n, np.zeros(n, int), np.full(n, -1.0)

    def reset(self, seed=None, options=None):
        idx = options["env_idx"].numpy() if options else np.arange(self.num_envs)
        self.t[idx] = 0
        self.seed[idx] = -1.0 if seed is None else np.asarray(seed, float)[idx]
        return np.zeros((self.num_envs, 1), np.float32), {}

    def step(self, action):
        r = np.where(self.t == 0, self.seed, 0.0)
        self.t += 1
        term = self.t >= 1 + 2 * np.arange(self.num_envs)
        return np.zeros((self.num_envs, 1), np.float32), r, term, np.zeros_like(term), {}


class ZeroAgent:
    def normalize(self, o):
        return o

    def sample(self, o, K, stochastic, a, sampler, generator=None):
        return torch.zeros(len(o), K + 1, 8, 1), None

    def to_env(self, x):
        return x


@pytest.mark.parametrize("n", [1, 2, 3])
def test_evaluation_episode_i_starts_from_the_reset_seeded_seed_plus_10000_plus_i(n):
    """Whatever the number of eval envs and episode lengths, episode i is the reset with seed + 10000 + i:
    every script's --evaluate with one --seed plays the same initial states."""
    args = F.Args(seed=5, eval_episodes=5, denoising_steps=1, num_action_chunks=2)
    res = F.evaluate(ZeroAgent(), SeedEchoEnvs(n), args, "cpu")
    assert res["return"] == np.mean([10_005 + i for i in range(5)])


def test_gae_matches_hand_computation():
    r, v = torch.tensor([[1.0], [0.0], [2.0]]), torch.tensor([[0.5], [0.2], [0.1]])
    d, nv = torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([0.3])
    adv, ret = F.gae(r, v, d, nv, 0.9, 0.8)
    d2 = 2.0 + 0.9 * 0.3 - 0.1
    d1 = 0.0 - 0.2  # episode ended: no bootstrap, no carry
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    torch.testing.assert_close(adv[:, 0], torch.tensor([d0 + 0.72 * d1, d1, d2]))
    torch.testing.assert_close(ret, adv + v)


def test_demo_actions_scaled_by_their_range_and_back_through_the_checkpoint(pickcube_demos, tmp_path):
    import h5py

    demos = F.read_demos(str(pickcube_demos), 2, "pd_ee_delta_pos")
    obs, chunks, low, high = F.demo_chunks(demos, 42, 4, 8)
    assert obs.shape[0] == chunks.shape[0] and chunks.shape[1:] == (8, 4)
    torch.testing.assert_close(chunks.amin((0, 1)), -torch.ones(4))
    torch.testing.assert_close(chunks.amax((0, 1)), torch.ones(4))
    agent, args = F.Agent(42, 4, 8, 32), F.Args()
    agent.act_low.copy_(low)
    agent.act_high.copy_(high)
    opt, rng = torch.optim.Adam(agent.parameters()), np.random.default_rng(0)
    F.save_checkpoint(str(tmp_path / "c.pt"), agent, opt, args, 0, 0, rng)
    loaded = F.Agent(42, 4, 8, 32)
    loaded.load_state_dict(F.load_checkpoint(str(tmp_path / "c.pt"), args)["agent"])
    with h5py.File(pickcube_demos) as f:
        raw = torch.as_tensor(np.asarray(f["traj_0"]["actions"]))
    torch.testing.assert_close(loaded.to_env(chunks[: len(raw), 0]), raw)  # the env gets the demo's actions


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny Llama saved with save_pretrained: stands for any local Hugging Face checkpoint."""
    from transformers import AutoModel, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("hf") / "tiny_llama"
    AutoModel.from_config(cfg).save_pretrained(path)
    return path


def test_transformer_backbone_from_pretrained_and_through_the_checkpoint(tiny_hf, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    agent, o = F.Agent(11, 3, 8, 32, "transformer", str(tiny_hf)), torch.randn(6, 11)
    saved = AutoModel.from_pretrained(tiny_hf, local_files_only=True).state_dict()
    assert all(torch.equal(w, saved[k]) for k, w in agent.velocity.lm.state_dict().items())
    chain, logp = agent.sample(o, 4, [2], 0.5, "sde")
    agent.train()  # the update's mode: still the rollout's log-prob (no dropout)
    new = agent.log_prob(o, chain, torch.full((6, 1), 2), 4, 0.5, "sde")
    torch.testing.assert_close(new, logp, rtol=0, atol=1e-6)
    args = F.Args(backbone="transformer", hidden_dim=32)
    opt, rng = torch.optim.Adam(agent.parameters()), np.random.default_rng(0)
    F.save_checkpoint(str(tmp_path / "c.pt"), agent, opt, args, 0, 0, rng)
    ckpt = F.load_checkpoint(str(tmp_path / "c.pt"), args)
    loaded = F.Agent(11, 3, 8, 32, "transformer", config=ckpt["backbone_config"])
    loaded.load_state_dict(ckpt["agent"])
    t = torch.full((6,), 0.5)
    torch.testing.assert_close(loaded.v(chain[:, 2], t, o), agent.v(chain[:, 2], t, o), rtol=0, atol=0)


def ks_statistic(z):
    """Kolmogorov–Smirnov distance between the sample z and N(0, 1)."""
    n, cdf = len(z), torch.special.ndtr(z.sort().values)
    i = torch.arange(1, n + 1, dtype=z.dtype)
    return max((i / n - cdf).max().item(), (cdf - (i - 1) / n).max().item())


@pytest.mark.parametrize("sampler", ["sde", "cps"])
def test_sampler_and_scorer_agree(sampler):
    """Chains drawn by Agent.sample (the rollout's sampler) from a fixed random network, against the scorer's
    μ_k and std_k (Agent.transition, what Agent.log_prob scores): at every stochastic step the standardised
    residuals (x_{k+1} − μ_k)/std_k are N(0, 1) in mean, variance (a sampler adding std²·ε gives 0.3-0.5) and
    distribution (KS), and the score-function identity E[∇_θ log π(chain)] = 0 holds within its Monte Carlo
    error, along random directions of θ."""
    torch.manual_seed(0)
    K, H, A, C, B, a = 4, 8, 3, 5, 2000, 0.7
    agent, o = F.Agent(5, A, H, 32).double(), torch.randn(B, 5, dtype=torch.float64)
    ks = F.stochastic_steps(K, "all", sampler, None)
    chain, logp = agent.sample(o, K, ks, a, sampler)
    n = B * H * A
    for s, k in enumerate(ks):
        mu, std = agent.transition(o, chain, torch.full((B,), k), K, a, sampler)
        z = ((chain[:, k + 1] - mu) / std).flatten()
        assert abs(z.mean()) < 4 / math.sqrt(n), (k, z.mean())
        assert abs(z.var() - 1) < 4 * math.sqrt(2 / n), (k, z.var())
        assert ks_statistic(z) * math.sqrt(n) < 1.95, k  # p = 0.001
        ref = torch.distributions.Normal(mu, std).log_prob(chain[:, k + 1])
        torch.testing.assert_close(logp[:, s], ref, rtol=1e-10, atol=1e-10)

    def log_pi(shift):
        moved = F.Agent(5, A, H, 32).double()
        moved.load_state_dict(agent.state_dict())
        with torch.no_grad():
            for p, d in zip(moved.velocity.parameters(), shift, strict=True):
                p += d
            logp = moved.log_prob(o, chain, torch.tensor(ks).expand(B, -1), K, a, sampler)
        return F.reduce_log_prob(logp, C, "chunk")

    for _ in range(3):  # u·∇_θ log π of every chain, by central differences along a random direction u
        u = [1e-5 * torch.randn_like(p) for p in agent.velocity.parameters()]
        g = (log_pi(u) - log_pi([-d for d in u])) / 2e-5
        assert g.std() > 0 and abs(g.mean()) < 4 * g.std() / math.sqrt(B), (g.mean(), g.std())


def test_sde_steps_all_log_prob_is_the_mean_over_steps():
    """--sde-steps all, recomputed here from the closed form: log π = (1/K)·Σ_k log N(x_{k+1}; μ_k, σ_k²Δ)
    summed over the executed C×A entries; the rollout's stored value and PPO's recomputation both equal it."""
    torch.manual_seed(0)
    K, H, A, C, a, B = 4, 8, 3, 5, 0.5, 16
    agent, o = F.Agent(7, A, H, 32).double(), torch.randn(B, 7, dtype=torch.float64)
    ks = F.stochastic_steps(K, "all", "sde", None)
    assert ks == [0, 1, 2, 3]
    chain, logp = agent.sample(o, K, ks, a, "sde")
    total = 0
    for k in ks:
        t, dt = 1 - k / K, 1 / K
        x, x_next = chain[:, k], chain[:, k + 1]
        v = agent.v(x, torch.tensor(t, dtype=torch.float64), o)
        sig = a * math.sqrt(t / (1 - t if t < 1 else dt))
        mu = x * (1 - sig**2 * dt / (2 * t)) - v * dt * (1 + sig**2 * (1 - t) / (2 * t))
        step = torch.distributions.Normal(mu, sig * math.sqrt(dt)).log_prob(x_next)
        total = total + step[:, :C].sum((1, 2))
    recomputed = agent.log_prob(o, chain, torch.tensor(ks).expand(B, -1), K, a, "sde")
    for got in (F.reduce_log_prob(logp, C, "chunk"), F.reduce_log_prob(recomputed, C, "chunk")):
        torch.testing.assert_close(got, total / K, rtol=1e-10, atol=1e-10)


def test_is_maniskill_after_mani_skill_registered_its_ids():
    import mani_skill.envs  # noqa: F401  (registers functools.partial entry points, not strings)

    assert F.is_maniskill("PickCube-v1") and not F.is_maniskill("Pendulum-v1")
    with pytest.raises(SystemExit, match="^error: unknown --env-id 'NoSuchEnv-v0'"):
        F.is_maniskill("NoSuchEnv-v0")


def test_non_finite_loss_raises_before_the_step():
    torch.manual_seed(0)
    args = F.Args(num_minibatches=1, update_epochs=1)
    agent, o = F.Agent(3, 2, 8, 16), torch.randn(8, 3)
    chain, logp = agent.sample(o, 4, [1], 0.5, "sde")
    b = dict(obs=o, chain=chain, idx=torch.ones(8, 1, dtype=torch.long), values=torch.zeros(8))
    b |= dict(logp=F.reduce_log_prob(logp, 5, "chunk"), adv=torch.randn(8))
    b["returns"] = torch.full((8,), math.nan)
    before = [p.clone() for p in agent.parameters()]
    with pytest.raises(FloatingPointError, match="value_loss"):
        F.ppo_update(agent, torch.optim.Adam(agent.parameters()), b, args)
    assert all(torch.equal(p, q) for p, q in zip(before, agent.parameters(), strict=True))


def test_demo_shapes_and_control_mode_checked(pickcube_demos):
    demos = F.read_demos(str(pickcube_demos), None, "pd_ee_delta_pos")
    with pytest.raises(SystemExit, match="^error: demo traj_0 has obs .* env has obs dim 4 and action dim 1"):
        F.demo_chunks(demos, 4, 1, 8)
    with pytest.raises(SystemExit, match="^error: demos use control_mode 'pd_ee_delta_pos'"):
        F.read_demos(str(pickcube_demos), None, "pd_joint_delta_pos")


def bad_files(d: Path, demos: Path) -> dict[str, str]:
    """Broken inputs, written into d."""
    import h5py

    (d / "truncated.h5").write_bytes(demos.read_bytes()[: demos.stat().st_size // 2])
    (d / "text.h5").write_text("not an h5 file")
    with h5py.File(d / "no_actions.h5", "w") as f:
        f.create_dataset("traj_0/obs", data=np.zeros((3, 42)))
    (d / "junk.pt").write_text("not a checkpoint")
    torch.save({"script": "sac_flow", "actor": {}}, d / "other.pt")
    args = F.Args(env_id="Pendulum-v1", seed=1)
    agent = F.Agent(3, 1, args.action_horizon, args.hidden_dim)
    opt = torch.optim.Adam(agent.parameters())
    F.save_checkpoint(str(d / "pendulum.pt"), agent, opt, args, 0, 0, np.random.default_rng(0))
    return {p.stem: str(p) for p in d.iterdir()}


BAD_INPUTS = {  # flags (with {file} names from bad_files) -> what the one error line must name
    "num_envs_0": (["--num-envs", "0"], ["--num-envs 0"]),
    "num_envs_-1": (["--num-envs", "-1"], ["--num-envs -1"]),
    "denoising_steps_0": (["--denoising-steps", "0"], ["--denoising-steps 0"]),
    "denoising_steps_-1": (["--denoising-steps", "-1"], ["--denoising-steps -1"]),
    "gamma_2": (["--gamma", "2"], ["--gamma 2.0"]),
    "one_sample_minibatch": (["--num-envs", "1", "--num-steps", "3", "--num-minibatches", "2"],
                             ["--num-minibatches 2", "minibatches of 1"]),
    "unknown_env": (["--env-id", "NoSuchEnv-v0"], ["--env-id 'NoSuchEnv-v0'"]),
    "batched_env_for_gymnasium_id": (["--env-id", "Pendulum-v1", "--vector-env", "maniskill"],
                                     ["--vector-env maniskill", "Pendulum-v1"]),
    "batched_physx_cpu_2_envs": (["--sim-backend", "physx_cpu", "--vector-env", "maniskill"],
                                 ["--num-envs 1"]),
    "truncated_h5": (["--demo-path", "{truncated}"], ["{truncated}"]),
    "not_h5": (["--demo-path", "{text}"], ["{text}"]),
    "h5_without_actions": (["--demo-path", "{no_actions}"], ["{no_actions}", "actions"]),
    "demo_not_h5_suffix": (["--demo-path", "{junk}"], ["--demo-path", "{junk}"]),
    "missing_demo": (["--demo-path", "nothing.h5"], ["nothing.h5", "make_demos.sh"]),
    "missing_checkpoint": (["--checkpoint", "nothing.pt"], ["nothing.pt", "not found"]),
    "junk_checkpoint": (["--checkpoint", "{junk}"], ["{junk}", "not a torch checkpoint"]),
    "other_script_checkpoint": (["--checkpoint", "{other}", "--evaluate"], ["{other}", "sac_flow"]),
    "other_env_checkpoint": (["--checkpoint", "{pendulum}"], ["{pendulum}", "Pendulum-v1", "--env-id"]),
    "evaluate_without_checkpoint": (["--evaluate"], ["--evaluate needs --checkpoint"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_before_envs_with_one_line(case, pickcube_demos, tmp_path, monkeypatch):
    """Every bad flag or file: one `error:` line naming it, before any env is built, nothing written."""
    files = bad_files(tmp_path, pickcube_demos)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(F, "make_envs", lambda *a, **k: pytest.fail("built an env before validating"))
    flags, needles = BAD_INPUTS[case]
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        F.main(tyro.cli(F.Args, args=[f.format(**files) for f in flags]))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for needle in needles:
        assert needle.format(**files) in msg, (needle, msg)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_physx_cuda_without_a_gpu_is_refused():
    with pytest.raises(SystemExit, match="^error: --sim-backend physx_cuda needs a CUDA GPU"):
        F.check_args(F.Args(sim_backend="physx_cuda"))


def test_cli_bad_demo_file_one_line_no_traceback_no_run_dir(tmp_path):
    (tmp_path / "broken.h5").write_text("not an h5 file")
    demo, name = str(tmp_path / "broken.h5"), "test_fsp_bad_demo"
    res = run_script("flow_sde_ppo.py", "--env-id", "Pendulum-v1", "--demo-path", demo, "--exp-name", name)
    assert_one_line_error(res, demo)
    assert res.returncode == 1 and not list(Path(F.__file__).parent.glob(f"runs/*__{name}__*"))


# tiny Pendulum runs, in-process: 40 env steps per iteration, an evaluation and checkpoint after each
PENDULUM = ["--env-id", "Pendulum-v1", "--num-envs", "1", "--num-eval-envs", "1", "--num-steps", "8",
            "--num-minibatches", "2", "--hidden-dim", "32", "--max-episode-steps", "20",
            "--eval-episodes", "1", "--eval-freq", "40"]  # fmt: skip


def test_non_finite_loss_stops_the_run_with_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    real = F.policy_loss

    def nan_policy_loss(*args):
        pg_loss, *rest = real(*args)
        return pg_loss * math.nan, *rest

    monkeypatch.setattr(F, "policy_loss", nan_policy_loss)
    with pytest.raises(SystemExit) as e:
        F.main(tyro.cli(F.Args, args=[*PENDULUM, "--total-timesteps", "40"]))
    assert str(e.value) == "error: non-finite policy_loss at step 40; last good checkpoint: none"
    assert not list(tmp_path.rglob("*.pt"))


def test_same_seed_same_numbers_and_a_resumed_run_continues_the_unbroken_one(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)

    def run(name, *flags):
        F.main(tyro.cli(F.Args, args=[*PENDULUM, "--exp-name", name, *flags]))
        return read_scalars(next(tmp_path.glob(f"runs/*__{name}__*")))

    unbroken = run("unbroken", "--total-timesteps", "120")
    assert run("again", "--total-timesteps", "120") == unbroken
    first = run("first", "--total-timesteps", "40")
    ckpt = next(tmp_path.glob("runs/*__first__*/ckpt.pt"))
    resumed = run("resumed", "--total-timesteps", "120", "--checkpoint", str(ckpt))
    assert f"resumed {ckpt} at step 40" in capsys.readouterr().out
    assert {k: [p for p in v if p[0] <= 40] for k, v in unbroken.items()} == first
    after = {k: [p for p in v if p[0] > 40] for k, v in unbroken.items()}
    assert len(after["losses/policy_loss"]) == 2 and len(after["eval/return"]) == 2
    assert {k: v for k, v in after.items() if v} == resumed


def test_batched_env_path_on_cpu_train_resume_evaluate(pickcube_demos, monkeypatch, tmp_path, capsys):
    """The GPU code path (ManiSkill's batched env in ManiSkillVectorEnv) on physx_cpu with one env: SFT, a few
    hundred env steps, checkpoint, resume, --evaluate, which repeats the run's own last evaluation."""
    monkeypatch.chdir(tmp_path)
    common = ["--env-id", "PickCube-v1", "--sim-backend", "physx_cpu", "--vector-env", "maniskill",
              "--num-envs", "1", "--num-eval-envs", "1", "--max-episode-steps", "20", "--hidden-dim", "32",
              "--num-steps", "4", "--num-minibatches", "2", "--eval-episodes", "1",
              "--eval-freq", "100", "--reward-mode", "normalized_dense", "--relative-reward"]  # fmt: skip
    first = ["--demo-path", str(pickcube_demos), "--sft-steps", "5", "--seed", "3"]
    F.main(tyro.cli(F.Args, args=[*common, *first, "--total-timesteps", "200", "--exp-name", "batched"]))
    out = capsys.readouterr().out
    assert "| env PickCube-v1 (physx_cpu, maniskill) | device" in out and "transitions" in out, out
    assert re.search(r"step 200/200 \| \d+ steps/s \| ETA \d+m \| train episodes .* success_once=", out), out
    ckpt = next(tmp_path.glob("runs/PickCube-v1__batched__3__*/ckpt.pt"))
    assert f"checkpoint {ckpt.relative_to(tmp_path)}" in out and (ckpt.parent / "sft.pt").exists()
    F.main(tyro.cli(F.Args, args=[*common, "--checkpoint", str(ckpt), "--total-timesteps", "300",
                                  "--exp-name", "resumed"]))  # fmt: skip
    out = capsys.readouterr().out
    assert f"resumed {ckpt} at step 200" in out and "step 300/300" in out, out
    run_dir = next(tmp_path.glob("runs/PickCube-v1__resumed__3__*"))
    res = F.main(tyro.cli(F.Args, args=[*common, "--checkpoint", str(run_dir / "ckpt.pt"), "--evaluate"]))
    saved = json.loads((run_dir / "ckpt.eval.json").read_text())
    assert saved["seed"] == 3 and saved["global_step"] == 300
    last_eval = {k[5:]: v[-1][1] for k, v in read_scalars(run_dir).items() if k.startswith("eval/")}
    assert res == {k: saved[k] for k in res} == last_eval and 0 < res["return"] < 20  # a dense return


def test_relative_reward_is_the_difference_of_consecutive_rewards():
    """InvertedPendulum pays 1 per step: relative rewards are 1 at an episode's first step, then 0, and a
    reset of one env (reset_mask; env_idx in a batched env) restarts only that env's r_{t-1}."""
    envs = F.make_envs(F.Args(env_id="InvertedPendulum-v5"), False, 2, relative=True)
    try:
        envs.reset(seed=0)
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

    env = F.RelativeReward(Batched())
    env.reset()
    assert [env.step(None)[1].tolist() for _ in range(3)] == [[1, 1], [3, 3], [5, 5]]
    env.reset(options={"env_idx": torch.tensor([0])})
    assert env.step(None)[1].tolist() == [1, 7]  # env 0: 1 - 0; env 1: 16 - 9


def _ckpt(stdout):
    found = re.findall(r"checkpoint (\S+ckpt\.pt)", stdout)
    assert found, stdout[-2000:]
    return found[-1]


def test_smoke_pickcube_cpu_path(pickcube_demos):
    """The per-process CPU path (gymnasium's AsyncVectorEnv over spawned ManiSkill envs), from the CLI."""
    train = run_script(
        "flow_sde_ppo.py", "--env-id", "PickCube-v1", "--demo-path", str(pickcube_demos), "--sft-steps", "20",
        "--total-timesteps", "20", "--num-steps", "2", "--num-envs", "1", "--num-minibatches", "1",
        "--num-eval-envs", "1", "--max-episode-steps", "20", "--eval-episodes", "1", "--eval-freq", "0",
        "--exp-name", "test_flow_sde_ppo", "--sampler", "cps", "--logprob-type", "token",
        "--reward-mode", "normalized_dense", "--relative-reward",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "(physx_cpu, gymnasium)" in train.stdout and "step 20/20" in train.stdout, train.stdout
    assert re.search(r"eval step 20: return=\S+ length=\S+ success_once=\S+ success_at_end=\S+", train.stdout)
    assert _ckpt(train.stdout)


def test_smoke_mujoco_transformer_train_then_evaluate(tiny_hf, monkeypatch, capsys):
    common = ["--env-id", "InvertedPendulum-v5", "--backbone", "transformer", "--num-eval-envs", "1"]
    train = run_script(
        "flow_sde_ppo.py", *common, "--backbone-path", str(tiny_hf), "--num-envs", "1",
        "--total-timesteps", "40", "--num-steps", "4", "--num-minibatches", "2", "--sde-steps", "all",
        "--eval-episodes", "1", "--eval-freq", "0", "--exp-name", "test_flow_sde_ppo",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert re.search(r"eval step 40: return=\S+ length=\S+", train.stdout), train.stdout
    ckpt = _ckpt(train.stdout)
    with pytest.raises(SystemExit, match="error: checkpoint .* was made for InvertedPendulum-v5"):
        F.load_checkpoint(ckpt, F.Args())
    monkeypatch.chdir(Path(F.__file__).parent)  # ckpt is relative to the repo root, where run_script ran
    F.main(tyro.cli(F.Args, args=[*common, "--checkpoint", ckpt, "--evaluate", "--eval-episodes", "1"]))
    assert re.search(r"eval step 40: return=\S+ length=\S+", capsys.readouterr().out)
    assert Path(ckpt[: -len(".pt")] + ".eval.json").exists()

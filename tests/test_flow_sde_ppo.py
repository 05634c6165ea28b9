"""flow_sde_ppo.py: Flow-SDE math vs closed forms and torch.distributions, PPO invariants, CLI smoke runs."""

import math
import re

import numpy as np
import pytest
import torch
from conftest import run_script

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
        ks = F.stochastic_steps(K, sde_steps, args.ignore_last, sampler, rng)
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
    stats = F.ppo_update(agent, opt, b, args, args.noise_level)
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
        pg, vl, _, _ = F.ppo_loss(lp, old_logp, adv, v, old_value, ret, 0.2, 0.2, 1.0)
        return pg + vl

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

    obs, chunks, low, high = F.load_demos(str(pickcube_demos), 2, 42, 4, 8, "pd_ee_delta_pos")
    assert obs.shape[0] == chunks.shape[0] and chunks.shape[1:] == (8, 4)
    torch.testing.assert_close(chunks.amin((0, 1)), -torch.ones(4))
    torch.testing.assert_close(chunks.amax((0, 1)), torch.ones(4))
    agent, args = F.Agent(42, 4, 8, 32), F.Args()
    agent.act_low.copy_(low), agent.act_high.copy_(high)
    F.save_checkpoint(str(tmp_path / "c.pt"), agent, torch.optim.Adam(agent.parameters()), args, 0, 0)
    loaded = F.Agent(42, 4, 8, 32)
    loaded.load_state_dict(F.load_checkpoint(str(tmp_path / "c.pt"), 42, 4, args)["agent"])
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
    F.save_checkpoint(str(tmp_path / "c.pt"), agent, torch.optim.Adam(agent.parameters()), args, 0, 0)
    ckpt = F.load_checkpoint(str(tmp_path / "c.pt"), 11, 3, args)
    loaded = F.Agent(11, 3, 8, 32, "transformer", config=ckpt["backbone_config"])
    loaded.load_state_dict(ckpt["agent"])
    t = torch.full((6,), 0.5)
    torch.testing.assert_close(loaded.v(chain[:, 2], t, o), agent.v(chain[:, 2], t, o), rtol=0, atol=0)


def _ckpt(stdout):
    found = re.findall(r"saved (\S+final_ckpt\.pt)", stdout)
    assert found, stdout[-2000:]
    return found[-1]


def test_smoke_pickcube_train_then_evaluate(pickcube_demos):
    common = ["--num-eval-envs", "1", "--max-episode-steps", "20"]
    train = run_script(
        "flow_sde_ppo.py",
        "--env-id",
        "PickCube-v1",
        "--demo-path",
        str(pickcube_demos),
        "--sft-steps",
        "20",
        "--total-timesteps",
        "20",
        "--num-steps",
        "2",
        "--num-envs",
        "1",
        "--eval-episodes",
        "0",
        "--exp-name",
        "test_flow_sde_ppo",
        "--sampler",
        "cps",
        "--logprob-type",
        "token",
        *common,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "iter=2 step=20" in train.stdout
    ev = run_script(
        "flow_sde_ppo.py",
        "--checkpoint",
        _ckpt(train.stdout),
        "--evaluate",
        "--eval-episodes",
        "1",
        *common,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert re.search(r"success_once=\d\.\d+ success_at_end=\d\.\d+", ev.stdout), ev.stdout


def test_smoke_mujoco_transformer_train_then_evaluate(tiny_hf):
    common = ["--env-id", "InvertedPendulum-v5", "--backbone", "transformer", "--num-eval-envs", "1"]
    train = run_script(
        "flow_sde_ppo.py",
        *common,
        "--backbone-path",
        str(tiny_hf),
        "--num-envs",
        "1",
        "--total-timesteps",
        "40",
        "--num-steps",
        "4",
        "--sde-steps",
        "all",
        "--eval-episodes",
        "1",
        "--eval-every",
        "0",
        "--exp-name",
        "test_flow_sde_ppo",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert re.search(r"eval step=40 return=\S+ length=\S+", train.stdout), train.stdout
    ckpt = _ckpt(train.stdout)
    with pytest.raises(SystemExit, match="error: checkpoint .* was made for InvertedPendulum-v5"):
        F.load_checkpoint(ckpt, 42, 4, F.Args())
    ev = run_script("flow_sde_ppo.py", *common, "--checkpoint", ckpt, "--evaluate", "--eval-episodes", "1")
    assert ev.returncode == 0 and re.search(r"eval \S+: return=\S+ length=\S+", ev.stdout), ev.stderr[-3000:]


def test_bad_inputs_exit_with_one_line(tmp_path, pickcube_demos):
    res = run_script(
        "flow_sde_ppo.py", "--checkpoint", str(tmp_path / "missing.pt"), "--evaluate", timeout=120
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines == [
        f"error: checkpoint {tmp_path / 'missing.pt'} not found: pass a file written by this script"
    ]
    with pytest.raises(SystemExit, match="^error: unknown env id 'NoSuchEnv-v0'"):
        F.env_kind("NoSuchEnv-v0")
    with pytest.raises(
        SystemExit, match="^error: demo traj_0 has obs .* but the env has obs dim 4 and action dim 1"
    ):
        F.load_demos(str(pickcube_demos), None, 4, 1, 8, "pd_ee_delta_pos")
    with pytest.raises(SystemExit, match="^error: demos use control_mode 'pd_ee_delta_pos'"):
        F.load_demos(str(pickcube_demos), None, 42, 4, 8, "pd_joint_delta_pos")
    with pytest.raises(SystemExit, match="^error: --backbone-path .* has no config.json"):
        F.main(F.Args(backbone="transformer", backbone_path=str(tmp_path)))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="is not a flow_sde_ppo checkpoint"):
        F.load_checkpoint(str(tmp_path / "junk.pt"), 42, 4, F.Args())

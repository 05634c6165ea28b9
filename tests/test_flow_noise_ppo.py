"""flow_noise_ppo.py: chain likelihood, PPO loss and noise bounds checked directly; the CLI end to end."""

import json
import math
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import ROOT, assert_one_line_error, read_scalars, run_script, snapshot

import flow_noise_ppo as fnp

B, K, H, A, C, A_REAL = 3, 4, 6, 3, 4, 2
Normal = torch.distributions.Normal
Independent = torch.distributions.Independent


def random_chain(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    chain = torch.randn(B, K + 1, H, A, generator=g, dtype=dtype)
    mu = chain[:, :-1] + 0.1 * torch.randn(B, K, H, A, generator=g, dtype=dtype)
    sigma = 0.08 + 0.08 * torch.rand(B, K, H, A, generator=g, dtype=dtype)
    return chain, mu, sigma


@pytest.mark.parametrize("logprob_type", ["token", "chunk"])
def test_chain_log_prob_matches_torch_distributions(logprob_type):
    chain, mu, sigma = random_chain()
    mask = fnp.executed_mask(H, A, C, A_REAL)
    got = fnp.chain_log_prob(chain, mu, sigma, mask, logprob_type)
    if logprob_type == "token":
        terms = Normal(0.0, 1.0).log_prob(chain[:, 0]) + Normal(mu, sigma).log_prob(chain[:, 1:]).sum(1)
        expected = torch.where(mask, terms / (K + 1), torch.zeros_like(terms))
    else:  # one joint density over the executed elements of all K+1 chain states
        m = mask.flatten()
        x = chain.flatten(2)[..., m]
        expected = Independent(Normal(torch.zeros_like(x[:, 0]), 1.0), 1).log_prob(x[:, 0])
        for k in range(K):
            step = Independent(Normal(mu.flatten(2)[:, k, m], sigma.flatten(2)[:, k, m]), 1)
            expected = expected + step.log_prob(x[:, k + 1])
        expected = expected / (K + 1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("logprob_type", ["token", "chunk"])
def test_executed_mask_excludes_the_rest(logprob_type):
    mask = fnp.executed_mask(H, A, C, A_REAL)
    assert mask[:C, :A_REAL].all() and mask.sum() == C * A_REAL
    chain, mu, sigma = random_chain()
    before = fnp.chain_log_prob(chain, mu, sigma, mask, logprob_type)
    chain2, mu2, sigma2 = chain.clone(), mu.clone(), sigma.clone()
    for t in (chain2, mu2):  # change everything that is not executed or not a real action dim
        t[:, :, C:] += 5.0
        t[..., A_REAL:] -= 3.0
    sigma2[:, :, C:] = 0.16
    after = fnp.chain_log_prob(chain2, mu2, sigma2, mask, logprob_type)
    torch.testing.assert_close(before, after)
    chain2[:, 1, 0, 0] += 1.0  # an executed element does count
    assert not torch.allclose(before, fnp.chain_log_prob(chain2, mu2, sigma2, mask, logprob_type))


def test_sigma_in_bounds():
    u = torch.cat([torch.linspace(-1e4, 1e4, 1001), torch.randn(1000) * 30, torch.tensor([0.0])])
    sigma = fnp.bounded_sigma(u, 0.08, 0.16)
    assert sigma.min() >= 0.08 - 1e-7 and sigma.max() <= 0.16 + 1e-7
    assert torch.isclose(sigma[0], torch.tensor(0.08)) and torch.isclose(sigma[1000], torch.tensor(0.16))
    assert torch.isclose(sigma[-1], torch.tensor((0.08 * 0.16) ** 0.5))  # tanh(0) = 0: geometric mean
    policy = fnp.FlowNoisePolicy(5, A, H, K, 0.08, 0.16)
    for p in policy.expert.noise_head.parameters():  # large weights push the head into saturation
        p.data.mul_(50)
    _, _, s = policy.sample(torch.randn(64, 5) * 10)
    assert s.shape == (64, K, H, A) and s.min() >= 0.08 - 1e-6 and s.max() <= 0.16 + 1e-6


@pytest.mark.parametrize("logprob_type", ["token", "chunk"])
def test_ratio_is_one_at_first_minibatch(logprob_type):
    torch.manual_seed(0)
    policy = fnp.FlowNoisePolicy(7, A, H, K, 0.08, 0.16)
    obs = torch.randn(16, 7)
    mask = fnp.executed_mask(H, A, C)
    chain, mu, sigma = policy.sample(obs)  # the rollout
    old = fnp.chain_log_prob(chain, mu, sigma, mask, logprob_type)
    mu2, sigma2 = policy.chain_gaussians(obs, chain)  # the update, batched over the K steps
    new = fnp.chain_log_prob(chain, mu2, sigma2, mask, logprob_type)
    torch.testing.assert_close((new - old).exp(), torch.ones_like(new), rtol=0, atol=1e-5)
    pg_loss, approx_kl, clipfrac = fnp.policy_loss(new, old, torch.randn(16), mask, 0.2)
    assert abs(approx_kl) < 1e-6 and clipfrac == 0
    (pg_loss - 0.005 * fnp.chain_entropy(sigma2, mask).mean()).backward()  # the noise head is trained
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.expert.noise_head.parameters())


def test_sampler_draws_the_chains_the_scorer_scores():
    """policy.sample (the rollout's sampler) and chain_gaussians + chain_log_prob (the PPO scorer) describe
    one distribution: every standardised residual (x_{k+1} - μ_k)/σ_k, and x_0, is N(0, 1), and the score
    function E[∇_θ log π(chain)] is 0 within its Monte Carlo error."""
    torch.manual_seed(0)
    policy = fnp.FlowNoisePolicy(5, A, H, K, 0.08, 0.16)
    with torch.no_grad():  # a random network whose σ spans [σ_min, σ_max] and whose velocity is not small
        policy.expert.noise_head[-1].weight.mul_(20)
        policy.expert.v_out.weight.mul_(5)
    n = 4000
    obs = torch.randn(n, 5) * 2
    chain, _, _ = policy.sample(obs)
    with torch.no_grad():
        mu, sigma = policy.chain_gaussians(obs, chain)
    assert sigma.min() < 0.09 and sigma.max() > 0.15
    z = torch.cat([chain[:, :1], (chain[:, 1:] - mu) / sigma], 1).double()  # (n, K+1, H, A)
    se = 1 / math.sqrt(n)
    assert z.mean(0).abs().max() < 4.5 * se  # per (k, h, a): no shifted step
    assert (z.var(0) - 1).abs().max() < 4.5 * math.sqrt(2) * se  # per (k, h, a): no mis-scaled step
    x = z.flatten().sort().values  # Kolmogorov-Smirnov against N(0, 1), all n (K+1) H A residuals
    cdf = torch.special.ndtr(x)
    m = len(x)
    ks = torch.maximum(torch.arange(1, m + 1) / m - cdf, cdf - torch.arange(m) / m).max()
    assert ks < 1.63 / math.sqrt(m), ks  # 1% level

    mask = fnp.executed_mask(H, A, C, A_REAL)
    params = [policy.expert.v_out.bias, policy.expert.noise_head[-1].bias]
    groups = []
    for idx in torch.arange(n).chunk(20):  # 20 groups of 200 chains: the mean score and its standard error
        mu, sigma = policy.chain_gaussians(obs[idx], chain[idx])
        logp = fnp.chain_log_prob(chain[idx], mu, sigma, mask, "chunk").mean()
        groups.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)]))
    g = torch.stack(groups).double()
    t = g.mean(0) / (g.std(0) / math.sqrt(len(g)) + 1e-12)
    assert t.abs().max() < 4.5, t.abs().max()


def test_policy_and_value_losses_by_hand():
    """L_π = -E_m[min(r Â, clip(r) Â)]: a direct evaluation of each case of the min, and L_V's Huber max."""
    old = torch.zeros(4, dtype=torch.float64)
    new = torch.log(torch.tensor([1.1, 1.5, 0.5, 0.5], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([2.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    loss, _, clipfrac = fnp.policy_loss(new, old, adv, None, 0.2)
    # r Â unclipped inside the band; r > 1+ε with Â > 0: clipped; r < 1-ε with Â > 0: r Â; with Â < 0: clipped
    expected = -(2.0 * 1.1 + 1.0 * 1.2 + 1.0 * 0.5 + -1.0 * 0.8) / 4
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    assert clipfrac == 0.75
    loss.backward()  # raising the log-prob of a positive-advantage action inside the band lowers the loss
    assert new.grad[0] < 0 and new.grad[1] == 0 and new.grad[3] == 0
    token_new = torch.full((1, H, A), math.log(1.1), dtype=torch.float64)
    token_new[0, C:] = 5.0  # outside the executed chunk: no effect
    mask = fnp.executed_mask(H, A, C)
    token_loss = fnp.policy_loss(token_new, torch.zeros(1, H, A, dtype=torch.float64), adv[:1], mask, 0.2)[0]
    torch.testing.assert_close(token_loss, torch.tensor(-2.0 * 1.1, dtype=torch.float64))
    v = fnp.value_loss(torch.tensor([1.0, 30.0]), torch.tensor([0.5, 30.0]), torch.tensor([0.0, 0.0]))
    # V 1 vs clipped 0.7 -> max(½ 1², ½ 0.7²); V 30: Huber's linear part 10 (30 - 5)
    torch.testing.assert_close(v, torch.tensor((0.5 + 250.0) / 2))


@pytest.mark.parametrize("logprob_type", ["token", "chunk"])
def test_ppo_loss_gradcheck(logprob_type):
    g = torch.Generator().manual_seed(1)
    shape = (B, H, A) if logprob_type == "token" else (B,)
    old = torch.randn(shape, generator=g, dtype=torch.float64)
    new = (old + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    old_v = torch.randn(B, generator=g, dtype=torch.float64)
    new_v = (old_v + 0.3 * torch.randn(B, generator=g, dtype=torch.float64)).requires_grad_()
    returns = torch.randn(B, generator=g, dtype=torch.float64) * 5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = fnp.executed_mask(H, A, C, A_REAL)

    def f(new, new_v):
        return fnp.policy_loss(new, old, adv, mask, 0.2)[0] + fnp.value_loss(new_v, old_v, returns, 0.2, 1.0)

    assert torch.autograd.gradcheck(f, (new, new_v))


class SeedEchoEnvs:
    """One task, n envs: env i's episodes last 1 + 2i steps, and the first step's reward is the seed of the
    reset that began the episode (-1: unseeded), so an episode's return says where it began."""

    def __init__(self, n):
        self.tasks, self.task_of_env = ["echo"], [0] * n
        self.t, self.seed = torch.zeros(n, dtype=torch.long), torch.full((n,), -1.0)

    def reset(self, seed=None):
        self.t[:] = 0
        self.seed[:] = -1.0 if seed is None else torch.as_tensor(seed, dtype=torch.float32)
        return torch.zeros(len(self.t), 1)

    def step(self, a):
        r = torch.where(self.t == 0, self.seed, 0.0)
        self.t += 1
        term = self.t >= 1 + 2 * torch.arange(len(self.t))
        return torch.zeros(len(self.t), 1), r, term, torch.zeros_like(term), torch.zeros_like(term)


class ZeroPolicy:
    obs_mean = torch.zeros(1)

    def sample(self, obs, stochastic=True, generator=None):
        return (torch.zeros(len(obs), K + 1, H, A),)

    def to_env(self, x):
        return x


@pytest.mark.parametrize("n", [1, 2, 3])
def test_evaluation_episode_i_starts_from_the_reset_seeded_seed_plus_i(n):
    """Whatever the number of eval envs and episode lengths, episode i is the reset with seed + i: every
    script's --evaluate with one --seed plays the same initial states."""
    stats = fnp.evaluate(ZeroPolicy(), SeedEchoEnvs(n), 5, C, 10_005)
    assert stats["return"] == np.mean([10_005 + i for i in range(5)])


def test_evaluation_noise_has_its_own_generator():
    """x_0 of the evaluation chains comes from a generator seeded with the evaluation seed: evaluating leaves
    the global torch RNG (training's) where it was, so a checkpoint's --evaluate repeats its run's number."""
    policy = fnp.FlowNoisePolicy(1, A, H, K, 0.08, 0.16)
    rng = torch.get_rng_state()
    fnp.evaluate(policy, SeedEchoEnvs(2), 3, C, 10_005)
    assert torch.equal(torch.get_rng_state(), rng)


def test_gae_matches_a_direct_sum():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = fnp.gae(r, v, d, torch.tensor([0.3]), gamma=0.9, gae_lambda=0.8)
    d2 = 2.0 + 0.9 * 0.3 - 0.1
    d1 = 0.0 - 0.2  # the episode ended in chunk 1: no bootstrap
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    torch.testing.assert_close(adv[:, 0], torch.tensor([d0 + 0.72 * d1, d1, d2]))
    torch.testing.assert_close(ret, adv + v)


def run_dir_of(stdout: str):
    match = re.search(r"^run (\S+) \|", stdout, re.M)
    assert match, stdout[-2000:]
    return match.group(1)


TINY = ["--num-steps", "4", "--num-minibatches", "2", "--update-epochs", "1", "--critic-warmup-iters", "0"]


def cli(*flags):
    """An in-process run from command-line flags (tyro parses them as for `python flow_noise_ppo.py`)."""
    return fnp.main(tyro.cli(fnp.Args, args=list(flags)))


def test_pickcube_cpu_path_smoke(pickcube_demos, tmp_path, monkeypatch, capsys):
    """The default CPU path: ManiSkill in spawned AsyncVectorEnv workers; SFT, PPO, eval, sft.pt, ckpt.pt."""
    monkeypatch.chdir(tmp_path)
    cli("--env-id", "PickCube-v1", "--demo-path", str(pickcube_demos), "--num-demos", "5",
        "--sft-steps", "10", "--total-timesteps", "20", "--eval-episodes", "1", "--max-episode-steps", "10",
        "--num-envs", "1", "--num-eval-envs", "1", "--exp-name", "test_flow_noise_ppo", *TINY)  # fmt: skip
    out = capsys.readouterr().out
    run = run_dir_of(out)
    banner = r"\| env PickCube-v1 \(physx_cpu, gymnasium\) \| device cpu \| demos \d+ transitions"
    assert re.search(banner, out), out[:500]
    progress = r"^step 20/20 \| \d+ steps/s \| ETA \d+m \| train episodes \(end at success\): return"
    assert re.search(progress, out, re.M), out
    assert "eval step 0: return=" in out and "eval step 20: return=" in out
    assert f"checkpoint {run}/sft.pt" in out
    assert (tmp_path / run / "sft.pt").exists() and (tmp_path / run / "ckpt.pt").exists()


def test_batched_path_on_cpu_trains_resumes_evaluates(pickcube_demos, tmp_path, monkeypatch, capsys):
    """The GPU code path (ManiSkill's batched env in ManiSkillVectorEnv), run on physx_cpu with one env."""
    monkeypatch.chdir(tmp_path)
    batched = dict(env_id="PickCube-v1", sim_backend="physx_cpu", vector_env="maniskill", num_envs=1,
                   num_eval_envs=1, max_episode_steps=20, eval_episodes=1, num_steps=4, num_minibatches=2,
                   update_epochs=1, critic_warmup_iters=0, eval_freq=100)  # fmt: skip
    fnp.main(fnp.Args(**batched, demo_path=str(pickcube_demos), num_demos=5, sft_steps=10,
                      total_timesteps=200, exp_name="batched"))  # fmt: skip
    out = capsys.readouterr().out
    assert "(physx_cpu, maniskill)" in out and "step 200/200" in out and "eval step 100:" in out, out
    ckpt = tmp_path / run_dir_of(out) / "ckpt.pt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 200
    fnp.main(fnp.Args(**batched, checkpoint=str(ckpt), total_timesteps=300, exp_name="resumed"))
    out = capsys.readouterr().out
    assert f"resumed {ckpt} at step 200" in out and "step 300/300" in out and "eval step 300:" in out, out
    resumed = tmp_path / run_dir_of(out) / "ckpt.pt"
    stats = fnp.main(fnp.Args(**batched | {"checkpoint": str(resumed), "evaluate": True, "eval_episodes": 2}))
    saved = json.loads(resumed.with_suffix(".eval.json").read_text())
    assert saved["step"] == 300 and saved["seed"] == 1 and saved["success_once"] == stats["success_once"]
    assert 0 <= saved["success_once"] <= 1 and saved["episodes"] == 2


def train_pendulum(**kwargs):
    """An in-process run on Pendulum-v1 (fast to start); returns its TensorBoard scalars and run dir."""
    flags = dict(env_id="Pendulum-v1", num_envs=1, num_eval_envs=1, num_steps=8, num_minibatches=2,
                 update_epochs=2, critic_warmup_iters=1, max_episode_steps=18, eval_episodes=1, eval_freq=80,
                 total_timesteps=160)  # fmt: skip
    args = fnp.Args(**(flags | kwargs))
    fnp.main(args)
    run = next(p for p in Path("runs").iterdir() if f"__{args.exp_name}__" in p.name)
    return read_scalars(run), run


def test_same_seed_same_numbers_and_resume_equals_the_unbroken_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unbroken, _ = train_pendulum(exp_name="a")
    assert unbroken == train_pendulum(exp_name="b")[0]  # the same command twice
    first_half, run = train_pendulum(exp_name="c", total_timesteps=80)  # killed after its checkpoint...
    resumed, _ = train_pendulum(exp_name="d", checkpoint=str(run / "ckpt.pt"))  # ...and resumed
    assert "losses/value_loss" in unbroken and "eval/return" in resumed
    for tag, series in unbroken.items():
        assert first_half[tag] == [(s, v) for s, v in series if s <= 80], tag
        assert resumed[tag] == [(s, v) for s, v in series if s > 80], tag


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fnp, "value_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        train_pendulum(exp_name="nan")
    assert re.fullmatch(r"error: non-finite value loss at step 40; last good checkpoint: runs/\S+/ckpt.pt",
                        str(e.value)), str(e.value)  # fmt: skip
    ckpt = str(e.value).split()[-1]
    assert torch.load(ckpt, weights_only=False)["global_step"] == 0  # the broken state was not saved


def test_resume_restores_weights_with_this_runs_learning_rates(tmp_path):
    """RL from an SFT checkpoint (or a resume) runs at the flags' lrs, not the ones saved in the optimizer."""

    def build(lr, critic_lr):
        policy, critic = fnp.FlowNoisePolicy(5, A, H, K, 0.08, 0.16), fnp.make_critic(5)
        groups = [{"params": policy.parameters(), "lr": lr}, {"params": critic.parameters(), "lr": critic_lr}]
        return policy, critic, torch.optim.Adam(groups)

    policy, critic, opt = build(3e-5, 3e-4)
    critic(torch.randn(2, 5)).sum().backward()
    opt.step()  # an optimizer with state, as after RL updates
    fnp.save_checkpoint(tmp_path / "c.pt", policy, critic, opt, fnp.Args(learning_rate=3e-5), 10, 1)
    ckpt = torch.load(tmp_path / "c.pt", weights_only=False)
    policy2, critic2, opt2 = build(1.0, 1.0)
    rl_args = fnp.Args(learning_rate=1e-4, critic_learning_rate=1e-3)
    fnp.restore_checkpoint(ckpt, policy2, critic2, opt2, rl_args)
    assert [g["lr"] for g in opt2.param_groups] == [1e-4, 1e-3]
    assert len(opt2.state) == len(opt.state) > 0
    for a, b in zip(critic.parameters(), critic2.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(SystemExit, match="^error: checkpoint does not fit this model"):
        fnp.restore_checkpoint(ckpt, fnp.FlowNoisePolicy(7, A, H, K, 0.08, 0.16), critic2, opt2, fnp.Args())


def test_relative_reward_is_the_difference_of_consecutive_rewards():
    """InvertedPendulum pays 1 per step: relative rewards are 1 at an episode's first step, then 0."""
    envs = fnp.VecEnv(fnp.Args(env_id="InvertedPendulum-v5", relative_reward=True), 2, torch.device("cpu"))
    try:
        envs.reset(seed=0)
        zero = torch.zeros(2, 1)
        assert envs.step(zero)[1].tolist() == [1.0, 1.0]
        obs = envs.step(zero)[0]
        assert envs.step(zero)[1].tolist() == [0.0, 0.0]
        envs.reset_done(torch.tensor([True, False]), obs)  # a new episode of env 0 starts from r_{-1} = 0
        assert envs.step(zero)[1].tolist() == [1.0, 0.0]
    finally:
        envs.close()


def test_transformer_backbone_offline_and_mujoco_smoke(tmp_path, monkeypatch, capsys):
    from transformers import AutoModel, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    lm = AutoModel.from_config(cfg)
    lm.save_pretrained(tmp_path / "tiny_llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    policy = fnp.FlowNoisePolicy(4, A, H, K, 0.08, 0.16, "transformer", str(tmp_path / "tiny_llama"))
    for name, p in lm.state_dict().items():  # the same weights came back, through the script's own loader
        torch.testing.assert_close(policy.expert.lm.state_dict()[name], p)
    obs = torch.randn(5, 4)
    chain, mu, sigma = policy.sample(obs)
    mu2, sigma2 = policy.chain_gaussians(obs, chain)  # the same Gaussians, batched over the K steps
    torch.testing.assert_close(mu2, mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sigma2, sigma, atol=1e-6, rtol=1e-5)

    monkeypatch.chdir(tmp_path)
    cli("--env-id", "InvertedPendulum-v5", "--backbone", "transformer", "--backbone-path",
        str(tmp_path / "tiny_llama"), "--total-timesteps", "40", "--eval-episodes", "2",
        "--max-episode-steps", "20", *TINY)  # fmt: skip
    out = capsys.readouterr().out
    assert "step 40/40" in out and "eval step 40: return=" in out, out[-2000:]


def test_task_token_layout(tmp_path):
    o = np.arange(2 * 35, dtype=np.float32).reshape(2, 35) + 1
    tok = fnp.task_token_obs(o, 1, 2, 42)  # PushCube's 35 dims padded to PickCube's 42, then onehot(task 1)
    assert tok.shape == (2, 44) and tok.dtype == np.float32
    np.testing.assert_array_equal(tok[:, :35], o)
    assert (tok[:, 35:42] == 0).all() and (tok[:, 42:] == [0, 1]).all()
    np.testing.assert_array_equal(fnp.task_token_obs(o[0], 1, 2, 42), tok[0])  # one obs as the env returns it
    with h5py.File(tmp_path / "push.h5", "w") as f:  # demos get the same layout as the env's observations
        f["traj_0/obs"], f["traj_0/actions"] = o[[0, 1, 1]], np.arange(8, dtype=np.float32).reshape(2, 4)
    trajs = fnp.read_demos(tmp_path / "push.h5", "PushCube-v1", fnp.Args())
    obs, chunks = fnp.demo_chunks("push.h5", trajs, 8, 35, 4, token=(1, 2, 42))
    np.testing.assert_array_equal(obs.numpy(), tok)
    assert chunks.shape == (2, 8, 4)  # a chunk past the episode's end repeats its last action
    a0, a1 = [0, 1, 2, 3], [4, 5, 6, 7]
    np.testing.assert_array_equal(chunks.numpy(), [[a0] + [a1] * 7, [a1] * 8])


def test_multitask_smoke(tmp_path):
    # MuJoCo tasks (forked workers: cheap) with stand-in demos take the ManiSkill multi-task path: round-robin
    # sub-envs, obs zero-padded to the largest task's dim + task token, SFT on the union, per-task eval
    g, paths = np.random.default_rng(0), []
    for task, obs_dim in (("Reacher-v5", 10), ("Swimmer-v5", 8)):
        paths.append(str(tmp_path / f"{task}.h5"))
        with h5py.File(paths[-1], "w") as f:
            for i in range(3):
                f[f"traj_{i}/obs"] = g.normal(size=(21, obs_dim)).astype(np.float32)
                f[f"traj_{i}/actions"] = g.uniform(-1, 1, size=(20, 2)).astype(np.float32)
    result = run_script(
        "flow_noise_ppo.py", "--env-id", "Reacher-v5,Swimmer-v5", "--demo-path", ",".join(paths),
        "--sft-steps", "10", "--total-timesteps", "40", "--eval-episodes", "2", "--max-episode-steps", "10",
        "--exp-name", "test_flow_noise_ppo_mt", *TINY,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = ROOT / run_dir_of(result.stdout)
    try:
        assert "step 40/40" in result.stdout, result.stdout[-2000:]
        for task in ("Reacher-v5", "Swimmer-v5"):  # evaluated per task, then averaged
            assert re.search(rf"eval step 40: .*{task}/return=-?\d+\.\d{{3}}", result.stdout), result.stdout
        # policy and critic see 10 (padded) obs dims + a 2-dim task token
        state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
        assert state["policy"]["obs_mean"].shape == (12,) and state["critic"]["0.weight"].shape[1] == 12
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_a_run_directory_in_use_is_refused_before_any_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fnp.time, "time", lambda: 1000.0)
    monkeypatch.setattr(fnp, "VecEnv", None)  # the video recorder would make run_dir/videos
    (tmp_path / "runs" / "Pendulum-v1__twin__1__1000").mkdir(parents=True)
    with pytest.raises(SystemExit, match="^error: runs/Pendulum-v1__twin__1__1000 exists: ") as e:
        fnp.main(fnp.Args(env_id="Pendulum-v1", exp_name="twin", capture_video=True))
    assert "\n" not in str(e.value)


def test_bad_inputs_exit_with_one_line(pickcube_demos, tmp_path, monkeypatch):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    torch.save({"script": "flow_sde_ppo", "agent": {}, "args": {}}, tmp_path / "other.pt")
    torch.save({"policy": {}, "args": {}}, tmp_path / "unsigned.pt")
    (tmp_path / "text.h5").write_text("not hdf5")
    (tmp_path / "cut.h5").write_bytes(pickcube_demos.read_bytes()[:5000])
    with h5py.File(tmp_path / "no_actions.h5", "w") as f:
        f["traj_0/obs"] = np.zeros((6, 42), np.float32)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["traj_0/obs"], f["traj_0/actions"] = np.zeros(6, np.float32), np.zeros((5, 4), np.float32)
    cases = [
        ({"env_id": "NoSuchEnv-v0"}, "unknown --env-id"),
        ({"demo_path": str(tmp_path / "none.h5")}, "not found"),
        ({"demo_path": str(tmp_path / "text.h5")}, "cannot read demo file"),
        ({"demo_path": str(tmp_path / "cut.h5")}, "cannot read demo file"),
        ({"demo_path": str(tmp_path / "no_actions.h5")}, "no obs and actions"),
        ({"demo_path": str(tmp_path / "flat.h5")}, "has obs (6,) / actions (5, 4)"),
        ({"env_id": "PushCube-v1", "demo_path": str(pickcube_demos)}, "demos are for PickCube-v1"),
        ({"checkpoint": str(tmp_path / "x.pt")}, "not found"),
        ({"checkpoint": str(tmp_path / "junk.pt")}, "cannot read"),
        ({"checkpoint": str(tmp_path / "other.pt")}, "not a flow_noise_ppo checkpoint"),
        ({"checkpoint": str(tmp_path / "unsigned.pt")}, "not a flow_noise_ppo checkpoint"),
        ({"denoising_steps": 0}, "--denoising-steps"),
        ({"denoising_steps": -1}, "--denoising-steps"),
        ({"num_envs": 0}, "--num-envs"),
        ({"num_envs": -1}, "--num-envs"),
        ({"gamma": 2.0}, "--gamma"),
        ({"sigma_min": 0.5, "sigma_max": 0.1}, "--sigma-min"),
        ({"total_timesteps": -100}, "--total-timesteps"),
        ({"num_steps": 9, "num_envs": 1, "num_minibatches": 2}, "equal minibatches of >= 2"),
        ({"num_steps": 1, "num_envs": 2, "num_minibatches": 2}, "equal minibatches of >= 2"),
        ({"num_action_chunks": 9}, "num-action-chunks"),
        ({"backbone_path": str(tmp_path)}, "config.json"),
        ({"evaluate": True}, "needs --checkpoint"),
        ({"env_id": "Pendulum-v1", "vector_env": "maniskill"}, "--vector-env maniskill"),
        ({"sim_backend": "physx_cpu", "vector_env": "maniskill"}, "--num-envs 1"),
        ({"env_id": "PickCube-v1,PushCube-v1", "num_envs": 1}, "--num-envs"),
        ({"env_id": "PickCube-v1,PushCube-v1", "demo_path": str(pickcube_demos)}, "2 comma-separated"),
        (
            {"env_id": "PushCube-v1,PickCube-v1", "demo_path": f"{pickcube_demos},{pickcube_demos}"},
            "demos are",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append(({"sim_backend": "physx_cuda"}, "needs a CUDA GPU"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fnp, "VecEnv", None)  # every check above must come before an env is built
    before = snapshot(tmp_path)
    for kwargs, needle in cases:
        with pytest.raises(SystemExit) as e:
            fnp.main(fnp.Args(**kwargs))
        assert str(e.value).startswith("error:") and "\n" not in str(e.value) and needle in str(e.value), (
            kwargs, str(e.value))  # fmt: skip
    assert snapshot(tmp_path) == before  # no run directory, no file written or changed
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="action spaces differ"):
        fnp.main(fnp.Args(env_id="InvertedPendulum-v5,InvertedDoublePendulum-v5"))
    with h5py.File(tmp_path / "bad.h5", "w") as f:  # state demos of another env: wrong shapes
        f["traj_0/obs"], f["traj_0/actions"] = np.zeros((6, 10), np.float32), np.zeros((5, 4), np.float32)
    with pytest.raises(SystemExit, match=r"^error: \S+bad.h5 has obs dim 10 / action dim 4, the env 42 / 4"):
        bad = tmp_path / "bad.h5"
        fnp.demo_chunks(bad, fnp.read_demos(bad, "PickCube-v1", fnp.Args()), 8, obs_dim=42, act_dim=4)
    # and through the CLI: one line on stderr, exit code 1, no traceback, nothing written
    assert_one_line_error(run_script("flow_noise_ppo.py", "--gamma", "2"), "--gamma")
    cut = run_script("flow_noise_ppo.py", "--env-id", "Pendulum-v1", "--demo-path", str(tmp_path / "cut.h5"))
    assert_one_line_error(cut, "cut.h5")

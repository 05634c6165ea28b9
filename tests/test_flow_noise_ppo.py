"""flow_noise_ppo.py: chain likelihood, PPO loss and noise bounds checked directly; the CLI end to end."""

import re
import shutil

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script

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


def one_line_error(result, needle):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr[-2000:]
    assert needle in errors[0], errors[0]


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
    adv, v = torch.randn(16), torch.randn(16)
    entropy = fnp.chain_entropy(sigma2, mask)
    loss, stats = fnp.ppo_loss(new, old, adv, v, v, v, entropy, mask, 0.2, 0.2, 0.005, 0.5, 10.0)
    assert abs(stats["approx_kl"]) < 1e-6 and stats["clipfrac"] == 0
    loss.backward()  # the noise head is trained by the PPO loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.expert.noise_head.parameters())


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
    entropy = torch.randn(B, generator=g, dtype=torch.float64).requires_grad_()
    mask = fnp.executed_mask(H, A, C, A_REAL)

    def f(new, new_v, entropy):
        return fnp.ppo_loss(new, old, adv, new_v, old_v, returns, entropy, mask, 0.2, 0.2, 0.005, 0.5, 1.0)[0]

    assert torch.autograd.gradcheck(f, (new, new_v, entropy))


def test_gae_matches_a_direct_sum():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    d = torch.tensor([[0.0], [1.0], [0.0]])
    adv, ret = fnp.gae(r, v, d, torch.tensor([0.3]), gamma=0.9, lam=0.8)
    d2 = 2.0 + 0.9 * 0.3 - 0.1
    d1 = 0.0 - 0.2  # the episode ended in chunk 1: no bootstrap
    d0 = 1.0 + 0.9 * 0.2 - 0.5
    torch.testing.assert_close(adv[:, 0], torch.tensor([d0 + 0.72 * d1, d1, d2]))
    torch.testing.assert_close(ret, adv + v)


def saved_path(result):
    match = re.search(r"model saved to (\S+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-3000:]
    return ROOT / match.group(1)


def test_pickcube_smoke_then_evaluate_checkpoint(pickcube_demos):
    tiny = ["--num-steps", "4", "--num-minibatches", "2", "--update-epochs", "1", "--critic-warmup", "0"]
    tiny += ["--num-envs", "1", "--num-eval-envs", "1"]  # one env runs in-process: no spawn start-up
    result = run_script(
        "flow_noise_ppo.py", "--env-id", "PickCube-v1", "--demo-path", str(pickcube_demos),
        "--num-demos", "5", "--sft-steps", "10", "--total-timesteps", "20", "--eval-episodes", "1",
        "--max-episode-steps", "10", "--save-model", "--exp-name", "test_flow_noise_ppo", *tiny,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step=0 (after SFT)" in result.stdout and "iter=1/1" in result.stdout, result.stdout[-2000:]
    ckpt = saved_path(result)
    try:
        ev = run_script(
            "flow_noise_ppo.py", "--checkpoint", str(ckpt), "--evaluate", "--eval-episodes", "2",
            "--max-episode-steps", "20", "--num-eval-envs", "1",
        )  # fmt: skip
        assert ev.returncode == 0, ev.stderr[-3000:]
        assert re.search(r"eval/success_once=\d\.\d{3}", ev.stdout), ev.stdout
        with pytest.raises(SystemExit, match="^error: checkpoint has --action-horizon 8"):
            fnp.main(fnp.Args(checkpoint=str(ckpt), action_horizon=6, evaluate=True))
    finally:
        shutil.rmtree(ckpt.parent, ignore_errors=True)


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


def test_transformer_backbone_offline_and_mujoco_smoke(tmp_path, monkeypatch):
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

    result = run_script(
        "flow_noise_ppo.py", "--env-id", "InvertedPendulum-v5", "--backbone", "transformer",
        "--backbone-path", str(tmp_path / "tiny_llama"), "--total-timesteps", "40", "--num-steps", "4",
        "--num-minibatches", "2", "--update-epochs", "1", "--critic-warmup", "0", "--eval-episodes", "2",
        "--max-episode-steps", "20", "--save-model", "--exp-name", "test_flow_noise_ppo_tf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter=1/1" in result.stdout and "eval/return=" in result.stdout, result.stdout[-2000:]
    shutil.rmtree(saved_path(result).parent, ignore_errors=True)


def test_task_token_layout(tmp_path):
    o = np.arange(2 * 35, dtype=np.float32).reshape(2, 35) + 1
    tok = fnp.task_token_obs(o, 1, 2, 42)  # PushCube's 35 dims padded to PickCube's 42, then onehot(task 1)
    assert tok.shape == (2, 44) and tok.dtype == np.float32
    np.testing.assert_array_equal(tok[:, :35], o)
    assert (tok[:, 35:42] == 0).all() and (tok[:, 42:] == [0, 1]).all()
    np.testing.assert_array_equal(fnp.task_token_obs(o[0], 1, 2, 42), tok[0])  # one obs as the env returns it
    with h5py.File(tmp_path / "push.h5", "w") as f:  # demos get the same layout as the env's observations
        f["traj_0/obs"], f["traj_0/actions"] = o[[0, 1, 1]], np.ones((2, 4), np.float32)
    obs, chunks = fnp.load_demos(tmp_path / "push.h5", fnp.Args(), 35, 4, token=(1, 2, 42))
    np.testing.assert_array_equal(obs.numpy(), tok)
    assert chunks.shape == (2, 8, 4)


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
        "--sft-steps", "10", "--total-timesteps", "40", "--num-steps", "4", "--num-minibatches", "2",
        "--update-epochs", "1", "--critic-warmup", "0", "--eval-episodes", "2", "--max-episode-steps", "10",
        "--save-model", "--exp-name", "test_flow_noise_ppo_mt",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iter=1/1" in result.stdout, result.stdout[-2000:]
    for task in ("Reacher-v5", "Swimmer-v5"):  # evaluated per task, then averaged
        assert re.search(rf"eval/{task}/return=-?\d+\.\d{{3}}", result.stdout), result.stdout[-2000:]
    ckpt = saved_path(result)
    try:  # policy and critic see 10 (padded) obs dims + a 2-dim task token
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        assert state["policy"]["obs_mean"].shape == (12,) and state["critic"]["0.weight"].shape[1] == 12
    finally:
        shutil.rmtree(ckpt.parent, ignore_errors=True)


def test_bad_inputs_exit_with_one_line(pickcube_demos, tmp_path):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases = [
        ({"env_id": "NoSuchEnv-v0"}, "unknown env id"),
        ({"demo_path": str(tmp_path / "none.h5")}, "not found"),
        ({"env_id": "PushCube-v1", "demo_path": str(pickcube_demos)}, "demos are for PickCube-v1"),
        ({"checkpoint": str(tmp_path / "x.pt")}, "not found"),
        ({"checkpoint": str(tmp_path / "junk.pt")}, "cannot read"),
        ({"num_action_chunks": 9}, "num-action-chunks"),
        ({"backbone_path": str(tmp_path)}, "config.json"),
        ({"evaluate": True}, "needs --checkpoint"),
        ({"env_id": "PickCube-v1,PushCube-v1", "num_envs": 1}, "--num-envs"),
        ({"env_id": "PickCube-v1,PushCube-v1", "demo_path": str(pickcube_demos)}, "2 comma-separated"),
        (
            {"env_id": "PushCube-v1,PickCube-v1", "demo_path": f"{pickcube_demos},{pickcube_demos}"},
            "demos are",
        ),
        ({"env_id": "InvertedPendulum-v5,InvertedDoublePendulum-v5"}, "action spaces differ"),
    ]
    for kwargs, needle in cases:  # in-process: every check runs before a model (or a ManiSkill env) is built
        with pytest.raises(SystemExit) as e:
            fnp.main(fnp.Args(**kwargs))
        assert str(e.value).startswith("error:") and "\n" not in str(e.value) and needle in str(e.value)
    with h5py.File(tmp_path / "bad.h5", "w") as f:  # state demos of another env: wrong shapes
        f["traj_0/obs"], f["traj_0/actions"] = np.zeros((6, 10), np.float32), np.zeros((5, 4), np.float32)
    with pytest.raises(SystemExit, match=r"^error: .*has obs \(6, 10\)"):
        fnp.load_demos(tmp_path / "bad.h5", fnp.Args(), obs_dim=42, act_dim=4)
    # and through the CLI: one line on stderr, non-zero exit, no traceback
    one_line_error(run_script("flow_noise_ppo.py", "--env-id", "NoSuchEnv-v0"), "unknown env id")

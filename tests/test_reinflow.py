"""ReinFlow: chain log-likelihood, PPO ratio and gradients, noise bounds, pretraining, CLI smoke runs."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import run_script
from torch.distributions import Normal

import reinflow as rf

SIG_MIN, SIG_MAX = 0.1, 0.24


def make_policy(obs_dim=3, Ta=2, Da=2, hidden=16, shortcut=False, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return rf.FlowPolicy(obs_dim, Ta, Da, hidden, shortcut).to(dtype)


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("shortcut", [False, True])
def test_chain_log_prob_matches_torch_distributions(K, shortcut):
    pol = make_policy(shortcut=shortcut)
    s = torch.randn(32, 3, dtype=torch.float64)
    chain = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
    logp, ent = rf.chain_log_prob(pol, s, chain, K, SIG_MIN, SIG_MAX)
    # independent reference: the velocity and noise nets called directly, Gaussians from torch.distributions
    ref_lp = Normal(0.0, 1.0).log_prob(chain[:, 0]).sum(-1)
    ref_ent = Normal(torch.zeros_like(chain[:, 0]), 1.0).entropy().sum(-1)
    for k in range(K):
        t = torch.full((32,), k / K, dtype=torch.float64)
        v, te = pol.v(chain[:, k], t, s, torch.full_like(t, 1 / K))
        mu = (chain[:, k] + v / K).clamp(-1, 1)
        h = pol.sigma_net(torch.cat([te, s], -1))
        logvar = (
            math.log(SIG_MIN**2) + (math.log(SIG_MAX**2) - math.log(SIG_MIN**2)) * (torch.tanh(h) + 1) / 2
        )
        dist = Normal(mu, torch.exp(0.5 * logvar))
        ref_lp = ref_lp + dist.log_prob(chain[:, k + 1]).sum(-1)
        ref_ent = ref_ent + dist.entropy().sum(-1)
    n = (K + 1) * chain.shape[-1]
    torch.testing.assert_close(logp, ref_lp / n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent / n, rtol=1e-10, atol=1e-10)
    assert chain[:, -1].abs().max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ratio_is_one_with_unchanged_params(dtype):
    """PickCube sizes: rollout batches of 2 envs, recomputed in a shuffled minibatch of another size. Exact in
    float64; in float32 GEMMs of other batch sizes round differently, hence the script's bounds."""
    pol = rf.FlowPolicy(42, 4, 4, 256).to(dtype)
    K = 4
    s = torch.randn(40, 2, 42, dtype=dtype)
    chains, logps = [], []
    for t in range(40):
        c = rf.sample_chain(pol, s[t], K, SIG_MIN, SIG_MAX)
        chains.append(c)
        logps.append(rf.chain_log_prob(pol, s[t], c, K, SIG_MIN, SIG_MAX)[0])
    b_s, b_c = s.reshape(80, 42), torch.stack(chains).reshape(80, K + 1, 16)
    b_lp = torch.stack(logps).flatten()
    mb = torch.randperm(80)[:27]
    new_lp, _ = rf.chain_log_prob(pol, b_s[mb], b_c[mb], K, SIG_MIN, SIG_MAX)
    _, ratio, kl, clipfrac = rf.ppo_policy_loss(new_lp, b_lp[mb], torch.randn(27, dtype=dtype), 0.01, 1.0)
    if dtype == torch.float64:
        assert (ratio - 1).abs().max() < 1e-12
    assert (ratio.mean() - 1).abs() < 1e-6 and (ratio - 1).abs().max() < 1e-4
    assert clipfrac == 0


def test_ppo_loss_gradcheck_velocity_and_noise_params():
    pol = make_policy(hidden=8)
    K, B = 3, 6
    s = torch.randn(B, 3, dtype=torch.float64)
    chain = rf.sample_chain(pol, s, K, SIG_MIN, SIG_MAX)
    old_lp = (
        rf.chain_log_prob(pol, s, chain, K, SIG_MIN, SIG_MAX)[0].detach() + 0.003 * torch.randn(B).double()
    )
    adv = torch.randn(B, dtype=torch.float64)
    names = [
        n
        for n, _ in pol.named_parameters()
        if n in ("v.net.0.bias", "v.net.6.weight", "v.net.6.bias", "sigma_net.0.bias", "sigma_net.4.weight")
    ]
    params = tuple(dict(pol.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    wrapper = LogProb(pol)

    def f(*ps):
        sd = {"pol." + n: p for n, p in zip(names, ps, strict=True)}
        new_lp, ent = torch.func.functional_call(wrapper, sd, (s, chain, K))
        pg, *_ = rf.ppo_policy_loss(new_lp, old_lp, adv, 0.01, 1e9)
        return pg - 0.03 * ent.mean()

    assert any(n.startswith("sigma_net") for n in names) and any(n.startswith("v.") for n in names)
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
            _, sigma = pol.transition(torch.randn(256, 4), k, 4, s, SIG_MIN, 0.15)
            assert sigma.min() >= SIG_MIN * (1 - 1e-6) and sigma.max() <= 0.15 * (1 + 1e-6)
    # the sigma_max schedule holds, then anneals to sigma_min + 0.7 (sigma_max - sigma_min)
    sched = [rf.sigma_max_schedule(i, 100, SIG_MIN, SIG_MAX, 0.35, 0.7) for i in range(101)]
    assert (
        sched[0] == sched[35] == SIG_MAX and abs(sched[100] - (SIG_MIN + 0.7 * (SIG_MAX - SIG_MIN))) < 1e-12
    )
    assert all(a >= b for a, b in zip(sched, sched[1:], strict=False))


MODES = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])


def test_pretraining_on_toy_multimodal_data():
    """1-Rectified Flow on four modes: the loss drops (to its floor, > 0 for multimodal data) and 8-step
    ODE samples land on the modes, each mode getting its share."""
    torch.manual_seed(0)
    pol = rf.FlowPolicy(1, 1, 2, 64)
    opt = torch.optim.Adam(pol.v.parameters(), lr=3e-3)
    losses = []
    for _ in range(800):
        a = MODES[torch.randint(0, 4, (256,))] + 0.02 * torch.randn(256, 2)
        s = torch.zeros(256, 1)
        loss = rf.rectified_flow_loss(pol.v, s, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-100:]) < 0.7 * np.mean(losses[:20])
    x = rf.sample_chain(pol, torch.zeros(1000, 1), 8, 1.0, 1.0, deterministic=True)[:, -1]
    dist = torch.cdist(x, MODES)
    near, which = dist.min(1)
    assert (near < 0.2).float().mean() > 0.7, (near < 0.2).float().mean()
    counts = torch.bincount(which[near < 0.2], minlength=4)
    assert (counts > 100).all(), counts  # all four modes are covered, none collapsed


class FakeEnvs:
    """Env 0 ends an episode (return 0) every step, env 1 every 5 steps (return 1)."""

    n = 2

    def reset(self, seed):
        self.t = 0
        return np.zeros((2, 3), np.float32)

    def step(self, actions):
        self.t += 1
        eps = [{"env": 0} | dict.fromkeys(rf.EPISODE_KEYS, 0.0)]
        if self.t % 5 == 0:
            eps.append({"env": 1} | dict.fromkeys(rf.EPISODE_KEYS, 1.0))
        return np.zeros((2, 3), np.float32), None, None, None, None, eps


def test_evaluate_takes_the_same_number_of_episodes_from_each_env():
    """The first 4 episodes to end would all be env 0's short ones (mean 0); 2 per env gives 0.5."""
    pol = make_policy(Ta=1, dtype=torch.float32)
    m = rf.evaluate(pol, FakeEnvs(), lambda o: torch.as_tensor(o), 2, 4, seed=0)
    assert m["episode_return"] == 0.5


# ---------------------------------------------------------------- CLI smoke runs
def ckpt_of(stdout):
    return [ln.split("saved ")[1] for ln in stdout.splitlines() if ln.startswith("saved")][-1].replace(
        "pretrained.pt", "ckpt.pt"
    )


def test_smoke_mujoco_pretrain_finetune_evaluate_collect(tmp_path):
    """Shortcut flow, K=2 on Hopper-v5 from a random-action npz; then --evaluate and --collect-demos of the
    written checkpoint through the CLI."""
    rng = np.random.default_rng(0)
    demos, collected = tmp_path / "random.npz", tmp_path / "collected.npz"
    np.savez(demos, obs=rng.normal(size=(60, 11)), actions=rng.uniform(-1, 1, (60, 3)), episode_ends=[30, 60])
    hop = "--env-id Hopper-v5 --num-envs 1 --num-eval-envs 1 --max-episode-steps 30 --flow shortcut".split()
    hop += ["--denoising-steps", "2"]
    ft = "--pretrain-steps 20 --total-timesteps 80 --num-steps 10 --eval-episodes 1 --critic-warmup-iters 0"
    r = run_script("reinflow.py", *hop, "--demo-path", str(demos), *ft.split())
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretraining on 2 demos" in r.stdout and "iter 2/2" in r.stdout and "eval iter 2" in r.stdout
    ckpt = ckpt_of(r.stdout)
    r = run_script("reinflow.py", *hop, "--checkpoint", ckpt, "--evaluate", "--eval-episodes", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["episodes"] == 2 and np.isfinite(m["episode_return"])
    r = run_script("reinflow.py", *hop, "--checkpoint", ckpt, "--collect-demos", "2", "--demo-out", collected)
    assert r.returncode == 0, r.stderr[-2000:]
    d = np.load(collected)
    assert (
        d["obs"].shape[1] == 11
        and d["actions"].shape == (d["episode_ends"][-1], 3)
        and len(d["returns"]) == 2
    )


def test_smoke_pickcube_pretrain_finetune_evaluate(pickcube_demos):
    pick = (
        "--env-id PickCube-v1 --num-envs 1 --num-eval-envs 1 --eval-episodes 1 --max-episode-steps 12".split()
    )
    ft = "--pretrain-steps 30 --total-timesteps 64 --num-steps 8 --critic-warmup-iters 0 --bc-coef 0.1"
    r = run_script("reinflow.py", *pick, "--demo-path", str(pickcube_demos), *ft.split(), "--eval-freq", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretraining on 10 demos" in r.stdout and "iter 2/2" in r.stdout
    r = run_script("reinflow.py", *pick, "--checkpoint", ckpt_of(r.stdout), "--evaluate")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= m["success_once"] <= 1.0 and m["episode_length"] == 12


def test_bad_inputs_exit_with_one_line(tmp_path, pickcube_demos):
    bad = tmp_path / "bad.npz"
    np.savez(bad, obs=np.zeros((10, 7)), actions=np.zeros((10, 3)), episode_ends=np.array([10]))
    cases = [
        (["--env-id", "NoSuchEnv-v0"], "unknown env id"),
        (["--env-id", "Hopper-v5", "--demo-path", str(bad)], "obs dim 7"),
        (["--demo-path", str(pickcube_demos), "--control-mode", "pd_joint_delta_pos"], "control mode"),
        (["--env-id", "Hopper-v5", "--checkpoint", str(tmp_path / "none.pt"), "--evaluate"], "not found"),
    ]
    for args, msg in cases:
        r = run_script("reinflow.py", *args, "--total-timesteps", "0", timeout=120)
        assert r.returncode != 0, args
        err = [ln for ln in r.stderr.strip().splitlines() if not ln.lstrip().startswith("\x1b[33")]
        assert len(err) == 1 and err[0].startswith("error:") and msg in err[0], (args, r.stderr[-1000:])

"""sac_flow.py: noise-augmented likelihood, its normalisation, loss gradients, CLI smoke runs, bad input."""

import dataclasses
import functools
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_script
from torch.distributions import AffineTransform, Independent, Normal, TanhTransform, TransformedDistribution
from torch.func import functional_call

import sac_flow

F64 = torch.float64
ROOT = Path(sac_flow.__file__).parent


def small_policy(velocity, K=3, obs_dim=6, d=2, c=(2.0, 0.5), b=(0.5, -1.0)):
    torch.manual_seed(0)
    return sac_flow.FlowPolicy(obs_dim, d, velocity, K, 16, 8, c, b).to(F64)


@pytest.mark.parametrize("velocity", ["g", "t", "naive"])
def test_log_prob_matches_torch_distributions(velocity):
    K, B = 3, 7
    policy = small_policy(velocity, K)
    s, eps = torch.randn(B, 6, dtype=F64), torch.randn(K + 1, B, 2, dtype=F64)
    a, log_pi = policy(s, eps)
    xs, mus, sigma = policy.rollout(s, eps)
    # independent: x_0 and K-1 transitions as Gaussians, the last one pushed through tanh and c·y + b
    ref = Independent(Normal(torch.zeros(2, dtype=F64), 1.0), 1).log_prob(xs[0])
    for k in range(K - 1):
        ref = ref + Independent(Normal(mus[k], sigma), 1).log_prob(xs[k + 1])
    last = TransformedDistribution(
        Normal(mus[-1], sigma), [TanhTransform(), AffineTransform(policy.b, policy.c)]
    )
    ref = ref + last.log_prob(a).sum(-1)
    assert torch.allclose(a, policy.c * torch.tanh(xs[-1]) + policy.b)
    assert torch.allclose(log_pi, ref, rtol=1e-9, atol=1e-7), (log_pi, ref)


def test_squashed_density_integrates_to_one_k1_fixed_sigma():
    """K = 1, fixed σ, 1-D: ∫∫ π(x_0, a|s) dx_0 da = 1 over a ∈ (b − c, b + c), a = c tanh(x_1) + b."""
    policy = small_policy("g", K=1, d=1, c=(1.5,), b=(0.3,))
    s, sigma = torch.randn(1, 6, dtype=F64), torch.tensor(0.4, dtype=F64)
    x0 = torch.linspace(-8, 8, 801, dtype=F64)
    a = torch.linspace(0.3 - 1.5, 0.3 + 1.5, 6001, dtype=F64)[1:-1]
    with torch.no_grad():
        e_s, _ = policy.encode(s.expand(len(x0), 6))
        mu = x0[:, None] + policy.velocity(0.0, x0[:, None], e_s)  # (N0, 1), Δt = 1
        x1 = torch.atanh((a - policy.b) / policy.c)  # (Na,)
        xs = torch.stack([x0[:, None].expand(-1, len(a)), x1[None, :].expand(len(x0), -1)])[..., None]
        log_p = sac_flow.policy_log_prob(xs, mu[None, :, None, :], sigma, policy.c)
    total = torch.trapezoid(torch.trapezoid(log_p.exp(), a, dim=1), x0)
    assert abs(total.item() - 1.0) < 1e-3, total


@pytest.mark.parametrize("velocity", ["g", "t", "naive"])
def test_gradcheck_actor_critic_alpha_losses(velocity):
    policy = small_policy(velocity)
    torch.manual_seed(1)
    qf, qf_target = sac_flow.SoftQ(6, 2, 16).to(F64), sac_flow.SoftQ(6, 2, 16).to(F64)
    B = 4
    s = torch.randn(B, 6, dtype=F64, requires_grad=True)
    eps, eps2 = torch.randn(4, B, 2, dtype=F64), torch.randn(4, B, 2, dtype=F64)
    W = policy.W_x.weight.detach().clone().requires_grad_()

    def f_actor(s, W):
        a, log_pi = functional_call(policy, {"W_x.weight": W}, (s, eps))
        return sac_flow.actor_loss(log_pi, *qf(s, a), 0.3)

    assert torch.autograd.gradcheck(f_actor, (s, W))

    a = torch.rand(B, 2, dtype=F64, requires_grad=True)
    s2, r, d = (
        torch.randn(B, 6, dtype=F64),
        torch.randn(B, dtype=F64),
        torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64),
    )
    Wq = qf.qs[0][0].weight.detach().clone().requires_grad_()

    def f_critic(s, a, Wq):
        with torch.no_grad():
            a2, log_pi2 = policy(s2, eps2)
            y = sac_flow.soft_q_target(r, d, 0.8, *qf_target(s2, a2), log_pi2, 0.3)
        return sac_flow.critic_loss(*functional_call(qf, {"qs.0.0.weight": Wq}, (s, a)), y)

    assert torch.autograd.gradcheck(f_critic, (s, a, Wq))
    log_alpha = torch.tensor(-0.5, dtype=F64, requires_grad=True)
    log_pi = torch.randn(B, dtype=F64)
    assert torch.autograd.gradcheck(lambda la: sac_flow.alpha_loss(la, log_pi, -2.0), (log_alpha,))

    x0, t = torch.randn(B, 2, dtype=F64), torch.rand(B, 1, dtype=F64)
    a = (torch.rand(B, 2, dtype=F64) * 1.6 - 0.8) * policy.c + policy.b  # inside the clamp of atanh

    def f_fm(s, a):
        return sac_flow.flow_matching_loss(policy, s, a, x0, t)

    assert torch.autograd.gradcheck(f_fm, (s, a.requires_grad_()))


# ---- CLI: smoke runs through the real script, then evaluate the written checkpoint ----
# Tiny networks and budgets; on this shared 2-core machine each interpreter start costs 10-20 s (torch),
# so the Pendulum checkpoints are evaluated in-process through main() (the same code path as `--evaluate`),
# and PickCube's through the CLI.
TINY = ["--batch-size", "32", "--hidden", "32", "--transformer-dim", "16", "--num-eval-episodes", "1"]


def checkpoint_of(result) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return re.findall(r"^checkpoint (\S+)$", result.stdout, re.M)[-1]


@functools.cache
def train_pendulum(velocity: str) -> str:
    r = run_script(
        "sac_flow.py", "--env-id", "Pendulum-v1", "--velocity", velocity, "--total-timesteps", "300",
        "--learning-starts", "100", "--eval-freq", "300", "--max-episode-steps", "50", *TINY,
    )  # fmt: skip
    return checkpoint_of(r)


def tiny_args(**kw) -> sac_flow.Args:
    return sac_flow.Args(batch_size=32, hidden=32, transformer_dim=16, num_eval_episodes=1, **kw)


@pytest.mark.parametrize("velocity", ["g", "t", "naive"])
def test_smoke_pendulum_train_then_evaluate(velocity, capsys):
    ckpt = train_pendulum(velocity)
    args = tiny_args(env_id="Pendulum-v1", velocity=velocity, checkpoint=str(ROOT / ckpt), evaluate=True)
    sac_flow.main(dataclasses.replace(args, max_episode_steps=50))
    assert re.search(r"eval .* \(step 300\): return -?\d", capsys.readouterr().out)


def test_save_demos_writes_the_npz_reinflow_reads(tmp_path):
    out = tmp_path / "demos.npz"
    args = tiny_args(env_id="Pendulum-v1", checkpoint=str(ROOT / train_pendulum("g")), max_episode_steps=50)
    sac_flow.main(dataclasses.replace(args, save_demos=3, demo_out=str(out)))
    d = np.load(out)
    assert d["obs"].shape == (150, 3) and d["actions"].shape == (150, 1)
    assert list(d["episode_ends"]) == [50, 100, 150] and d["returns"].shape == (3,)
    assert np.abs(d["actions"]).max() <= 2.0  # Pendulum's bounds


def test_replay_buffer_round_trip_keeps_the_newest_transitions():
    rb = sac_flow.ReplayBuffer(5, 1, 1, "cpu")
    for i in range(7):  # wraps: holds 2..6
        rb.add(np.full((1, 1), i), np.zeros((1, 1)), np.full(1, i), np.zeros((1, 1)), np.zeros(1))
    assert rb.state_dict()["r"].tolist() == [2, 3, 4, 5, 6]
    small = sac_flow.ReplayBuffer(3, 1, 1, "cpu")
    small.load_state_dict(rb.state_dict())
    assert small.size == 3 and sorted(small.r.tolist()) == [4, 5, 6]
    assert small.s[:, 0].tolist() == small.r.tolist()  # rows stay whole


def test_resume_reloads_the_replay_buffer(capsys):
    args = tiny_args(env_id="Pendulum-v1", checkpoint=str(ROOT / train_pendulum("g")), max_episode_steps=50)
    sac_flow.main(dataclasses.replace(args, total_timesteps=400, eval_freq=1000))
    out = capsys.readouterr().out
    assert "resumed 300 transitions" in out and "eval step 400" in out


def test_smoke_pickcube_offline_to_online_then_evaluate(pickcube_demos):
    common = ["--env-id", "PickCube-v1", "--num-envs", "1", "--max-episode-steps", "20", *TINY]
    r = run_script(
        "sac_flow.py", "--demo-path", str(pickcube_demos), "--pretrain-steps", "20",
        "--total-timesteps", "200", "--eval-freq", "200", *common,
    )  # fmt: skip
    ckpt = checkpoint_of(r)
    assert "pretrain 19: flow-matching loss" in r.stdout and "success" in r.stdout
    r = run_script("sac_flow.py", "--checkpoint", ckpt, "--evaluate", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"success_once \d\.\d+ success_at_end \d\.\d+", r.stdout), r.stdout


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if "WARNING" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_bad_inputs_exit_with_one_clear_line(pickcube_demos, tmp_path):
    assert_one_line_error(run_script("sac_flow.py", "--env-id", "NoSuchEnv-v0"), "unknown env id")
    bad = tmp_path / "bad.h5"  # the same demos with 3-dimensional actions
    with h5py.File(pickcube_demos) as src, h5py.File(bad, "w") as dst:
        for name in src:
            dst[f"{name}/obs"], dst[f"{name}/actions"] = src[name]["obs"][()], src[name]["actions"][:, :3]
            dst[f"{name}/rewards"], dst[f"{name}/terminated"] = (
                src[name]["rewards"][()],
                src[name]["terminated"][()],
            )
    bad.with_suffix(".json").write_text(pickcube_demos.with_suffix(".json").read_text())
    r = run_script(
        "sac_flow.py", "--env-id", "PickCube-v1", "--num-envs", "1", "--demo-path", str(bad), *TINY
    )
    assert_one_line_error(r, "actions", "(L, 4)")
    # the checks behind the remaining errors, called directly (SystemExit prints one line and exits with 1)
    ckpt = str(ROOT / train_pendulum("g"))
    with pytest.raises(
        SystemExit, match=r"^error: checkpoint .* velocity='g' but this run has 't'; pass --velocity g"
    ):
        sac_flow.load_checkpoint(ckpt, tiny_args(env_id="Pendulum-v1", velocity="t"))
    with pytest.raises(SystemExit, match="^error: checkpoint .* not found"):
        sac_flow.load_checkpoint(str(tmp_path / "none.pt"), tiny_args())
    with pytest.raises(
        SystemExit, match=r"^error: demos are for PickCube-v1 / pd_ee_delta_pos, not PushCube-v1"
    ):
        sac_flow.load_demos(str(pickcube_demos), "PushCube-v1", "pd_ee_delta_pos", 35, 4)

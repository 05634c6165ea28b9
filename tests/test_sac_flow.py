"""sac_flow.py: the sampler against the scorer, the likelihood and its normalisation, loss values and
gradients, the rollout's time grid against flow matching; CLI runs on both vector envs, determinism, exact
resume, NaN guard, bad input."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import assert_one_line_error, read_scalars, run_script, snapshot
from scipy import stats
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


def test_flow_t_block_equals_a_decoder_block_with_multihead_attention():
    """With one action-time token and one state token every attention weight is 1: the written-out block
    (W_sa, + e_s) is the pre-norm decoder block with nn.MultiheadAttention, once W_sa and W_s are the
    attentions' value-then-output maps (W_s composed with the cross-attention's)."""
    policy, w = small_policy("t"), 8
    torch.manual_seed(2)
    sa, ca = (torch.nn.MultiheadAttention(w, 4, batch_first=True).to(F64) for _ in range(2))
    W_s_ref = torch.nn.Linear(16, w).to(F64)  # the old state token e_s, before the cross-attention's maps

    def value_then_output(attn):  # (weight, bias) of W_o (W_v x + b_v) + b_o
        W_v, b_v = attn.in_proj_weight[2 * w :], attn.in_proj_bias[2 * w :]
        return attn.out_proj.weight @ W_v, attn.out_proj.weight @ b_v + attn.out_proj.bias

    with torch.no_grad():
        policy.W_sa.weight[:], policy.W_sa.bias[:] = value_then_output(sa)
        W, bias = value_then_output(ca)
        policy.W_s.weight[:], policy.W_s.bias[:] = W @ W_s_ref.weight, W @ W_s_ref.bias + bias
        s, x, t = torch.randn(5, 6, dtype=F64), torch.randn(5, 2, dtype=F64), torch.rand(5, 1, dtype=F64)
        f = policy.f_s(s)
        z = policy.W_x(torch.cat([x, t], -1)).unsqueeze(1)
        mem = W_s_ref(f).unsqueeze(1)
        q = policy.ln[0](z)
        z = z + sa(q, q, q, need_weights=False)[0]
        z = z + ca(torch.randn_like(z), mem, mem, need_weights=False)[0]  # the query does not matter
        z = z + policy.ffn(policy.ln[1](z))
        ref = policy.W_o(policy.ln[2](z.squeeze(1)))
        assert torch.allclose(policy.velocity(t, x, policy.encode(s)[0]), ref, atol=1e-12)


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


def test_loss_values_by_hand():
    """Signs and the min over the twin critics, on numbers worked out by hand."""
    one = lambda x: torch.tensor([x], dtype=F64)  # noqa: E731
    y = sac_flow.soft_q_target(one(1.0), one(0.0), 0.5, one(2.0), one(4.0), one(-1.0), 0.5)
    assert y.item() == pytest.approx(1.0 + 0.5 * (2.0 + 0.5))  # r + γ (min Q̄ − α log π)
    assert sac_flow.soft_q_target(one(1.0), one(1.0), 0.5, one(2.0), one(4.0), one(-1.0), 0.5).item() == 1.0
    assert sac_flow.actor_loss(one(-1.0), one(2.0), one(4.0), 0.5).item() == pytest.approx(-0.5 - 2.0)
    assert sac_flow.alpha_loss(torch.tensor(0.0), one(-1.0), -2.0).item() == pytest.approx(3)  # −α(logπ + H̄)


def test_crossq_next_q_shares_the_batch_norm_pass_and_has_no_gradient():
    """CrossQ: Q(s', a') from the same training-mode pass as Q(s, a) (statistics of the joint batch),
    detached, and no target network; otherwise Q̄ is the target network's."""
    torch.manual_seed(0)
    qf, qf_target = sac_flow.SoftQ(3, 2, 8, batch_norm=True).to(F64), sac_flow.SoftQ(3, 2, 8).to(F64)
    s, s2 = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64) + 2.0
    a, a2 = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64)
    joint = [q.detach().clone() for q in qf(torch.cat([s, s2]), torch.cat([a, a2]))]
    separate = qf(s2, a2)  # s2 alone: other batch statistics
    (q1, q2), (q1n, q2n) = sac_flow.q_and_next_q(qf, qf_target, s, a, s2, a2, crossq=True)
    assert torch.allclose(q1, joint[0][:5]) and torch.allclose(q2n, joint[1][5:])
    assert not torch.allclose(q1n, separate[0])
    assert q1.requires_grad and not q1n.requires_grad and not q2n.requires_grad
    qf = sac_flow.SoftQ(3, 2, 8).to(F64)
    (q1, _), (q1n, _) = sac_flow.q_and_next_q(qf, qf_target, s, a, s2, a2, crossq=False)
    assert torch.allclose(q1n, qf_target(s2, a2)[0]) and torch.allclose(q1, qf(s, a)[0])
    assert q1.requires_grad and not q1n.requires_grad


def scored_means(policy, s, xs):
    """μ_k = x_k + Δt v_θ(k/K, x_k, s) from a given chain (the paper's formula, written independently)."""
    e_s, sigma = policy.encode(s)
    K = len(xs) - 1
    return torch.stack([xs[k] + policy.velocity(k / K, xs[k], e_s) / K for k in range(K)]), sigma


@pytest.mark.parametrize("velocity", ["g", "t", "naive"])
def test_sampler_draws_what_the_scorer_scores(velocity):
    """Chains from the rollout that training uses: (x_{k+1} − μ_k)/σ is N(0, 1) with the scorer's μ_k, σ."""
    policy = small_policy(velocity)
    torch.manual_seed(1)
    B = 20_000
    s = torch.randn(B, 6, dtype=F64)
    with torch.no_grad():
        xs = policy.rollout(s, torch.randn(4, B, 2, dtype=F64))[0]
        mus, sigma = scored_means(policy, s, xs)
    assert sigma.median() < 0.5  # mostly away from 1, where σ² for σ would not show
    z = ((xs[1:] - mus) / sigma).flatten().numpy()
    n = len(z)
    assert abs(z.mean()) < 4 / np.sqrt(n) and abs(z.var() - 1) < 4 * np.sqrt(2 / n), (z.mean(), z.var())
    assert stats.kstest(z, "norm").pvalue > 1e-3
    x0 = xs[0].flatten().numpy()
    assert stats.kstest(x0, "norm").pvalue > 1e-3


@pytest.mark.parametrize("velocity", ["g", "naive"])
def test_score_function_identity(velocity):
    """E_{chain ~ π_θ}[∇_θ log π_θ(chain)] = 0, within its Monte Carlo error, for chains the rollout drew."""
    policy = small_policy(velocity)
    torch.manual_seed(2)
    params = [p for p in policy.parameters()]
    grads = []
    for _ in range(40):
        s = torch.randn(500, 6, dtype=F64)
        with torch.no_grad():
            xs = policy.rollout(s, torch.randn(4, 500, 2, dtype=F64))[0]
        mus, sigma = scored_means(policy, s, xs)
        log_pi = sac_flow.policy_log_prob(xs, mus, sigma, policy.c).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(log_pi, params)]))
    g = torch.stack(grads)
    sd = g.std(0)
    z = (g.mean(0) / (sd / np.sqrt(len(g))))[sd > 1e-12]
    assert (z**2).mean() < 1.5 and z.abs().max() < 5, ((z**2).mean(), z.abs().max())


def test_rollout_uses_the_time_grid_flow_matching_trains():
    """Pretrained by flow matching on one action, the rollout with σ → 0 lands on that action: the Euler steps
    query v_θ at the t_k = k/K that the loss trained."""
    torch.manual_seed(0)
    policy = sac_flow.FlowPolicy(3, 2, "g", 3, 32, 8, np.ones(2), np.zeros(2), -12.0, -12.0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    s, a_star = torch.zeros(128, 3), torch.tensor([0.6, -0.3]).expand(128, 2)
    for _ in range(1000):
        loss = sac_flow.flow_matching_loss(policy, s, a_star, torch.randn(128, 2), torch.rand(128, 1))
        sac_flow.descend(opt, loss)
    with torch.no_grad():
        a, _ = policy(torch.zeros(1000, 3))
    err = (a - a_star[0]).abs().max(-1).values
    assert err.median() < 0.05, err.median()  # (k + 1)/K in the rollout: 0.10


# ---- CLI and main(): tiny networks and budgets. On this shared 2-core machine each interpreter start costs
# 10-20 s (torch, ManiSkill), so most runs call main() in-process (the code path of the command line) inside a
# temporary working directory; two subprocess runs prove the command line itself (an evaluation, a bad flag).
TINY = ["--batch-size", "32", "--hidden-dim", "32", "--transformer-dim", "16", "--eval-episodes", "1"]
PENDULUM = dict(env_id="Pendulum-v1", max_episode_steps=50, learning_starts=100)


def tiny_args(**kw) -> sac_flow.Args:
    return sac_flow.Args(batch_size=32, hidden_dim=32, transformer_dim=16, eval_episodes=1, **kw)


def run_main(args: sac_flow.Args) -> str:
    """main(args) in the current directory; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sac_flow.main(args)
    return out.getvalue()


def checkpoint_in(out: str) -> str:
    return re.findall(r"^checkpoint (\S+)$", out, re.M)[-1]


PENDULUM_RUN = dict(total_timesteps=300, eval_freq=150, **PENDULUM)


@pytest.fixture(scope="module")
def pendulum_runs(tmp_path_factory) -> dict[str, Path]:
    """A 300-step Pendulum run per velocity; returns the final ckpt.pt of each."""
    d = tmp_path_factory.mktemp("pendulum")
    with contextlib.chdir(d):
        outs = {v: run_main(tiny_args(velocity=v, exp_name=v, **PENDULUM_RUN)) for v in ("g", "t", "naive")}
    return {v: d / checkpoint_in(out) for v, out in outs.items()}


@pytest.mark.parametrize("velocity", ["g", "t", "naive"])
def test_pendulum_train_then_evaluate_writes_json(velocity, pendulum_runs):
    ckpt = pendulum_runs[velocity]
    out = run_main(tiny_args(env_id="Pendulum-v1", velocity=velocity, checkpoint=str(ckpt), evaluate=True,
                             max_episode_steps=50))  # fmt: skip
    assert re.search(r"^eval step 300: return -?\d+\.\d+ .*seed 1;", out, re.M), out
    result = json.loads(ckpt.with_suffix(".eval.json").read_text())
    assert result["global_step"] == 300 and result["seed"] == 1 and result["eval_episodes"] == 1
    logged = (ckpt.parent / "eval.csv").read_text().splitlines()[-1].split(",")  # step,wall_s,return,...
    assert logged[0] == "300" and float(logged[2]) == pytest.approx(result["return"], abs=1e-3)


def test_save_demos_writes_the_npz_reinflow_reads(tmp_path, pendulum_runs):
    out = tmp_path / "demos.npz"
    run_main(tiny_args(env_id="Pendulum-v1", checkpoint=str(pendulum_runs["g"]), max_episode_steps=50,
                       save_demos=3, demo_out=str(out)))  # fmt: skip
    d = np.load(out)
    assert d["obs"].shape == (150, 3) and d["actions"].shape == (150, 1)
    assert list(d["episode_ends"]) == [50, 100, 150] and d["returns"].shape == (3,)
    assert np.abs(d["actions"]).max() <= 2.0  # Pendulum's bounds


def test_replay_buffer_round_trip_keeps_the_newest_transitions_in_their_slots():
    rb = sac_flow.ReplayBuffer(5, 1, 1, "cpu")
    for i in range(7):  # wraps: holds 2..6, the next write goes to slot 2
        rb.add(np.full((1, 1), i), np.zeros((1, 1)), np.full(1, i), np.zeros((1, 1)), np.zeros(1))
    assert rb.state_dict()["r"].tolist() == [2, 3, 4, 5, 6]
    same = sac_flow.ReplayBuffer(5, 1, 1, "cpu")
    same.load_state_dict(rb.state_dict())
    assert same.r.tolist() == rb.r.tolist() and same.pos == rb.pos  # same slots: minibatches as unbroken
    small = sac_flow.ReplayBuffer(3, 1, 1, "cpu")
    small.load_state_dict(rb.state_dict())
    assert small.size == 3 and sorted(small.r.tolist()) == [4, 5, 6]
    assert small.s[:, 0].tolist() == small.r.tolist()  # rows stay whole


def test_same_seed_same_scalars(tmp_path, monkeypatch, pendulum_runs):
    """Warm-up actions included: they come from the seeded action space."""
    monkeypatch.chdir(tmp_path)
    again = tmp_path / checkpoint_in(run_main(tiny_args(velocity="g", **PENDULUM_RUN)))
    a, b = read_scalars(pendulum_runs["g"].parent), read_scalars(again.parent)
    assert len(a["charts/episodic_return"]) == 6 and len(a["eval/return"]) == 3 and a == b


# each critic: batch norm's running statistics are resumed too; without LayerNorm Q has no parameters there
@pytest.mark.parametrize("critic", [{}, {"crossq": True}, {"q_layer_norm": False}])
def test_resumed_run_logs_what_the_unbroken_run_logs(tmp_path, monkeypatch, critic):
    monkeypatch.chdir(tmp_path)
    common = dict(eval_freq=200, policy_frequency=3, **critic, **PENDULUM)  # the update count is resumed
    run_main(tiny_args(exp_name="whole", total_timesteps=400, **common))
    ckpt = checkpoint_in(run_main(tiny_args(exp_name="part", total_timesteps=200, **common)))  # at step 200
    out = run_main(tiny_args(exp_name="resumed", total_timesteps=400, checkpoint=ckpt, **common))
    assert re.search(rf"^resumed {re.escape(ckpt)} at step 200 \(200 transitions", out, re.M), out
    norm_keys = [k for k in torch.load(ckpt, weights_only=False)["qf"] if k.startswith("qs.0.1.")]
    assert bool(norm_keys) == critic.get("q_layer_norm", True), norm_keys
    whole, part, resumed = (read_scalars(next(Path("runs").glob(f"*__{n}__*"))) for n in ("whole", "part", "resumed"))  # noqa: E501
    after = {tag: [(s, v) for s, v in values if s > 200] for tag, values in whole.items()}
    assert resumed == {tag: values for tag, values in after.items() if values}
    assert len(resumed["charts/episodic_return"]) == 4 and "losses/qf_loss" in resumed
    before = {tag: [(s, v) for s, v in values if s <= 200] for tag, values in whole.items()}
    assert part["eval/return"] == before["eval/return"]
    assert part["charts/episodic_return"] == before["charts/episodic_return"]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sac_flow, "critic_loss", lambda q1, q2, y: ((q1 + q2 - 2 * y) * np.nan).mean())
    with pytest.raises(SystemExit) as e:
        run_main(tiny_args(total_timesteps=300, eval_freq=100, **PENDULUM))
    ckpt = re.fullmatch(r"error: non-finite qf_loss at step 101; last good checkpoint: (\S+)", str(e.value))
    assert ckpt, str(e.value)
    assert torch.load(ckpt[1], weights_only=False)["global_step"] == 100


def test_pickcube_batched_path_trains_resumes_and_evaluates(pickcube_demos, tmp_path, monkeypatch):
    """The GPU code path (ManiSkillVectorEnv) on physx_cpu: offline-to-online, resumed in-process on the same
    path, evaluated through the command line on the per-process (gymnasium) path."""
    env = ["--env-id", "PickCube-v1", "--max-episode-steps", "20", "--demo-path", str(pickcube_demos), *TINY]
    batched = ["--sim-backend", "physx_cpu", "--vector-env", "maniskill", "--num-envs", "1", *env]
    budget = ["--sft-steps", "20", "--total-timesteps", "100", "--eval-freq", "100"]
    monkeypatch.chdir(tmp_path)
    out = run_main(tyro.cli(sac_flow.Args, args=[*budget, *batched]))
    banner = r"^run \S+ \| env PickCube-v1 \(physx_cpu, maniskill\) \| device cpu \| demos \d+ transitions"
    assert re.search(banner, out, re.M), out
    assert "sft 20/20: flow-matching loss" in out and "success_once" in out
    ckpt = str(tmp_path / checkpoint_in(out))
    with h5py.File(pickcube_demos) as f:  # a = c tanh(x_K) + b spans the demos' range, kept in the checkpoint
        a = np.concatenate([f[k]["actions"][()] for k in f])
    policy = torch.load(ckpt, weights_only=False)["policy"]
    np.testing.assert_allclose(policy["b"] - policy["c"], a.min(0), atol=1e-6)
    np.testing.assert_allclose(policy["b"] + policy["c"], a.max(0), atol=1e-6)
    out = run_main(tyro.cli(sac_flow.Args, args=[*batched, "--checkpoint", ckpt, "--total-timesteps", "200"]))
    assert f"resumed {ckpt} at step 100" in out and "eval step 200:" in out, out
    progress = r"^step 200/200 \| \d+ steps/s \| ETA 0m \| train episodes \(end at success\): return"
    assert re.search(progress, out, re.M), out
    ckpt = str(tmp_path / checkpoint_in(out))
    r = run_script("sac_flow.py", "--checkpoint", ckpt, "--evaluate", "--vector-env", "gymnasium", *env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^eval step 200: return \S+ success_once \d\.\d+ success_at_end \d", r.stdout, re.M)
    assert "success_once" in json.loads(Path(ckpt).with_suffix(".eval.json").read_text())


# ---- bad input: one "error:" line, exit 1, no traceback, nothing written, no env built ----
BAD_FLAGS = {
    "--num-envs 0": (dict(num_envs=0), "--num-envs"),
    "--num-envs -1": (dict(num_envs=-1), "--num-envs"),
    "--denoising-steps 0": (dict(denoising_steps=0), "--denoising-steps"),
    "--denoising-steps -1": (dict(denoising_steps=-1), "--denoising-steps"),
    "--total-timesteps -100": (dict(total_timesteps=-100), "--total-timesteps"),
    "--gamma 2": (dict(gamma=2.0), "--gamma"),
    "log sigma bounds swapped": (dict(log_sigma_min=1.0, log_sigma_max=0.0), "--log-sigma-min"),
    "unknown env": (dict(env_id="NoSuchEnv-v0"), "NoSuchEnv-v0"),
    "--evaluate without checkpoint": (dict(evaluate=True), "--checkpoint"),
    "gymnasium id on the batched env": (dict(vector_env="maniskill"), "--vector-env maniskill"),
    "physx_cpu batched with 2 envs": (
        dict(env_id="PickCube-v1", sim_backend="physx_cpu", vector_env="maniskill", num_envs=2),
        "--num-envs 1",
    ),
}


def expect_error(args: sac_flow.Args, where: Path, *needles: str):
    before = snapshot(where)
    with pytest.raises(SystemExit) as e:
        run_main(args)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and all(n in msg for n in needles), msg
    assert snapshot(where) == before


@pytest.fixture
def no_envs(monkeypatch, tmp_path):
    """Bad input must be refused before any env is built, in an empty working directory."""
    monkeypatch.setattr(sac_flow, "make_envs", lambda *a, **k: pytest.fail("an env was built"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags(case, no_envs):
    kw, needle = BAD_FLAGS[case]
    expect_error(tiny_args(**{"env_id": "Pendulum-v1", **kw}), no_envs, needle)


def bad_demo_files(demos: Path, d: Path) -> dict[str, Path]:
    """Broken copies of a good demo file, each with the good json sidecar."""
    files = {name: d / f"{name}.h5" for name in ("truncated", "not_h5", "no_actions")}
    files["truncated"].write_bytes(demos.read_bytes()[: demos.stat().st_size // 2])
    files["not_h5"].write_text("obs,actions\n")
    with h5py.File(demos) as src, h5py.File(files["no_actions"], "w") as dst:
        for name in src:
            for key in ("obs", "rewards", "terminated"):
                dst[f"{name}/{key}"] = src[name][key][()]
    for f in files.values():
        shutil.copy(demos.with_suffix(".json"), f.with_suffix(".json"))
    return files


def test_bad_demo_files_fail_before_any_env(pickcube_demos, no_envs):
    for name, path in bad_demo_files(pickcube_demos, no_envs).items():
        needle = "actions" if name == "no_actions" else "not a readable h5"
        expect_error(tiny_args(env_id="PickCube-v1", demo_path=str(path)), no_envs, str(path), needle)
    expect_error(tiny_args(env_id="PushCube-v1", demo_path=str(pickcube_demos)), no_envs,
                 "demos are for PickCube-v1 / pd_ee_delta_pos, not PushCube-v1")  # fmt: skip


def test_demos_of_the_wrong_shape_fail_before_the_run_directory(pickcube_demos, tmp_path, monkeypatch):
    bad = tmp_path / "bad.h5"  # the same demos with 3-dimensional actions
    with h5py.File(pickcube_demos) as src, h5py.File(bad, "w") as dst:
        for name in src:
            for key in ("obs", "rewards", "terminated"):
                dst[f"{name}/{key}"] = src[name][key][()]
            dst[f"{name}/actions"] = src[name]["actions"][:, :3]
    shutil.copy(pickcube_demos.with_suffix(".json"), bad.with_suffix(".json"))
    monkeypatch.chdir(tmp_path)
    expect_error(tiny_args(env_id="PickCube-v1", num_envs=1, demo_path=str(bad)), tmp_path,
                 "actions of dim 3; PickCube-v1 needs 42 and 4")  # fmt: skip


def test_a_run_directory_in_use_is_refused(tmp_path, monkeypatch):
    """Two runs named alike in the same second would overwrite each other's ckpt.pt: the second one stops."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sac_flow.time, "time", lambda: 1000.0)
    (tmp_path / "runs" / "Pendulum-v1__twin__1__1000").mkdir(parents=True)
    twin = tiny_args(exp_name="twin", total_timesteps=50, **PENDULUM)
    expect_error(twin, tmp_path, "runs/Pendulum-v1__twin__1__1000 exists")


def test_bad_checkpoints(pendulum_runs, no_envs):
    good = pendulum_runs["g"]
    args = dict(env_id="Pendulum-v1")
    saved = torch.load(good, weights_only=False)
    cases = {
        "missing.pt": (None, "not found"),
        "text.pt": ("not a checkpoint", "not a torch file"),
        "reinflow.pt": ({**saved, "script": "reinflow"}, "by reinflow.py"),
        "old.pt": ({k: v for k, v in saved.items() if k != "script"}, "no script key"),
    }
    for name, (content, needle) in cases.items():
        path = no_envs / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            torch.save(content, path)
        expect_error(tiny_args(checkpoint=str(path), **args), no_envs, str(path), needle)
    expect_error(tiny_args(checkpoint=str(good), **{**args, "velocity": "t"}), no_envs,
                 "velocity='g' but this run has 't'; pass --velocity g")  # fmt: skip
    expect_error(tiny_args(checkpoint=str(good), **{**args, "q_layer_norm": False}), no_envs,
                 "q_layer_norm=True but this run has False; pass --q-layer-norm")  # fmt: skip
    run = no_envs / "run"
    shutil.copytree(good.parent, run)
    buffer = run / "buffer.pt"
    buffer.write_bytes(buffer.read_bytes()[:1000])
    expect_error(tiny_args(checkpoint=str(run / "ckpt.pt"), **args), no_envs, str(buffer))


def test_cli_bad_input_is_one_line_and_creates_nothing():
    ours = lambda: {p for p in snapshot(ROOT / "runs") if "__sac_flow__" in str(p)}  # noqa: E731  (shared dir)
    before = ours()
    r = run_script("sac_flow.py", "--env-id", "Pendulum-v1", "--denoising-steps", "0")
    assert_one_line_error(r, "--denoising-steps")
    assert ours() == before

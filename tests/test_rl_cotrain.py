"""rl_cotrain.py: the sampler against the scorer, the losses, the shift rules on both simulator paths, bad
inputs, determinism, exact resume, and short runs on the batched (GPU) path on the CPU."""

import copy
import json
import math
import re
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import tyro
from conftest import assert_one_line_error, read_scalars, run_script, snapshot

import rl_cotrain as rc

CPU = torch.device("cpu")
TINY = ["--max-episode-steps", "30", "--eval-episodes", "1", "--real-demos", "2", "--sft-steps", "20",
        "--sft-batch-size", "64", "--hidden-dim", "32", "--critic-warmup-iters", "1", "--update-epochs", "1",
        "--eval-shift", "", "--no-cuda", "--num-envs", "1", "--num-eval-envs", "1"]  # fmt: skip


def tiny_policy(seed=0, K=3, sigma_max=0.3):
    torch.manual_seed(seed)
    return rc.FlowNoisePolicy(obs_dim=6, A=2, H=1, K=K, sigma_min=0.05, sigma_max=sigma_max, hidden_dim=64)


def test_chain_log_prob_matches_step_by_step_gaussians():
    policy, o = tiny_policy(), torch.randn(5, 6)
    chain = rc.sample_chain(policy, o)
    expected = torch.zeros(5, 2)
    for k in range(3):
        tau = torch.full((5, 1), k / 3)
        mu = chain[:, k] + policy.velocity(policy.norm(o), chain[:, k], tau) / 3
        sigma = policy.sigma(policy.norm(o), chain[:, k], tau)
        expected += torch.distributions.Normal(mu, sigma).log_prob(chain[:, k + 1])
    # flow_noise_ppo's log-likelihoods: per action dim (token) and per action (chunk), over K + 1 = 4 terms
    torch.testing.assert_close(rc.chain_log_prob(policy, o, chain, "token", 2), expected / 4)
    torch.testing.assert_close(rc.chain_log_prob(policy, o, chain, "chunk", 2), expected.sum(-1) / 4)
    # read as a chunk of H = 2 one-dim actions of which C = 1 is played: only the played element counts
    torch.testing.assert_close(rc.chain_log_prob(policy, o, chain, "token", 1), expected[:, :1] / 4)
    torch.testing.assert_close(rc.chain_log_prob(policy, o, chain, "chunk", 1), expected[:, 0] / 4)
    # deterministic sampling is the noiseless Euler flow: the same generator seed, the same chain
    c1 = rc.sample_chain(policy, o, deterministic=True, generator=torch.Generator().manual_seed(3))
    c2 = rc.sample_chain(policy, o, deterministic=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(c1, c2)
    # --a0-zero: every chain starts at 0, so the noise-free chain is a function of o alone
    policy.a0_zero = True
    c1, c2 = (rc.sample_chain(policy, o, deterministic=True) for _ in range(2))
    torch.testing.assert_close(c1, c2)
    assert rc.sample_chain(policy, o)[:, 0].abs().max().item() == 0.0
    # normalised observations are clipped: a feature the demos held constant must not blow up the velocity
    policy.obs_std.fill_(1e-3)
    assert policy.norm(torch.full((1, 6), 5.0)).abs().max().item() == 10.0


def test_sampler_draws_the_chains_that_chain_log_prob_scores():
    """Chains from sample_chain (the rollout sampler), residuals standardised by chain_gaussians (the scorer's
    mu_k, sigma_k) must be N(0, 1), and E[grad_theta log pi(chain)] = 0 (the score-function identity)."""
    policy = tiny_policy(seed=1, K=4, sigma_max=0.2)
    with torch.no_grad():  # a large velocity that changes fast with tau: a wrong time grid moves mu_k visibly
        policy.v[0].weight[:, -1].mul_(30.0)
        policy.v[-1].weight.mul_(10.0)
    torch.manual_seed(2)
    o = torch.randn(16, 6).repeat_interleave(1250, 0)  # 20k chains over 16 observations
    chain = rc.sample_chain(policy, o)
    with torch.no_grad():
        mu, sigma = rc.chain_gaussians(policy, o, chain)
    z = ((chain[:, 1:] - mu) / sigma).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n), z.mean()
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n), z.var()
    z_sorted = z.sort().values
    cdf = 0.5 * (1 + torch.erf(z_sorted / math.sqrt(2)))
    ks = (torch.arange(1, n + 1, dtype=torch.float64) / n - cdf).abs().max().item()
    assert ks < 1.95 / math.sqrt(n), ks  # Kolmogorov-Smirnov at the 0.1 % level
    # E[u . grad log pi] = 0 along random parameter directions u, within its Monte Carlo error
    p64 = copy.deepcopy(policy).double()
    o64, chain64, h = o.double(), chain.double(), 1e-6
    gen = torch.Generator().manual_seed(4)
    for part in (p64.v, p64.noise, p64):
        u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in part.parameters()]
        with torch.no_grad():
            for p, d in zip(part.parameters(), u, strict=True):
                p.add_(h * d)
            plus = rc.chain_log_prob(p64, o64, chain64, "chunk", 2)
            for p, d in zip(part.parameters(), u, strict=True):
                p.sub_(2 * h * d)
            minus = rc.chain_log_prob(p64, o64, chain64, "chunk", 2)
            for p, d in zip(part.parameters(), u, strict=True):
                p.add_(h * d)
        s = (plus - minus) / (2 * h)
        assert abs(s.mean().item()) < 4.5 * s.std().item() / math.sqrt(len(s)), (s.mean(), s.std())


def test_combined_loss_gradient_is_rl_plus_beta_sft():
    policy, beta = tiny_policy(), 0.37
    o = torch.randn(8, 6)
    chain = rc.sample_chain(policy, o)
    old_logp = rc.chain_log_prob(policy, o, chain, "chunk", 2).detach() + 0.05 * torch.randn(8)
    adv = torch.randn(8)
    demo_o, demo_a = torch.randn(16, 6), torch.rand(16, 2) * 2 - 1
    tau, eps = torch.rand(16, 1), torch.randn(16, 2)

    def grads(loss):
        policy.zero_grad()
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in policy.parameters()]

    def l_rl():
        return rc.ppo_policy_loss(rc.chain_log_prob(policy, o, chain, "chunk", 2), old_logp, adv, 0.2)[0]

    def l_sft():
        return rc.flow_matching_loss(policy, demo_o, demo_a, tau, eps)

    g_rl, g_sft = grads(l_rl()), grads(l_sft())
    g_all = grads(rc.rl_co_loss(l_rl(), l_sft(), beta))
    assert any(g.abs().sum() > 0 for g in g_sft) and any(g.abs().sum() > 0 for g in g_rl)
    for ga, gr, gs in zip(g_all, g_rl, g_sft, strict=True):
        torch.testing.assert_close(ga, gr + beta * gs)


def test_ppo_policy_loss_and_gae_by_hand():
    ratio = torch.tensor([1.5, 0.5, 1.1, 0.9])
    new_logp = ratio.log().requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, kl = rc.ppo_policy_loss(new_logp, torch.zeros(4), adv, clip_coef=0.2)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)): -1.2 (clipped), -0.5, 1.1, 0.9
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.9) / 4)
    assert kl.item() == pytest.approx(((ratio - 1) - ratio.log()).mean().item())
    loss.backward()  # raising log pi where A > 0 lowers the loss; the clipped sample gets no gradient
    torch.testing.assert_close(new_logp.grad, torch.tensor([0.0, -0.5, 1.1, 0.9]) / 4)
    # token log-probs (B, A): one ratio per action dim, each clipped alone, all sharing their sample's A
    new_logp = ratio.log().view(2, 2).requires_grad_()
    loss, kl = rc.ppo_policy_loss(new_logp, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), clip_coef=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 + 0.9) / 4)
    loss.backward()
    torch.testing.assert_close(new_logp.grad, torch.tensor([[0.0, -0.5], [1.1, 0.9]]) / 4)
    # gae(rewards, values, dones, next_value, gamma, gae_lambda): an episode ends at t = 1
    rewards, values = torch.tensor([[1.0], [2.0], [3.0]]), torch.full((3, 1), 0.5)
    adv, ret = rc.gae(rewards, values, torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([10.0]), 0.9, 0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.95 + 0.72 * 1.5], [1.5], [3 + 9 - 0.5]]))
    torch.testing.assert_close(ret, adv + values)


def test_relative_reward_values_success_above_hovering_near_the_goal():
    """The success-termination trap and its fix, on the scripted expert's episodes in a training env: success
    terminates the episode and cuts its return. On the dense reward d (rebuilt here as the running sum of
    r'_t = d_t - d_{t-1}) hovering 3 cm above the goal to the time limit returns more than succeeding; on the
    relative reward the loop trains on, succeeding returns more. Each episode's r' sums to its last d."""
    args = rc.Args(max_episode_steps=40, sim_backend="physx_cpu", vector_env="gymnasium")
    envs = rc.VecEnv(args, 1, dict(rc.NOMINAL_SHIFT), CPU, evaluation=False)

    def hover(o):
        return rc.grasp_and_carry(o[:, 19:22], o[:, 29:32], o[:, 18] > 0.5, o[:, 26:29] + [0.0, 0.0, 0.03])

    def episode(expert, o):
        rewards = []
        while True:
            o, r, term, trunc, success = envs.step(torch.as_tensor(expert(o.numpy())))
            rewards.append(r.item())
            if term | trunc:
                return o, term | trunc, rewards, bool(term), bool(success)

    def start_return(rewards):  # the loop's targets for one episode: lambda = 1, V = 0, no bootstrap
        r = torch.tensor(rewards)[:, None]
        dones = torch.zeros_like(r)
        dones[-1] = 1.0
        return rc.gae(r, torch.zeros_like(r), dones, torch.zeros(1), args.gamma, 1.0)[1][0].item()

    try:
        o, done, rel_success, term, success = episode(rc.scripted_pick_expert, envs.reset([2]))
        assert term and success and len(rel_success) < 40
        # the next episode starts by reset_done: its r' must not subtract the last episode's final d
        _, _, rel_hover, term, success = episode(hover, envs.reset_done(done, o))
        assert not term and not success and len(rel_hover) == 40
    finally:
        envs.close()
    assert sum(rel_success) == pytest.approx(1.0, abs=1e-5)  # normalized dense reward at success
    assert 0.3 < sum(rel_hover) < 0.8
    dense_success, dense_hover = np.cumsum(rel_success).tolist(), np.cumsum(rel_hover).tolist()
    assert start_return(dense_hover) > 2 * start_return(dense_success)  # the trap
    assert start_return(rel_success) > start_return(rel_hover) + 0.2  # the fix


def test_sft_loss_drops_on_toy_dataset():
    policy = tiny_policy()
    o = torch.randn(256, 6)
    a = torch.tanh(o[:, :2] - 0.5 * o[:, 2:4])  # a deterministic expert
    opt = torch.optim.Adam(policy.v.parameters(), lr=1e-3)
    tau, eps = torch.rand(256, 1), torch.randn(256, 2)
    first = rc.flow_matching_loss(policy, o, a, tau, eps).item()
    for _ in range(300):
        loss = rc.flow_matching_loss(policy, o, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert rc.flow_matching_loss(policy, o, a, tau, eps).item() < 0.5 * first
    # and the deterministic flow (the rollout's time grid) now lands near the expert's actions
    err = (rc.sample_chain(policy, o, deterministic=True)[:, -1] - a).abs().mean().item()
    assert err < 0.25, err


def test_demo_chunks_hold_the_next_H_actions_and_repeat_the_last():
    o, a = np.arange(3.0)[:, None], np.array([[1.0, -1], [2, -2], [3, -3]])
    obs, chunks = rc.demo_chunks([(o, a), (o[:1], a[:1])], H=2)
    assert obs[:, 0].tolist() == [0, 1, 2, 0]
    assert chunks.tolist() == [[1, -1, 2, -2], [2, -2, 3, -3], [3, -3, 3, -3], [1, -1, 1, -1]]


def test_episode_end_inside_a_chunk_drops_the_leftover_actions():
    """Env 0 terminates at the chunk's second action, env 1 truncates at its third: neither plays (or is
    credited for) the chunk's rest; env 2 plays all four actions."""

    class Envs:
        played = []

        def step(self, a):
            self.played.append(a.clone())
            j = len(self.played)
            ends = [[j == 2, False, False], [False, j == 3, False], [j == 2, False, False]]
            term, trunc, success = torch.tensor(ends)
            return torch.full((3, 1), float(j)), torch.ones(3), term, trunc, success

    ep, alive = rc.new_episodes(3, CPU), torch.ones(3, dtype=torch.bool)
    actions = torch.arange(12.0).view(3, 4, 1)
    obs, reward, end_obs, truncated = rc.step_chunk(Envs(), actions, alive, ep)
    assert reward.tolist() == [2, 3, 4] and ep["return"].tolist() == [2, 3, 4]
    assert alive.tolist() == [False, False, True] and truncated.tolist() == [False, True, False]
    assert end_obs[:2, 0].tolist() == [2, 3] and obs[:, 0].tolist() == [4, 4, 4]
    assert ep["success_once"].tolist() == [True, False, False]
    assert len(Envs.played) == 4
    assert ep["success_at_end"].tolist() == [True, False, False]
    # the chunk's env actions are the first C of clip(a^K): (B, K+1, H*A) -> (B, C, A), in the demos' range
    policy = rc.FlowNoisePolicy(obs_dim=1, A=2, H=3, K=2, sigma_min=0.05, sigma_max=0.1, hidden_dim=8)
    chain = torch.zeros(2, 3, 6)
    chain[:, -1] = torch.tensor([0.5, 2.0, -3.0, 0.25, 0.75, 0.125])
    assert rc.chunk_actions(policy, chain, C=2)[0].tolist() == [[0.5, 1.0], [-1.0, 0.25]]
    policy.act_low.copy_(torch.tensor([0.0, -0.1]))
    policy.act_high.copy_(torch.tensor([0.2, 0.1]))
    expected = torch.tensor([[0.15, 0.1], [0.0, 0.025]])
    torch.testing.assert_close(rc.chunk_actions(policy, chain, C=2)[0], expected)
    # from_env is its inverse on demo chunks (B, H*A): the demos' range becomes [-1, 1]
    a = torch.tensor([[0.0, -0.1, 0.2, 0.1, 0.05, 0.0]])
    torch.testing.assert_close(policy.from_env(a), torch.tensor([[-1.0, -1.0, 1.0, 1.0, -0.5, 0.0]]))
    torch.testing.assert_close(policy.to_env(policy.from_env(a).view(1, 3, 2)).flatten(1), a)


def test_stage_one_maps_its_demos_range_to_minus_one_one(sim_demos, tmp_path, capsys):
    """Small demo moves (as the motion planner's) span [-1, 1] for the flow: the range of the demos Stage I
    trains on (--sim-ratio 1: sim only), per action dim, is kept in the checkpoint."""
    small = tmp_path / "small.h5"
    with h5py.File(sim_demos) as f, h5py.File(small, "w") as g:
        for key in f:
            g[f"{key}/obs"], g[f"{key}/actions"] = f[key]["obs"][()], 0.25 * f[key]["actions"][()]
    acts = np.concatenate([a for _, a in rc.load_demos(str(small), None, rc.NOMINAL_SHIFT)])
    _, run = _run(capsys, "--mode", "sft-cotrain", "--sim-ratio", "1", "--demo-path", str(small))
    policy = torch.load(run / "sft.pt", weights_only=False)["policy"]
    np.testing.assert_allclose(policy["act_low"].numpy(), acts.min(0))
    np.testing.assert_allclose(policy["act_high"].numpy(), acts.max(0))
    assert (acts.max(0) - acts.min(0)).max() <= 0.5 + 1e-6


def test_parse_shift_and_bad_items():
    s = rc.parse_shift("action_scale=0.5, action_delay=2")
    assert s == {**rc.NOMINAL_SHIFT, "action_scale": 0.5, "action_delay": 2}
    assert rc.parse_shift("") == rc.NOMINAL_SHIFT
    for bad in ["gravity=2", "action_scale", "cube_mass=-1", "action_delay=x"]:
        with pytest.raises(SystemExit, match="^error: "):
            rc.parse_shift(bad)


@pytest.mark.parametrize("vector_env", ["gymnasium", "maniskill"])
def test_shift_rules_are_the_same_on_both_paths(vector_env):
    """One set of rules: mass and friction of the cube only (set when the scene is built, as physx_cuda
    needs), actions delayed and scaled; same seed, same layout; the other env in the process is untouched."""
    args = rc.Args(max_episode_steps=50, sim_backend="physx_cpu", vector_env=vector_env)
    shift = rc.parse_shift("action_scale=0.5,action_delay=1,cube_mass=2.0,cube_friction=0.5")
    nominal = rc.VecEnv(args, 1, dict(rc.NOMINAL_SHIFT), CPU, evaluation=False)
    shifted = rc.VecEnv(args, 1, shift, CPU, evaluation=False)

    def cube(envs):
        base = envs.envs.base_env if vector_env == "maniskill" else envs.envs.envs[0].unwrapped
        return base.cube._bodies[0], base.table_scene.table._bodies[0]

    try:
        o_n, o_s = nominal.reset([123]), shifted.reset([123])
        torch.testing.assert_close(o_n, o_s, rtol=0, atol=0)  # same layout, robot state and goal
        (bn, table_n), (bs, table_s) = cube(nominal), cube(shifted)
        assert bs.mass == pytest.approx(2.0 * bn.mass)
        mn, ms = bn.collision_shapes[0].physical_material, bs.collision_shapes[0].physical_material
        assert ms.static_friction == pytest.approx(0.5 * mn.static_friction)
        assert ms.dynamic_friction == pytest.approx(0.5 * mn.dynamic_friction)
        assert ms.restitution == mn.restitution
        # the cube shares its scene's default material with the table, floor and robot: they keep theirs
        assert table_n.collision_shapes[0].physical_material is mn
        default = table_s.collision_shapes[0].physical_material
        assert default is not ms and default.static_friction == mn.static_friction == pytest.approx(0.3)
        # dynamics: the first action is delayed (the robot holds still), later ones act with gain 0.5
        a = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
        tcp0 = o_n[0, 19].item()
        x_n, x_s = nominal.step(a)[0][0, 19].item(), shifted.step(a)[0][0, 19].item()
        assert abs(x_s - tcp0) < 0.25 * abs(x_n - tcp0)
        # back to nominal: the scene is rebuilt with the nominal mass and material, the layout unchanged
        shifted.set_shift(dict(rc.NOMINAL_SHIFT))
        torch.testing.assert_close(shifted.reset([123]), o_n, rtol=0, atol=0)
        (bs, table_s) = cube(shifted)
        assert bs.mass == pytest.approx(bn.mass)
        assert bs.collision_shapes[0].physical_material is table_s.collision_shapes[0].physical_material
    finally:
        nominal.close()
        shifted.close()


def _run(capsys, *argv) -> tuple[str, Path]:
    rc.main(tyro.cli(rc.Args, args=[*TINY, *argv]))
    out = capsys.readouterr().out
    return out, Path(re.search(r"^run (\S+) \|", out, re.M)[1])


@pytest.mark.parametrize(
    "env_id, domains",
    [("PushCube-v1", ("sim", "real", "eval_shift")), ("StackCube-v1", ("sim", "real"))],
)
def test_expert_solves_task_in_its_domains_and_real_only_runs(env_id, domains, capsys):
    # the StackCube expert is not required under eval_shift: its 3x-mass cube on cubeB rarely counts as static
    args = rc.Args(env_id=env_id, max_episode_steps=50, sim_backend="physx_cpu", vector_env="gymnasium")
    specs = {"sim": "", "real": args.real_shift, "eval_shift": args.eval_shift}
    envs = rc.VecEnv(args, 1, dict(rc.NOMINAL_SHIFT), CPU, evaluation=True)
    try:
        for domain in domains:
            envs.set_shift(rc.parse_shift(specs[domain]))
            for seed in range(3):
                o = envs.reset([seed])
                for _ in range(50):
                    o, _, _, trunc, success = envs.step(torch.as_tensor(rc.EXPERTS[env_id](o.numpy())))
                    if success.any() or trunc.any():
                        break
                assert success.all(), (domain, seed)
    finally:
        envs.close()
    # end to end: real demos from the task's expert, Stage I, evaluation (real-only needs no sim demos)
    _run(capsys, "--env-id", env_id, "--mode", "real-only", "--max-episode-steps", "50", "--exp-name", "rlco")


@pytest.fixture(scope="module")
def sim_demos(tmp_path_factory) -> Path:
    """Two nominal-domain PickCube demos in ManiSkill's h5 layout (made by the scripted expert: quicker than
    the motion planner, and the runs here only need the format)."""
    args = rc.Args(max_episode_steps=50, sim_backend="physx_cpu", vector_env="gymnasium")
    envs = rc.VecEnv(args, 1, dict(rc.NOMINAL_SHIFT), CPU, evaluation=True)
    try:
        trajs = rc.collect_demos(envs, dict(rc.NOMINAL_SHIFT), 2, seed=0, expert=rc.scripted_pick_expert)
    finally:
        envs.close()
    path = tmp_path_factory.mktemp("sim_demos") / "sim.h5"
    with h5py.File(path, "w") as f:
        for i, (obs, act) in enumerate(trajs):
            f.create_dataset(f"traj_{i}/obs", data=np.concatenate([obs, obs[-1:]]))
            f.create_dataset(f"traj_{i}/actions", data=act)
    loaded = rc.load_demos(str(path), None, rc.NOMINAL_SHIFT)
    assert [a.shape for _, a in loaded] == [a.shape for _, a in trajs]
    return path


def test_motion_planner_demos_under_the_real_shift_replay_to_success(tmp_path, capsys):
    """bench/rl_cotrain_mp_demos.py: the motion planner's plan, tracked in the real domain, is a demo whose
    actions solve the task when replayed there, and rl_cotrain trains on it with --real-demo-path."""
    sys.path.insert(0, str(Path(rc.__file__).parent / "bench"))
    import rl_cotrain_mp_demos as mp

    path = tmp_path / "real.h5"
    mp.main(mp.Args(num=1, out=str(path)))
    shift = rc.parse_shift(rc.Args.real_shift)
    [(obs, act)] = rc.load_demos(str(path), None, shift)
    args = rc.Args(max_episode_steps=len(act), sim_backend="physx_cpu", vector_env="gymnasium")
    envs = rc.VecEnv(args, 1, shift, CPU, evaluation=True)
    try:
        o = envs.reset([json.loads(path.with_suffix(".json").read_text())["episodes"][0]["episode_seed"]])
        np.testing.assert_allclose(o[0].numpy(), obs[0], atol=1e-5)
        for a in act:
            *_, success = envs.step(torch.as_tensor(a[None]))
        assert success.all()
    finally:
        envs.close()
    out, _ = _run(capsys, "--mode", "real-only", "--real-demo-path", str(path), "--real-demos", "1")
    assert f"{len(act)} real from {path}" in out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {"truncated h5": d / "truncated.h5", "not h5": d / "text.h5", "no actions": d / "no_actions.h5"}
    files["not h5"].write_text("obs,actions\n1,2\n")
    with h5py.File(files["no actions"], "w") as f:
        f.create_dataset("traj_0/obs", data=np.zeros((5, 42), np.float32))
    with h5py.File(files["truncated h5"], "w") as f:
        f.create_dataset("traj_0/obs", data=np.zeros((500, 42), np.float32))
        f.create_dataset("traj_0/actions", data=np.zeros((499, 4), np.float32))
    files["truncated h5"].write_bytes(files["truncated h5"].read_bytes()[:3000])
    files["nominal demo"] = d / "nominal.h5"  # its json records no shift: the nominal (sim) domain
    with h5py.File(files["nominal demo"], "w") as f:
        f.create_dataset("traj_0/obs", data=np.zeros((5, 42), np.float32))
        f.create_dataset("traj_0/actions", data=np.zeros((4, 4), np.float32))
    meta = {"env_info": {"env_kwargs": {"control_mode": "pd_ee_delta_pos"}}}
    (d / "nominal.json").write_text(json.dumps(meta))
    files["sac_flow ckpt"] = d / "other.pt"
    torch.save({"actor": {}, "args": {"env_id": "PickCube-v1"}, "global_step": 0}, files["sac_flow ckpt"])
    files["truncated ckpt"] = d / "truncated.pt"
    torch.save({"script": "rl_cotrain", "blob": torch.zeros(10_000)}, files["truncated ckpt"])
    files["truncated ckpt"].write_bytes(files["truncated ckpt"].read_bytes()[:2000])
    files["PushCube ckpt"] = d / "push.pt"
    torch.save({"script": "rl_cotrain", "args": {"env_id": "PushCube-v1", "seed": 1}}, files["PushCube ckpt"])
    return files


BAD_INPUTS = [
    (["--mode", "dagger"], "unknown --mode"),
    (["--real-shift", "gravity=2"], "bad shift item"),
    (["--sim-ratio", "1.5"], "--sim-ratio must be in [0, 1]"),
    (["--evaluate"], "--evaluate needs --checkpoint"),
    (["--checkpoint", "nope.pt"], "checkpoint nope.pt not found"),
    (["--env-id", "NoSuchEnv-v9"], "unknown --env-id"),
    (["--env-id", "Pendulum-v1"], "not a ManiSkill3 task"),
    (["--env-id", "PullCube-v1"], "no scripted real-domain expert for PullCube-v1"),
    (["--num-envs", "0"], "--num-envs must be >= 1"),
    (["--num-envs", "-1"], "--num-envs must be >= 1"),
    (["--denoising-steps", "0"], "--denoising-steps must be >= 1"),
    (["--denoising-steps", "-1"], "--denoising-steps must be >= 1"),
    (["--gamma", "2"], "0 < --gamma <= 1"),
    (["--sigma-min", "0.5", "--sigma-max", "0.1"], "--sigma-min <= --sigma-max"),
    (["--num-envs", "1", "--num-steps", "9", "--num-minibatches", "8"], "a minibatch needs >= 2 samples"),
    (["--vector-env", "maniskill", "--sim-backend", "physx_cpu"], "--num-envs 1 --num-eval-envs 1"),
    (["--seed", "0"], "--seed 0"),
    (["--demo-path", "missing.h5"], "missing.h5 not found"),
    (["--demo-path", "{truncated h5}"], "cannot read"),
    (["--demo-path", "{not h5}"], "cannot read"),
    (["--demo-path", "{no actions}"], "no actions"),
    (["--demo-path", "{nominal demo}", "--num-demos", "3"], "holds 1 traj_* trajectories, 3 asked"),
    (["--real-demo-path", "missing.h5"], "missing.h5 not found"),
    (["--real-demo-path", "{nominal demo}"], "holds demos of the domain {'action_scale': 1.0"),
    (["--checkpoint", "{sac_flow ckpt}"], "not an rl_cotrain.py checkpoint"),
    (["--checkpoint", "{truncated ckpt}"], "cannot read checkpoint"),
    (["--checkpoint", "{PushCube ckpt}"], "--env-id PushCube-v1"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["--sim-backend", "physx_cuda"], "needs a CUDA GPU"))


@pytest.mark.parametrize("argv, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_before_any_env_and_creates_nothing(argv, message, bad_files, monkeypatch):
    def no_env(*_, **__):
        raise AssertionError("an env was built before the input was checked")

    monkeypatch.setattr(rc, "VecEnv", no_env)
    argv = [a.format(**{k: str(v) for k, v in bad_files.items()}) for a in argv]
    before = snapshot(Path("runs"), bad_files["not h5"].parent)
    with pytest.raises(SystemExit) as e:
        rc.main(tyro.cli(rc.Args, args=argv))
    text = str(e.value)
    assert text.startswith("error: ") and message in text and "\n" not in text, text
    assert snapshot(Path("runs"), bad_files["not h5"].parent) == before


def test_bad_demo_file_via_cli_is_one_line_no_traceback(bad_files):
    result = run_script("rl_cotrain.py", "--demo-path", str(bad_files["not h5"]), timeout=120)
    assert_one_line_error(result, str(bad_files["not h5"]))


def test_same_seed_same_numbers_exact_resume_and_nan_guard(capsys, monkeypatch):
    flags = ["--mode", "rl-sim-only", "--num-demos", "2", "--num-steps", "32", "--eval-freq", "64"]
    calls = []

    def spy(envs, shift, n, seed, expert):
        trajs = collect_demos(envs, shift, n, seed, expert)
        calls.append((shift, n, seed, sum(len(o) for o, _ in trajs)))
        return trajs

    collect_demos = rc.collect_demos
    monkeypatch.setattr(rc, "collect_demos", spy)
    out, a = _run(capsys, *flags, "--total-timesteps", "128", "--exp-name", "test_rlco_a")
    # without --demo-path the sim demos are the real demos' expert in the nominal domain, on other layouts
    (real, n_real, real_seed, len_real), (sim, n_sim, sim_seed, len_sim) = calls
    assert (real, n_real, sim, n_sim) == (rc.parse_shift(rc.Args.real_shift), 2, rc.NOMINAL_SHIFT, 2)
    assert abs(sim_seed - real_seed) > 100
    assert f"({len_sim} sim from expert, {len_real} real from expert)" in out
    monkeypatch.undo()
    sa = read_scalars(a)
    assert "charts/episodic_return" in sa and "losses/policy_loss" in sa
    # a run killed after the checkpoint at step 64 (here: one that ends there), same seed: the same numbers
    _, c = _run(capsys, *flags, "--total-timesteps", "64", "--exp-name", "test_rlco_c")
    upto_64 = {tag: [(s, v) for s, v in sa[tag] if s <= 64] for tag in sa}
    assert read_scalars(c) == {tag: v for tag, v in upto_64.items() if v}
    # ... and resumed from there: the unbroken run's numbers after step 64
    resume = ["--total-timesteps", "128", "--checkpoint", f"{c}/ckpt.pt"]
    out, d = _run(capsys, *flags, *resume, "--exp-name", "test_rlco_d")
    assert f"resumed {c}/ckpt.pt at step 64" in out and f"checkpoint {d}/ckpt.pt" in out
    sd = read_scalars(d)
    assert sd and all(sd[tag] == [(s, v) for s, v in sa[tag] if s > 64] for tag in sd), (sa, sd)
    assert all(tag in sd for tag, v in sa.items() if v[-1][0] > 64)
    # a non-finite loss stops the run, names the step and the last good checkpoint, and writes none
    monkeypatch.setattr(rc, "ppo_policy_loss", lambda *_: (torch.tensor(float("nan")), torch.tensor(0.0)))
    with pytest.raises(SystemExit) as e:
        _run(capsys, *flags, *resume, "--exp-name", "test_rlco_e")
    assert str(e.value) == f"error: non-finite policy_loss at step 96; last good checkpoint: {c}/ckpt.pt"
    assert not list(Path("runs").glob("*__test_rlco_e__*/*.pt"))


def test_batched_path_on_cpu_trains_checkpoints_resumes_and_evaluates(sim_demos, capsys):
    """The GPU code path (ManiSkill's batched env in ManiSkillVectorEnv, the real shift's friction set at
    build time) on physx_cpu, with action chunks (H = 3, C = 2): Stage I on sim + real demos, PPO + beta SFT,
    checkpoint, resume, --evaluate."""
    flags = ["--sim-backend", "physx_cpu", "--vector-env", "maniskill", "--demo-path", str(sim_demos),
             "--num-steps", "16", "--num-minibatches", "4", "--action-horizon", "3",
             "--num-action-chunks", "2", "--eval-freq", "64", "--exp-name", "test_rlco_batched"]  # fmt: skip
    out, run = _run(capsys, *flags, "--total-timesteps", "128")
    assert "(physx_cpu, maniskill)" in out and "eval step 128:" in out and "ETA" in out
    out, resumed = _run(capsys, *flags, "--total-timesteps", "192", "--checkpoint", f"{run}/ckpt.pt")
    assert f"resumed {run}/ckpt.pt at step 128" in out and "eval step 192:" in out
    assert torch.load(resumed / "ckpt.pt", weights_only=False)["global_step"] == 192
    evaluate = ["--checkpoint", f"{resumed}/ckpt.pt", "--evaluate"]
    result = rc.main(tyro.cli(rc.Args, args=[*TINY, *flags, *evaluate]))
    assert json.loads((resumed / "ckpt.eval.json").read_text()) == result
    # the checkpoint's seed and a seeded a^0: --evaluate reproduces the number logged during training
    logged = read_scalars(resumed)
    for domain, key in (("sim", "eval/"), ("real", "eval_real/")):
        for metric in ("success_once", "return"):
            assert logged[key + metric][-1] == (192, pytest.approx(result[domain][metric], abs=1e-6))

"""Mutation check: plants small, plausible bugs one at a time in a temporary copy of the repo and runs
the tests that should catch each. A planted bug that no test catches (it "survives") means the suite
cannot keep the math right, so the script exits non-zero if any survives.

    python bench/mutants.py                    # every mutant, two at a time
    python bench/mutants.py --script sac_flow  # one script's mutants
    python bench/mutants.py --list             # what would be planted

Each mutant replaces one exact snippet (it must occur exactly once in the file) and names the tests to run.
"""

import argparse
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    script: str  # file name without .py
    name: str  # the bug, in words
    old: str  # exact snippet in the script
    new: str  # what replaces it
    tests: str  # pytest -k expression within tests/test_<script>.py ("" = the whole file)


MUTANTS: list[Mutant] = [
    # sac_flow
    Mutant("sac_flow", "rollout time grid (k+1)/K instead of k/K", "self.velocity(k * dt, xs[-1], e_s)", "self.velocity((k + 1) * dt, xs[-1], e_s)", "time_grid"),
    Mutant("sac_flow", "rollout adds sigma^2 eps while the log-prob scores N(mu, sigma^2)", "mu + sigma * eps[k + 1]", "mu + sigma**2 * eps[k + 1]", "sampler_draws or score_function"),
    Mutant("sac_flow", "log-prob drops log N(x_0; 0, I)", "return normal_log_prob(xs[0], 0.0, 1.0) + normal_log_prob(xs[1:], mus, sigma).sum(0)", "return normal_log_prob(xs[1:], mus, sigma).sum(0)", "log_prob_matches"),
    Mutant("sac_flow", "log-prob drops the tanh log-det", "return chain_log_prob(xs, mus, sigma) - squash(xs[-1], c, torch.zeros_like(c))[1]", "return chain_log_prob(xs, mus, sigma)", "log_prob_matches"),
    Mutant("sac_flow", "scorer uses sigma^2 as the std", "normal_log_prob(xs[1:], mus, sigma).sum(0)", "normal_log_prob(xs[1:], mus, sigma**2).sum(0)", "log_prob_matches"),
    Mutant("sac_flow", "actor loss: + min Q instead of - min Q", "return (alpha * log_pi - torch.min(q1, q2)).mean()", "return (alpha * log_pi + torch.min(q1, q2)).mean()", "loss_values"),
    Mutant("sac_flow", "soft-Q target: + alpha log pi instead of - alpha log pi", "(torch.min(q1_next, q2_next) - alpha * log_pi_next)", "(torch.min(q1_next, q2_next) + alpha * log_pi_next)", "loss_values"),
    Mutant("sac_flow", "resume does not restore the RNG states", "        set_rng_state(ckpt[\"rng\"], act_space)\n", "", "resumed"),
    Mutant("sac_flow", "no env reset after a checkpoint", "            obs, _ = envs.reset(seed=args.seed + step)  # a run resumed from here starts with this same reset\n", "", "resumed"),
    Mutant("sac_flow", "warm-up actions from an unseeded action space", "act_space.seed(args.seed)  # the warm-up's random actions", "act_space.seed()", "same_seed"),
    Mutant("sac_flow", "a resumed run starts with no replay buffer (buffer.pt not read)", '    if not training or ckpt["global_step"] == 0:\n        return ckpt, None\n', "    if True:\n        return ckpt, None\n", "resumed"),
    Mutant("sac_flow", "a resumed run restarts the update count (--policy-frequency out of step)", '    updates = ckpt["updates"] if ckpt else 0  # critic updates so far (--policy-frequency)', "    updates = 0", "resumed"),
    Mutant("sac_flow", "CrossQ: the TD target's Q(s', a') keeps its gradient", "return (q1[0], q2[0]), (q1[1].detach(), q2[1].detach())", "return (q1[0], q2[0]), (q1[1], q2[1])", "crossq"),
    Mutant("sac_flow", "--no-q-layer-norm is ignored: Q keeps its LayerNorm", "ln = nn.LayerNorm if layer_norm else lambda n: nn.Identity()", "ln = nn.LayerNorm", "resumed"),
    Mutant("sac_flow", "CrossQ: Q(s', a') from its own batch-norm pass", "q1, q2 = (q.chunk(2) for q in qf(torch.cat([s, s2]), torch.cat([a, a2])))", "q1, q2 = (torch.cat(q).chunk(2) for q in zip(qf(s, a), qf(s2, a2), strict=True))", "crossq"),
    # reinflow
    Mutant("reinflow", "sampler grid k/(K-1) while the scorer uses k/K", "policy.transition(x, k / K, K, s, sigma_min, sigma_max)", "policy.transition(x, k / max(K - 1, 1), K, s, sigma_min, sigma_max)", "sampler_draws or score_function"),
    Mutant("reinflow", "sampler adds sigma^2 eps", "x = mu + sigma * eps", "x = mu + sigma**2 * eps", "sampler_draws or score_function"),
    Mutant("reinflow", "scorer drops log N(x_0)", "logp = -0.5 * (chain[:, 0] ** 2).sum(-1) - 0.5 * D * math.log(2 * math.pi)", "logp = torch.zeros_like(chain[:, 0, 0])", "torch_distributions"),
    Mutant("reinflow", "scorer uses sigma^2 for sigma", "logp = logp + log_normal((chain[:, k + 1] - mu) / sigma, sigma)", "logp = logp + log_normal((chain[:, k + 1] - mu) / sigma**2, sigma)", "torch_distributions"),
    Mutant("reinflow", "sign of the PPO advantage", "loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()", "loss = torch.max(adv * ratio, adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()", "ppo_loss_raises"),
    Mutant("reinflow", "sign of the PPO log-ratio", "logratio = new_logp - old_logp", "logratio = old_logp - new_logp", "ppo_loss_raises"),
    Mutant("reinflow", "an env that ended mid-chunk keeps counting the chunk's later steps", "r, te, tr = r * alive, te.astype(bool) & alive, tr.astype(bool) & alive", "r, te, tr = r, te.astype(bool), tr.astype(bool)", "leftover"),
    Mutant("reinflow", "resume without the torch RNG state", 'torch.set_rng_state(ckpt["rng"]["torch"])', "pass", "exact_resume"),
    Mutant("reinflow", "resume without the reward scaler's statistics", 'scaler.mean, scaler.var, scaler.count = ckpt["reward_scaler"]', "pass", "exact_resume"),
    Mutant("reinflow", "count flags accepted one below their lowest value", "        if getattr(args, name) < low:", "        if getattr(args, name) < low - 1:", "bad_inputs"),
    Mutant("reinflow", "--save-demos episode_ends one step long per episode", "ends, returns = np.cumsum([len(o) for o in obs]), np.array(returns)", "ends, returns = np.cumsum([len(o) + 1 for o in obs]), np.array(returns)", "smoke_mujoco"),
    Mutant("reinflow", "evaluation rounds all reset with the same seeds", "        obs = reset_all(envs, seed + len(episodes))", "        obs = reset_all(envs, seed)", "evaluation_episode"),
    # flow_noise_ppo
    Mutant("flow_noise_ppo", "sampler adds sigma^2 eps instead of sigma eps", "x = mu + sigma * torch.randn_like(mu) if stochastic else mu", "x = mu + sigma**2 * torch.randn_like(mu) if stochastic else mu", "sampler_draws"),
    Mutant("flow_noise_ppo", "scorer: chain_gaussians returns sigma^2 for sigma", "return mu.view(B, K, self.H, self.A), sigma.view(B, K, self.H, self.A)", "return mu.view(B, K, self.H, self.A), sigma.view(B, K, self.H, self.A) ** 2", "sampler_draws"),
    Mutant("flow_noise_ppo", "scorer: Gaussian log-density divides by sigma^2 instead of sigma", "- 0.5 * ((x - mu) / sigma) ** 2", "- 0.5 * ((x - mu) / sigma**2) ** 2", "sampler_draws"),
    Mutant("flow_noise_ppo", "sampler time grid shifted by one step", "mu, sigma = self.step_gaussian(x, t[k].expand(x.shape[0]), o)", "mu, sigma = self.step_gaussian(x, t[k + 1].expand(x.shape[0]), o)", "sampler_draws"),
    Mutant("flow_noise_ppo", "scorer time grid shifted by one step", "t = time_grid(K, obs.device)[:K].repeat(B)", "t = time_grid(K, obs.device)[1:].repeat(B)", "sampler_draws"),
    Mutant("flow_noise_ppo", "no executed-chunk mask", "ell = terms / (K + 1) * mask", "ell = terms / (K + 1)", "executed_mask"),
    Mutant("flow_noise_ppo", "Gaussian log-density without -log sigma", "        -torch.log(torch.as_tensor(sigma, dtype=x.dtype))\n        - 0.5 * np.log(2 * np.pi)", "        - 0.5 * np.log(2 * np.pi)", "sampler_draws"),
    Mutant("flow_noise_ppo", "chain log-likelihood without log N(x_0; 0, 1)", "terms = gaussian_log_prob(chain[:, 0], 0.0, 1.0) + gaussian_log_prob(chain[:, 1:], mu, sigma).sum(1)", "terms = gaussian_log_prob(chain[:, 1:], mu, sigma).sum(1)", "chain_log_prob_matches"),
    Mutant("flow_noise_ppo", "PPO surrogate with the advantage's sign flipped", "pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef))", "pg = torch.max(adv * ratio, adv * ratio.clamp(1 - clip_coef, 1 + clip_coef))", "by_hand"),
    Mutant("flow_noise_ppo", "PPO ratio inverted", "logratio = new_logp - old_logp", "logratio = old_logp - new_logp", "by_hand"),
    Mutant("flow_noise_ppo", "training envs not reset after a checkpoint", "            checkpoint(\"ckpt.pt\", iteration)\n            obs = envs.reset(seed=args.seed + global_step)\n", "            checkpoint(\"ckpt.pt\", iteration)\n", "same_seed"),
    Mutant("flow_noise_ppo", "resume does not restore the torch RNG state", "        torch.set_rng_state(rng[\"torch\"])\n", "", "same_seed"),
    Mutant("flow_noise_ppo", "demo chunks past an episode's end wrap to its start instead of repeating the last action", "idx = np.minimum(np.arange(len(a))[:, None] + np.arange(H)[None], len(a) - 1)", "idx = (np.arange(len(a))[:, None] + np.arange(H)[None]) % len(a)", "task_token_layout"),
    Mutant("flow_noise_ppo", "evaluation rounds all reset with the same seeds", "envs.reset(seed=[seed + len(rows) + i for i in range(len(envs.task_of_env))])", "envs.reset(seed=[seed + i for i in range(len(envs.task_of_env))])", "evaluation_episode"),
    Mutant("flow_noise_ppo", "evaluation x_0 from the global torch RNG", "x = policy.sample(obs, stochastic=False, generator=gen)[0][:, -1]", "x = policy.sample(obs, stochastic=False)[0][:, -1]", "evaluation_noise"),
    # flow_sde_ppo
    Mutant("flow_sde_ppo", "Agent.sample adds std^2 eps (the scorer scores std eps)", "            x = mu + std * randn() if k in stochastic else mu", "            x = mu + std**2 * randn() if k in stochastic else mu", "sampler_and_scorer"),
    Mutant("flow_sde_ppo", "sum instead of mean over the stochastic steps (--sde-steps all)", "    logp = logp[:, :, :C].mean(1)", "    logp = logp[:, :, :C].sum(1)", "sde_steps_all"),
    Mutant("flow_sde_ppo", "std^2 for std in the scorer", "            logps.append(gaussian_log_prob(chain[rows, k + 1], mu, std))", "            logps.append(gaussian_log_prob(chain[rows, k + 1], mu, std**2))", "torch_distributions"),
    Mutant("flow_sde_ppo", "sign of the score term in the SDE drift", "        mu = x * (1 - sigma**2 * dt / (2 * t)) - v * dt * (1 + sigma**2 * (1 - t) / (2 * t))", "        mu = x * (1 + sigma**2 * dt / (2 * t)) - v * dt * (1 - sigma**2 * (1 - t) / (2 * t))", "marginals or torch_distributions"),
    Mutant("flow_sde_ppo", "update (scorer) time grid 1 - k/(K+1) instead of the sampler's 1 - k/K", "        t, rows = time_grid(K).to(o), torch.arange(o.shape[0], device=o.device)", "        t, rows = time_grid(K + 1).to(o), torch.arange(o.shape[0], device=o.device)", "ratio_is_one or sampler_and_scorer"),
    Mutant("flow_sde_ppo", "no executed-chunk mask (log-prob over all H actions)", "    logp = logp[:, :, :C].mean(1)", "    logp = logp.mean(1)", "torch_distributions"),
    Mutant("flow_sde_ppo", "sampler's velocity at t_{k+1} instead of t_k", "            v = self.v(x, t[k], o)", "            v = self.v(x, t[k + 1], o)", "sampler_and_scorer"),
    Mutant("flow_sde_ppo", "GAE bootstraps across episode ends", "        delta = rewards[t] + gamma * nxt * (1 - dones[t]) - values[t]", "        delta = rewards[t] + gamma * nxt - values[t]", "gae"),
    Mutant("flow_sde_ppo", "RNG states not restored on resume", '        restore_rng(ckpt["rng"], kstar_rng)', "        pass", "resumed_run"),
    Mutant("flow_sde_ppo", "training envs not reset after a checkpoint", "            next_obs, _ = envs.reset(seed=args.seed + global_step)  # what a resume from here does too", "            pass", "resumed_run"),
    Mutant("flow_sde_ppo", "evaluation rounds all reset with the same seeds", "envs.reset(seed=[seed + len(episodes) + i for i in range(envs.num_envs)])", "envs.reset(seed=[seed + i for i in range(envs.num_envs)])", "evaluation_episode"),
    # rl_cotrain
    Mutant("rl_cotrain", "sampler adds sigma^2 * eps", "a = mu + policy.sigma(o_n, a, tau) * torch.randn(", "a = mu + policy.sigma(o_n, a, tau) ** 2 * torch.randn(", "sampler_draws"),
    Mutant("rl_cotrain", "scorer uses sigma^2 for sigma", "return mu.view(B, K, A), policy.sigma(o_n, a_k, tau).view(B, K, A)", "return mu.view(B, K, A), (policy.sigma(o_n, a_k, tau) ** 2).view(B, K, A)", "sampler_draws"),
    Mutant("rl_cotrain", "sampler time grid (k + 1) / K", "for tau in time_grid(policy.K, o.device):", "for tau in time_grid(policy.K, o.device) + 1 / policy.K:", "sampler_draws"),
    Mutant("rl_cotrain", "scorer time grid k / (K - 1)", "tau = time_grid(K, o.device).repeat(B).unsqueeze(-1)", "tau = (time_grid(K, o.device) * K / max(K - 1, 1)).repeat(B).unsqueeze(-1)", "sampler_draws"),
    Mutant("rl_cotrain", "RL-Co loss: beta on the RL term", "return l_rl + beta * l_sft_real", "return beta * l_rl + l_sft_real", "combined_loss"),
    Mutant("rl_cotrain", "PPO ratio inverted (old - new)", "log_ratio = new_logp - old_logp", "log_ratio = old_logp - new_logp", "ppo_policy_loss"),
    Mutant("rl_cotrain", "PPO advantage sign flipped", "loss = torch.max(-adv * ratio, -adv * ratio.clamp(", "loss = torch.max(adv * ratio, adv * ratio.clamp(", "ppo_policy_loss"),
    Mutant("rl_cotrain", "GAE bootstraps through an episode end", "delta = rewards[t] + gamma * nxt * (1 - dones[t]) - values[t]", "delta = rewards[t] + gamma * nxt - values[t]", "ppo_policy_loss_and_gae"),
    Mutant("rl_cotrain", "friction shift edits the scene's shared default material", "shape.set_physical_material(type(m)(fs, fd, m.restitution))", "m.static_friction, m.dynamic_friction = fs, fd", "shift_rules"),
    Mutant("rl_cotrain", "evaluation draws a^0 from the global RNG", "chain = sample_chain(policy, o, deterministic=True, generator=generator)", "chain = sample_chain(policy, o, deterministic=True)", "batched"),
    Mutant("rl_cotrain", "resume does not restore the RNG state", "    set_rng_states(rng_at_ckpt)\n", "    pass\n", "same_seed"),
    Mutant("rl_cotrain", "relative reward carried across reset_done", "        self.prev_r[done] = 0.0\n", "", "relative_reward"),
    Mutant("rl_cotrain", "training envs on the dense reward", "self.relative = args.relative_reward and not evaluation", "self.relative = False", "relative_reward"),
    Mutant("rl_cotrain", "relative reward sign flipped", "r, self.prev_r = r - self.prev_r, r", "r, self.prev_r = self.prev_r - r, r", "relative_reward"),
    Mutant("rl_cotrain", "sim expert demos collected under the real shift", 'sim_demos = collect_demos(eval_envs, domains["sim"]', "sim_demos = collect_demos(eval_envs, real_shift", "same_seed"),
    Mutant("rl_cotrain", "token ratios: advantage not broadcast per sample", "adv = adv[:, None] if new_logp.dim() == 2 else adv", "adv = adv", "ppo_policy_loss_and_gae"),
    Mutant("rl_cotrain", "log-likelihood not averaged over the K+1 terms", "ell = logp[:, :executed] / chain.shape[1]", "ell = logp[:, :executed]", "chain_log_prob_matches"),
    Mutant("rl_cotrain", "log-likelihood over the whole chunk, not the C played actions", "ell = logp[:, :executed] / chain.shape[1]", "ell = logp / chain.shape[1]", "chain_log_prob_matches"),
    Mutant("rl_cotrain", "an env that ended mid-chunk keeps earning the chunk's later rewards", "        reward += r * alive\n", "        reward += r\n", "leftover"),
    Mutant("rl_cotrain", "env actions ignore the demos' range", "return self.act_low + (a.clamp(-1, 1) + 1) / 2 * (self.act_high - self.act_low)", "return a.clamp(-1, 1)", "leftover"),
    Mutant("rl_cotrain", "demos' range from every demo, not Stage I's", "used = [(sim_o, sim_a)] * (sim_ratio > 0) + [(real_o, real_a)] * (sim_ratio < 1)", "used = [(sim_o, sim_a)] * (sim_ratio > 0) + [(real_o, real_a)]", "demos_range"),
    Mutant("rl_cotrain", "normalised observations not clipped", "return ((o - self.obs_mean) / self.obs_std).clamp(-10, 10)", "return (o - self.obs_mean) / self.obs_std", "chain_log_prob_matches"),
    Mutant("rl_cotrain", "a demo file's domain not checked", "        if made != shift:\n", "        if False:\n", "bad_input"),
    Mutant("rl_cotrain", "--real-demo-path ignored for the expert's demos", "    if real is None:\n        real = collect_demos(", "    if True:\n        real = collect_demos(", "motion_planner"),
    # risk_pomdp
    Mutant("risk_pomdp", "emissions counted against the next hidden state", "N_O[b, h, s[:, :-1], o] += 1", "N_O[b, h, s[:, 1:], o] += 1", "hindsight"),
    Mutant("risk_pomdp", "an --out-dir that cannot be created raises instead of one error line", '        return f"--out-dir {args.out_dir!r} cannot be created ({e.strerror}); pass a writable directory"', "        raise", "out_dir or bad_input"),
    Mutant("risk_pomdp", "gamble pays 0.9 instead of 1 in a good market", "    r[0, :, 0], r[0, good, 1] = safe, 1.0", "    r[0, :, 0], r[0, good, 1] = safe, 0.9", "risk_instances"),
]


def pytest(tmp: Path, script: str, tests: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"tests/test_{script}.py"]
    return subprocess.run(cmd + (["-k", tests] if tests else []), cwd=tmp, capture_output=True, text=True)


def copy_repo(d: Path) -> Path:
    d.mkdir()
    for f in ROOT.glob("*.py"):
        shutil.copy(f, d)
    shutil.copytree(ROOT / "tests", d / "tests")
    shutil.copytree(ROOT / "bench", d / "bench")  # tools some tests run (bench/rl_cotrain_mp_demos.py)
    for f in ("make_demos.sh", "pyproject.toml"):
        shutil.copy(ROOT / f, d)
    return d


def run(m: Mutant, copies: queue.Queue) -> tuple[bool, float]:
    """Plants m in a free copy of the repo, runs its tests there; returns (killed, seconds)."""
    tmp = copies.get()
    path = tmp / f"{m.script}.py"
    original = (ROOT / f"{m.script}.py").read_text()
    path.write_text(original.replace(m.old, m.new))
    t0 = time.time()
    result = pytest(tmp, m.script, m.tests)
    path.write_text(original)
    copies.put(tmp)
    if result.returncode not in (0, 1):  # collection error, no test selected...: not a verdict on the mutant
        raise SystemExit(f"error: {m.name!r}: pytest exit {result.returncode}\n{result.stdout[-999:]}")
    return result.returncode == 1, time.time() - t0


def clean_passes(script: str, todo: list[Mutant], copies: queue.Queue) -> None:
    """A mutant counts as killed only if its tests pass on the unmutated code."""
    selections = [m.tests for m in todo if m.script == script]
    union = "" if "" in selections else " or ".join(f"({k})" for k in selections)
    tmp = copies.get()
    ok = pytest(tmp, script, union).returncode == 0
    copies.put(tmp)
    if not ok:
        raise SystemExit(f"error: tests/test_{script}.py fails on the unmutated code: fix that first")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", help="only this script's mutants (e.g. sac_flow)")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once, each in its own copy")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args()
    todo = [m for m in MUTANTS if a.script in (None, m.script)]
    if not todo:
        raise SystemExit(f"error: no mutants for --script {a.script!r}")
    if a.list:
        for m in todo:
            print(f"{m.script:15s} {m.name}")
        return
    for m in todo:
        if (n := (ROOT / f"{m.script}.py").read_text().count(m.old)) != 1:
            raise SystemExit(f"error: mutant {m.name!r}: its snippet occurs {n} times in {m.script}.py, not once")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(a.jobs) as pool:
        copies = queue.Queue()
        for j in range(a.jobs):
            copies.put(copy_repo(Path(d) / str(j)))
        list(pool.map(lambda s: clean_passes(s, todo, copies), dict.fromkeys(m.script for m in todo)))
        survived = []
        for m, (killed, sec) in zip(todo, pool.map(lambda m: run(m, copies), todo), strict=True):
            print(f"{'killed  ' if killed else 'SURVIVED'} {sec:6.1f}s  {m.script:15s} {m.name}", flush=True)
            if not killed:
                survived.append(m)
    print(f"{len(todo) - len(survived)} of {len(todo)} mutants killed, {len(survived)} survived "
          f"({(time.time() - t0) / 60:.1f} min, {a.jobs} at a time)")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()

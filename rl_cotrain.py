"""RL-Co: RL-based sim-real co-training of a flow-matching policy, at reference scale.

Paper: L. Shi, S. Chen, F. Gao et al., "Beyond Imitation: Reinforcement Learning-Based Sim-Real Co-Training
for VLA Models" (RLinf-Co), arXiv:2602.12628, 2026, Sec. III (two-stage framework). Official code: the RLinf
framework (github.com/RLinf/RLinf, example "co_training"), which runs PPO on pi0.5 with
`sft_loss_weight: 0.2` (= beta) and a Stage-I mixture of 50 real + 1499 sim trajectories. The paper's exact
Stage-I ratio alpha and any beta schedule were not readable in the indexed material; we use a constant beta
(default 0.2, as in RLinf's config) and a sample-level mixing weight --sim-ratio.

There is no real robot: "real" is the nominal ManiSkill task with shifted dynamics (--real-shift, e.g.
controller gain 0.6, one step of action delay, lower cube friction), from which only --real-demos
demonstrations are used and in which no RL happens. "Sim" is the nominal task (unlimited interaction).
Real demos come from a short closed-loop scripted expert (scripted_pick_expert, scripted_push_expert,
scripted_stack_expert) run in the shifted env; by default the sim demos come from the same expert run in
the nominal env, so the two domains differ only in dynamics, as with a digital twin. --demo-path gives
motion-planner demos from make_demos.sh instead: slow and varied, a style unlike the real demos' (the
second condition). --real-demo-path reads the real demos from a file instead (a robot's, or the motion
planner tracked under the shift by bench/rl_cotrain_mp_demos.py). Only PickCube-v1, PushCube-v1 and
StackCube-v1 have an expert here. One set of shift rules (ShiftWrapper) serves both simulator paths:
actions are delayed and scaled on ManiSkill's batched tensors, and the task objects' mass and friction are
set when the scene is built, which physx_cuda requires.

Policy pi_theta(a | o) over an action chunk a in R^{H x A} (H = --action-horizon, flattened to H*A): a K-step
flow with a learnable noise network (Flow-Noise, as in pi_RL / RLinf),
    a^0 ~ N(0, I) (--a0-zero: 0),  tau_k = k / K,  dt = 1 / K,
    a^{k+1} = a^k + v_theta(o, a^k, tau_k) dt + sigma_phi(o, a^k, tau_k) eps_k,   eps_k ~ N(0, I),
    the env plays the first C = --num-action-chunks actions of clip(a^K, -1, 1) mapped to the demos' range
    [a_lo, a_hi] (a_lo + (a + 1) / 2 (a_hi - a_lo), per action dim), then the policy re-plans;
    an episode that ends inside a chunk drops the chunk's rest. Deterministic evaluation: sigma = 0 (the ODE).
Chain log-likelihood per executed element a (h < C), averaged over its K+1 terms as in flow_noise_ppo (a^0's
term does not depend on theta, so it cancels in PPO ratios and is left out):
    l_a = 1/(K+1) sum_k log N(a^{k+1}_a; a^k + v_theta(o, a^k, tau_k) dt, sigma_phi(o, a^k, tau_k)^2)_a
Supervised flow-matching loss on demo chunks (a = the demo's next H actions, the last repeated past its end,
scaled to [-1, 1] by the range of Stage I's demos; o), with tau ~ U(0, 1), eps ~ N(0, I):
    a_tau = (1 - tau) eps + tau a,    L_SFT = E || v_theta(o, a_tau, tau) - (a - eps) ||^2
Stage I (all modes):  min_theta  L_SFT on D_mix, D_mix = sim-ratio * D_sim + (1 - sim-ratio) * D_real
    (real-only: sim-ratio = 0).
Stage II (rl-co, rl-sim-only), PPO in sim on chunk decisions (reward: the sum of the C played rewards; gamma
and lambda per decision) with one ratio per executed element, r_a = exp(l_a - l_a^old) (--logprob-type token;
chunk: one ratio r = exp(sum_a (l_a - l_a^old)) per decision):
    L_RL = -E_a min(r_a A, clip(r_a, 1 - eps_c, 1 + eps_c) A) + c_v E (V(o_n) - R)^2,  A by GAE(gamma, lambda)
(o_n: the observation normalised by the demos' statistics, as the policy and flow_noise_ppo's critic see it)
    L    = L_RL(sim) + beta * L_SFT(real)          (rl-sim-only: beta = 0)
on the reward r'_t = d_t - d_{t-1} (d: ManiSkill's normalized dense reward, d_{-1} = 0; RLinf's
relative reward, --relative-reward), whose episode sum is the last step's d: 1 at success, where the
episode terminates and its return is cut. On d itself a cut return values success (d = 1 once) below
hovering near the goal (d ~ 0.55 per step 3 cm above it, to the time limit): the trap sac_flow escapes
by bootstrapping through success. PPO recipe from flow_noise_ppo (where it raised PickCube success):
sigma in [0.02, 0.04], lr 1e-5, 10k env steps per update in 10 minibatches, per-dim ratios.

Modes: real-only (Stage I on real), sft-cotrain (Stage I on the mixture), rl-co (Stage I + II),
rl-sim-only (Stage I + II without the real anchor).
"""

import json
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal, NoReturn

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

MODES = ("real-only", "sft-cotrain", "rl-co", "rl-sim-only")
# shift key -> nominal value; "real" and --eval-shift override some of them
NOMINAL_SHIFT = dict(action_scale=1.0, action_delay=0, cube_mass=1.0, cube_friction=1.0)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int | None = None
    """1 for a new run; with --checkpoint, the checkpoint's seed"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda is used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb's project name"""
    save_model: bool = True
    """whether to write runs/{run_name}/sft.pt (after Stage I) and ckpt.pt (at every evaluation)"""
    checkpoint: str | None = None
    """a ckpt.pt or sft.pt of this script to resume training from (or to evaluate with --evaluate)"""
    evaluate: bool = False
    """only evaluate --checkpoint in sim, real and --eval-shift, then exit"""

    # Environment
    env_id: str = "PickCube-v1"
    """the ManiSkill task id (PickCube-v1, PushCube-v1 or StackCube-v1: the tasks with a scripted expert)"""
    relative_reward: bool = True
    """Stage II trains on r_t - r_{t-1} (r_{-1} = 0) of the normalized dense reward, RLinf's use_rel_reward:
    its episode sum is the last step's reward (1 at success): hovering near success earns 0 (--no-...: r_t)"""
    max_episode_steps: int = 100
    """episode length (motion-planned PickCube demos are 49-99 steps)"""
    num_envs: int = 2
    """parallel sim environments of Stage II"""
    num_eval_envs: int = 2
    """parallel environments for evaluation and the real demos"""
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = "auto"
    """auto: physx_cuda when --cuda and a GPU exist, else physx_cpu"""
    vector_env: Literal["auto", "gymnasium", "maniskill"] = "auto"
    """gymnasium: one simulator per process in gymnasium's AsyncVectorEnv (CPU); maniskill: ManiSkill's
    batched env in ManiSkillVectorEnv, the GPU path (on physx_cpu it needs --num-envs 1 and is how the tests
    run the GPU code); auto: maniskill on physx_cuda, gymnasium otherwise"""
    eval_freq: int = 20_000
    """evaluate (and checkpoint) every eval_freq env steps of Stage II, rounded to whole iterations"""
    eval_episodes: int = 20
    """episodes per domain per evaluation (fixed layouts, the same for every mode)"""

    # RL-Co domains
    mode: str = "rl-co"
    """one of real-only, sft-cotrain, rl-co, rl-sim-only"""
    real_shift: str = "action_scale=0.6,action_delay=1,cube_friction=0.3"
    """the "real" domain: comma-separated key=value over action_scale, action_delay, cube_mass, cube_friction
    (mass and friction are multipliers of the nominal values)"""
    eval_shift: str = "action_scale=0.45,action_delay=2,cube_mass=3.0,cube_friction=0.3"
    """an unseen variation, evaluated besides sim and real ("" to skip)"""
    real_demos: int = 20
    """number of demos from the "real" domain (scripted closed-loop expert; the only real data used)"""
    sim_ratio: float = 0.5
    """Stage I: fraction of each SFT batch drawn from sim demos (the rest from real demos)"""
    aux_coef: float = 0.2
    """beta: weight of the real-data SFT loss during Stage II (RLinf default 0.2)"""

    # Flow policy
    denoising_steps: int = 4
    """K, flow integration steps"""
    hidden_dim: int = 256
    """width of the velocity network and the critic (3 hidden layers each)"""
    sigma_min: float = 0.02
    """lower bound of the learned per-step noise std"""
    sigma_max: float = 0.04
    """upper bound of the learned per-step noise std"""
    a0_zero: bool = False
    """start every chain at a^0 = 0 instead of a^0 ~ N(0, I), in training and evaluation: the chain's only
    randomness is then sigma_phi's noise, which PPO's ratios credit (a^0 is not in them, yet on PickCube it
    decides more outcomes than sigma_phi does: bench/rl_cotrain_outcome_spread.py). Like --sigma-min, not read
    from a checkpoint: pass it again to resume or evaluate one trained with it"""
    action_horizon: int = 1
    """H: actions predicted per chunk"""
    num_action_chunks: int = 1
    """C: actions of the chunk executed before re-planning (C <= H)"""
    logprob_type: Literal["token", "chunk"] = "token"
    """PPO ratio per executed action element or per chunk (the sum over them), as in flow_noise_ppo"""

    # Sim demos and Stage I (SFT)
    demo_path: str | None = None
    """h5 of sim demos made by make_demos.sh (motion planner, state obs, pd_ee_delta_pos); none: the real
    demos' scripted expert run in sim (one demo style, the domains differ only in dynamics)"""
    num_demos: int | None = None
    """sim demos: the first N trajectories of --demo-path (default: all) or N expert episodes (default 100)"""
    real_demo_path: str | None = None
    """h5 of real demos made under --real-shift by bench/rl_cotrain_mp_demos.py (the motion planner tracked
    in the shifted dynamics; with its nominal demos as --demo-path: one style in both domains); none: the
    scripted expert"""
    sft_steps: int = 4000
    """Stage I gradient steps"""
    sft_batch_size: int = 256
    """batch size of the flow-matching loss (Stage I and the Stage II anchor)"""
    sft_lr: float = 1e-3
    """Stage I learning rate"""

    # PPO (Stage II)
    learning_rate: float = 1e-5
    """Stage II actor (velocity + noise network) learning rate"""
    critic_learning_rate: float = 1e-3
    """critic learning rate"""
    critic_warmup_iters: int = 1
    """first Stage II iterations update only the critic (the BC policy's value is unknown)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 10
    """the number of mini-batches"""
    update_epochs: int = 4
    """the K epochs to update the policy"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    vf_coef: float = 0.5
    """coefficient of the value function"""
    max_grad_norm: float = 0.5
    """the maximum norm for the gradient clipping"""
    target_kl: float = 0.1
    """stop the epoch loop when the approximate KL exceeds this"""
    total_timesteps: int = 200_000
    """Stage II environment steps in sim"""
    num_steps: int = 5000
    """chunk decisions per env per rollout (num_steps * C env steps)"""

    # filled at runtime
    batch_size: int = 0
    """chunk decisions per update, num_envs * num_steps (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of Stage II iterations (computed in runtime)"""


# ---------------------------------------------------------------- ALGO LOGIC: the method (pure functions)
def time_grid(K: int, device=None) -> torch.Tensor:
    """tau_k = k / K, k = 0..K-1: the times of the K Euler steps (also those the SFT loss trains)."""
    return torch.arange(K, device=device) / K


@torch.no_grad()
def sample_chain(policy, o, deterministic=False, generator=None) -> torch.Tensor:
    """The chain a^{0:K}, shape (B, K+1, A), drawn step by step; the action is clip(a^K, -1, 1).
    deterministic: sigma = 0 (the flow ODE, evaluation); a^0 still from N(0, I) (0 if policy.a0_zero)."""
    o_n, dt = policy.norm(o), 1.0 / policy.K
    a = torch.randn(o.shape[0], policy.act_dim, device=o.device, generator=generator)
    a = a * 0 if policy.a0_zero else a
    chain = [a]
    for tau in time_grid(policy.K, o.device):
        tau = tau.expand(o.shape[0], 1)
        mu = a + policy.velocity(o_n, a, tau) * dt
        if deterministic:
            a = mu
        else:
            a = mu + policy.sigma(o_n, a, tau) * torch.randn(mu.shape, device=o.device, generator=generator)
        chain.append(a)
    return torch.stack(chain, 1)


def chain_gaussians(policy, o, chain) -> tuple[torch.Tensor, torch.Tensor]:
    """mu_k = a^k + v(o, a^k, tau_k) dt and sigma_k of every step of stored chains, (B, K, A) each."""
    B, K1, A = chain.shape
    K = K1 - 1
    o_n = policy.norm(o).unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
    a_k = chain[:, :-1].reshape(B * K, A)
    tau = time_grid(K, o.device).repeat(B).unsqueeze(-1)
    mu = a_k + policy.velocity(o_n, a_k, tau) * (1.0 / K)
    return mu.view(B, K, A), policy.sigma(o_n, a_k, tau).view(B, K, A)


def chain_log_prob(policy, o, chain, logprob_type: str, executed: int) -> torch.Tensor:
    """flow_noise_ppo's log-likelihoods of stored chains over their first `executed` elements (the C played
    actions of the flattened chunk, C * A), each averaged over the chain's K + 1 terms (a^0's term cancels in
    ratios unless learned). token: l_a = 1/(K+1) sum_k log N(a^{k+1}_a; mu_k, sigma_k^2) per element,
    (B, executed); chunk: sum_a l_a, (B,)."""
    mu, sigma = chain_gaussians(policy, o, chain)
    logp = torch.distributions.Normal(mu, sigma).log_prob(chain[:, 1:]).sum(1)
    ell = logp[:, :executed] / chain.shape[1]
    return ell if logprob_type == "token" else ell.sum(-1)


def flow_matching_loss(policy, o, a, tau=None, eps=None) -> torch.Tensor:
    """L_SFT = E || v(o, (1 - tau) eps + tau a, tau) - (a - eps) ||^2."""
    tau = torch.rand(a.shape[0], 1, device=a.device) if tau is None else tau
    eps = torch.randn_like(a) if eps is None else eps
    a_tau = (1 - tau) * eps + tau * a
    return ((policy.velocity(policy.norm(o), a_tau, tau) - (a - eps)) ** 2).sum(-1).mean()


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate -E min(r A, clip(r) A) and the approximate KL E[(r - 1) - log r]; token log-probs
    (B, A) give one ratio per action dim, sharing their sample's A."""
    adv = adv[:, None] if new_logp.dim() == 2 else adv
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, approx_kl


def rl_co_loss(l_rl: torch.Tensor, l_sft_real: torch.Tensor, beta: float) -> torch.Tensor:
    """L = L_RL(sim) + beta * L_SFT(real)."""
    return l_rl + beta * l_sft_real


def gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """GAE over (T, N) steps; dones[t] = the episode ended at step t (no bootstrap from t + 1; a truncation's
    bootstrap is folded into rewards[t] beforehand). Returns (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nxt * (1 - dones[t]) - values[t]
        last = delta + gamma * gae_lambda * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


# ---------------------------------------------------------------- networks
def mlp(i: int, o: int, h: int = 256, n: int = 3) -> nn.Sequential:
    layers, d = [], i
    for _ in range(n):
        layers += [nn.Linear(d, h), nn.SiLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, o))


class FlowNoisePolicy(nn.Module):
    """v_theta(o, a, tau) and sigma_phi(o, a, tau) over chunks of H actions in R^A, flattened to H * A;
    observations normalised and actions scaled with fixed statistics of Stage I's demos."""

    def __init__(self, obs_dim, A, H, K, sigma_min, sigma_max, hidden_dim=256, a0_zero=False):
        super().__init__()
        self.K, self.act_dim, self.sigma_min, self.sigma_max = K, H * A, sigma_min, sigma_max
        self.a0_zero = a0_zero
        self.v = mlp(obs_dim + H * A + 1, H * A, hidden_dim)
        self.noise = mlp(obs_dim + H * A + 1, H * A, h=64, n=2)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        # the demos' action range: motion-planned moves span little of [-1, 1], and sigma is in a's units
        self.register_buffer("act_low", -torch.ones(A))
        self.register_buffer("act_high", torch.ones(A))

    def norm(self, o):  # clipped as in flow_noise_ppo: features the demos hold constant vary on-policy
        return ((o - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def to_env(self, a):  # (..., A) in [-1, 1] -> [act_low, act_high]
        return self.act_low + (a.clamp(-1, 1) + 1) / 2 * (self.act_high - self.act_low)

    def from_env(self, a):  # the inverse, for demo actions (B, H * A)
        a = a.unflatten(-1, (-1, len(self.act_low)))
        return (2 * (a - self.act_low) / (self.act_high - self.act_low) - 1).flatten(-2)

    def velocity(self, o_n, a, tau):
        return self.v(torch.cat([o_n, a, tau], -1))

    def sigma(self, o_n, a, tau):
        s = torch.sigmoid(self.noise(torch.cat([o_n, a, tau], -1)))
        return self.sigma_min + (self.sigma_max - self.sigma_min) * s


# ---------------------------------------------------------------- plumbing: checks, domains, envs
def fail(msg: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 1, not a traceback."""
    raise SystemExit(f"error: {msg}")


def is_maniskill(env_id: str) -> bool:
    """True for a ManiSkill3 id, False for a gymnasium one; fail() for an id neither knows."""
    if env_id not in gym.registry:  # ManiSkill registers its ids on import, which takes seconds
        import mani_skill.envs  # noqa: F401
    if env_id not in gym.registry:
        fail(f"unknown --env-id {env_id!r}: give a gymnasium id (Hopper-v5) or a ManiSkill3 id (PickCube-v1)")
    entry = gym.registry[env_id].entry_point
    entry = getattr(entry, "func", entry)  # ManiSkill registers functools.partial(make, ...)
    return (entry if isinstance(entry, str) else entry.__module__).startswith("mani_skill")


def parse_shift(spec: str) -> dict:
    """'action_scale=0.6,action_delay=1' -> full shift dict (unlisted keys nominal)."""
    shift = dict(NOMINAL_SHIFT)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in NOMINAL_SHIFT or not value:
            fail(f"bad shift item '{item}': use key=value with key in {list(NOMINAL_SHIFT)}")
        try:
            shift[key] = type(NOMINAL_SHIFT[key])(float(value))
        except ValueError:
            fail(f"shift value '{value}' for {key} is not a number")
    if shift["action_delay"] < 0 or shift["cube_mass"] <= 0 or shift["cube_friction"] < 0:
        fail(f"shift {spec!r} has a negative delay or a non-positive mass/friction")
    return shift


class ShiftWrapper(gym.Wrapper):
    """The domain shift, one set of rules for both paths (on ManiSkill's batched tensors, under CPUGymWrapper
    or ManiSkillVectorEnv): actions are delayed by action_delay steps, scaled by action_scale (controller
    gain) and clipped. The task objects' mass and friction are multiplied when the scene is built (physx_cuda
    takes them only before it starts), so a new mass/friction shift rebuilds the scene at the next full reset.
    The objects get a material of their own: the default one is shared with the table, floor and robot.
    Resets are untouched: one seed, one initial layout in every domain."""

    OBJECTS = ("cube", "obj", "cubeA", "cubeB")

    def __init__(self, env, shift: dict):
        super().__init__(env)
        base = env.unwrapped
        self.built = (1.0, 1.0)  # mass and friction multipliers of the scene gym.make built
        load_scene = base._load_scene

        def load_shifted_scene(options):  # ManiSkill builds every new scene with base._load_scene
            load_scene(options)
            self.built = (self.shift["cube_mass"], self.shift["cube_friction"])
            if self.built == (1.0, 1.0):  # the nominal scene stays exactly ManiSkill's
                return
            mass, friction = self.built
            objects = [getattr(base, name) for name in self.OBJECTS if hasattr(base, name)]
            for body in (b for obj in objects for b in obj._bodies):
                body.mass = body.mass * mass
                for shape in body.collision_shapes:
                    m = shape.physical_material
                    fs, fd = m.static_friction * friction, m.dynamic_friction * friction
                    shape.set_physical_material(type(m)(fs, fd, m.restitution))

        base._load_scene = load_shifted_scene
        self.set_shift(shift)

    def set_shift(self, shift: dict):
        self.shift = dict(shift)

    def reset(self, *, seed=None, options=None):
        base, options = self.env.unwrapped, dict(options or {})
        partial_reset = "env_idx" in options
        if (self.shift["cube_mass"], self.shift["cube_friction"]) != self.built and not partial_reset:
            options["reconfigure"] = True  # the new mass and friction take effect in a new scene
        obs, info = self.env.reset(seed=seed, options=options)
        shape = (self.shift["action_delay"], base.num_envs, base.single_action_space.shape[0])
        if partial_reset:
            self.pending[:, options["env_idx"]] = 0.0
        else:
            self.pending = torch.zeros(shape, device=base.device)
        return obs, info

    def step(self, action):
        base = self.env.unwrapped
        a = torch.as_tensor(action, dtype=torch.float32, device=base.device).reshape(base.num_envs, -1)
        queue = torch.cat([self.pending, a[None]])
        a, self.pending = queue[0], queue[1:]
        return self.env.step((a * self.shift["action_scale"]).clamp(-1.0, 1.0))


def make_maniskill(args: Args, num_envs: int, shift: dict, **backend):
    """The task under a domain shift: num_envs scenes of ManiSkill's batched env (one on physx_cpu)."""
    env = gym.make(args.env_id, num_envs=num_envs, obs_mode="state", control_mode="pd_ee_delta_pos",
                   reward_mode="normalized_dense", max_episode_steps=args.max_episode_steps,
                   enhanced_determinism=True, **backend)  # fmt: skip
    return ShiftWrapper(env, shift)


def cpu_env(args: Args, shift: dict, evaluation: bool):
    import mani_skill.envs  # noqa: F401  (registers the ids in the worker process)
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    env = make_maniskill(args, 1, shift, sim_backend="physx_cpu", render_backend="cpu")
    return CPUGymWrapper(env, ignore_terminations=evaluation)


class VecEnv:
    """n envs of one domain behind one torch API on either path: ManiSkill's batched env (ManiSkillVectorEnv)
    or one physx_cpu simulator per process in gymnasium's vector env. No autoreset: the caller resets the envs
    whose episode ended (reset_done). Evaluation envs ignore terminations: episodes run to the time limit, and
    their reward is the dense one (training envs: relative with --relative-reward)."""

    def __init__(self, args: Args, n: int, shift: dict, device, evaluation: bool):
        self.num_envs, self.device, self.batched = n, device, args.vector_env == "maniskill"
        self.relative = args.relative_reward and not evaluation
        self.prev_r = torch.zeros(n, device=device)  # r_{t-1} of each env, for --relative-reward
        if self.batched:
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            backend = {"render_backend": "cpu"} if args.sim_backend == "physx_cpu" else {}
            env = make_maniskill(args, n, shift, sim_backend=args.sim_backend, **backend)
            self.envs = ManiSkillVectorEnv(env, n, auto_reset=False, ignore_terminations=evaluation)
        else:
            thunks = [partial(cpu_env, args, shift, evaluation)] * n
            disabled = gym.vector.AutoresetMode.DISABLED
            if n == 1:  # no worker process to start
                self.envs = gym.vector.SyncVectorEnv(thunks, autoreset_mode=disabled)
            else:  # "spawn": SAPIEN does not survive fork
                self.envs = gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=disabled)
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = self.envs.single_action_space.shape[0]

    def _t(self, x, dtype=torch.float32):
        return torch.as_tensor(x).to(self.device, dtype)

    def set_shift(self, shift: dict):
        self.envs.call("set_shift", shift)

    def reset(self, seeds: list[int], rebuild=False) -> torch.Tensor:
        """rebuild: in a new scene, where a seeded episode replays exactly (PhysX keeps contact state across
        resets, so after other episodes the same seed can play out differently once objects touch)."""
        self.prev_r.zero_()
        return self._t(self.envs.reset(seed=seeds, options={"reconfigure": rebuild})[0])

    def step(self, action: torch.Tensor):
        """-> obs, reward, terminated, truncated, success (tensors on the device)."""
        obs, r, term, trunc, info = self.envs.step(action if self.batched else action.cpu().numpy())
        flags = (self._t(x, torch.bool) for x in (term, trunc, info["success"]))
        r = self._t(r)
        if self.relative:
            r, self.prev_r = r - self.prev_r, r
        return self._t(obs), r, *flags

    def reset_done(self, done: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        if not done.any():
            return obs
        self.prev_r[done] = 0.0
        if self.batched:
            new = self.envs.reset(options={"env_idx": done.nonzero()[:, 0]})[0]
        else:
            new = self.envs.reset(options={"reset_mask": done.cpu().numpy()})[0]
        return torch.where(done[:, None], self._t(new), obs)

    def close(self):
        self.envs.close()


def new_episodes(n, device) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(n, dtype=torch.bool, device=device)
    return {"return": torch.zeros(n, device=device), "success_once": zeros, "success_at_end": zeros.clone()}


def step_chunk(envs: VecEnv, actions, alive, ep):
    """Plays the C env actions (N, C, A) of a chunk. An env whose episode ends inside the chunk (or had ended:
    alive False) ignores the rest of it: leftover actions played in its next episode would start that
    episode off the demos' distribution. Updates alive and the episode stats ep in place; returns the obs,
    the chunk's reward (N,), the obs at which each episode ended, and which ended by truncation."""
    reward = torch.zeros_like(ep["return"])
    truncated = torch.zeros_like(alive)
    end_obs = None
    for j in range(actions.shape[1]):
        obs, r, term, trunc, success = envs.step(actions[:, j])
        reward += r * alive
        ep["return"] += r * alive
        ep["success_once"] |= success & alive
        end = alive & (term | trunc)
        ep["success_at_end"][end] = success[end]
        truncated |= end & trunc & ~term
        end_obs = obs if end_obs is None else torch.where(end[:, None], obs, end_obs)
        alive &= ~end
    return obs, reward, end_obs, truncated


# ---------------------------------------------------------------- plumbing: scripted experts and demos
def hover(tcp: np.ndarray, point: np.ndarray, tol: float = 0.01) -> np.ndarray:
    """Target 5 cm above point until the tcp is within tol of it in xy, then point itself (descend last)."""
    xy_far = np.linalg.norm(tcp[:, :2] - point[:, :2], axis=1) > tol
    return np.where(xy_far[:, None], point + [0.0, 0.0, 0.05], point)


def grasp_and_carry(tcp, cube, grasped, carry_target, gain: float = 2.0) -> np.ndarray:
    """Shared by the pick and stack experts: hover above the cube, descend, close the gripper, then move the
    grasped cube's tcp to carry_target. Action gain: a move of 0.1 m / gain is action 1."""
    at_cube = np.linalg.norm(tcp - cube, axis=1) < 0.012
    target = np.where(grasped[:, None], carry_target, hover(tcp, cube))
    delta = np.clip((target - tcp) / 0.1 * gain, -1.0, 1.0)
    delta = np.where(at_cube[:, None] & ~grasped[:, None], 0.0, delta)
    gripper = np.where((at_cube | grasped)[:, None], -1.0, 1.0)
    return np.concatenate([delta, gripper], axis=1).astype(np.float32)


def scripted_pick_expert(obs: np.ndarray) -> np.ndarray:
    """Closed-loop PickCube expert on pd_ee_delta_pos, from the state observation (batch, 42):
    is_grasped [18], tcp position [19:22], goal [26:29], cube position [29:32].
    Hover above the cube, descend, close the gripper, carry the cube to the goal."""
    grasped, tcp, goal, cube = obs[:, 18] > 0.5, obs[:, 19:22], obs[:, 26:29], obs[:, 29:32]
    return grasp_and_carry(tcp, cube, grasped, goal)


def scripted_stack_expert(obs: np.ndarray) -> np.ndarray:
    """Closed-loop StackCube expert on pd_ee_delta_pos, from the state observation (batch, 48):
    finger joints [7:9], tcp position [18:21], cubeA position [25:28], cubeB position [32:35] (4 cm cubes).
    Grasp cubeA as the pick expert does, carry it above cubeB, lower it on top, open the gripper."""
    fingers, tcp, cube_a, cube_b = obs[:, 7:9].sum(1), obs[:, 18:21], obs[:, 25:28], obs[:, 32:35]
    # no is_grasped in this obs: fingers closed to less than the cube's diagonal (5.7 cm) and the tcp at cubeA
    grasped = (fingers < 0.058) & (np.linalg.norm(tcp - cube_a, axis=1) < 0.02)
    offset = cube_a - cube_b
    on_b = (np.linalg.norm(offset[:, :2], axis=1) < 0.01) & (offset[:, 2] < 0.045)
    action = grasp_and_carry(tcp, cube_a, grasped, hover(tcp, cube_b + [0.0, 0.0, 0.04]), gain=1.0)
    # resting on cubeB: let go, then rise once the fingers have opened (a weak gripper may not clear the cube)
    action[on_b] = [0.0, 0.0, 0.0, 1.0]
    action[on_b & (fingers > 0.048), 2] = 0.5
    return action


def scripted_push_expert(obs: np.ndarray) -> np.ndarray:
    """Closed-loop PushCube expert on pd_ee_delta_pos, from the state observation (batch, 35):
    tcp position [18:21], goal [25:28], cube position [28:31]; the goal is +x of the cube.
    Hover behind the cube (-x), descend to the table, push along +x until the cube centre reaches the goal."""
    tcp, goal, cube = obs[:, 18:21], obs[:, 25:28], obs[:, 28:31]
    behind = cube * [1, 1, 0] + [-0.05, 0.0, 0.02]
    aligned = (np.abs(tcp[:, 1] - cube[:, 1]) < 0.015) & (tcp[:, 0] < cube[:, 0] - 0.02) & (tcp[:, 2] < 0.035)
    near = np.linalg.norm(tcp[:, :2] - behind[:, :2], axis=1) < 0.015
    push = np.stack([goal[:, 0] - 0.03, cube[:, 1], np.full(len(obs), 0.02)], 1)
    target = np.where(aligned[:, None], push, np.where(near[:, None], behind, behind + [0, 0, 0.06]))
    delta = np.clip((target - tcp) / 0.1, -1.0, 1.0)  # gain 1: a move of 0.1 m is action 1 (no overshoot)
    return np.concatenate([delta, -np.ones((len(obs), 1))], 1).astype(np.float32)  # gripper closed


EXPERTS = {"PickCube-v1": scripted_pick_expert, "PushCube-v1": scripted_push_expert,
           "StackCube-v1": scripted_stack_expert}  # fmt: skip


def load_demos(path: str, num_demos: int | None, shift: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """ManiSkill h5 (traj_i/obs (L+1, d), traj_i/actions (L, A)) -> (obs (L, d), actions (L, A)) per demo,
    of the domain shift (a json beside the h5 without "shift": nominal, as make_demos.sh writes it)."""
    import h5py

    if not os.path.exists(path):
        fail(f"demo file {path} not found: make it with make_demos.sh or bench/rl_cotrain_mp_demos.py")
    meta_path = path[: -len(".h5")] + ".json"
    if path.endswith(".h5") and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        mode = meta["env_info"]["env_kwargs"].get("control_mode")
        if mode != "pd_ee_delta_pos":
            fail(f"{path} has control_mode {mode}, need pd_ee_delta_pos (make_demos.sh arg 3)")
        made = meta.get("shift", NOMINAL_SHIFT)
        if made != shift:
            fail(f"{path} holds demos of the domain {made}, not {shift}: pass the demos of this domain")
    trajs = []
    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in f if k.startswith("traj_")]
            first = set(sorted(keys, key=lambda k: int(k[len("traj_") :]))[:num_demos])
            for key in (k for k in keys if k in first):  # in the file's order
                if "obs" not in f[key] or "actions" not in f[key]:
                    fail(f"{path}:{key} has no obs or no actions: pass demos made by make_demos.sh")
                o, a = f[key]["obs"][()], f[key]["actions"][()]
                if o.ndim != 2 or a.ndim != 2 or len(a) != len(o) - 1:
                    fail(f"{path}:{key} has obs {o.shape} / actions {a.shape}, need (L+1, d) / (L, A)")
                trajs.append((o[:-1].astype(np.float32), a.astype(np.float32)))
    except OSError as e:
        fail(f"cannot read {path} as h5 ({str(e).splitlines()[0][:60]}): pass one made by make_demos.sh")
    if len(trajs) < (num_demos or 1):
        fail(f"{path} holds {len(trajs)} traj_* trajectories, {num_demos or 1} asked: make more")
    return trajs


def collect_demos(envs: VecEnv, shift: dict, n: int, seed: int, expert) -> list:
    """Runs the expert in the eval envs under shift, on the layouts of seeds seed, seed + 1, ...; keeps each
    successful episode up to its first success, as (obs (L, d), actions (L, A))."""
    envs.set_shift(shift)
    trajs, tried = [], 0
    while len(trajs) < n and tried < 4 * n + 8:
        o = envs.reset([seed + tried + i for i in range(envs.num_envs)]).cpu().numpy()
        tried += envs.num_envs
        obs_steps, act_steps = [], []
        done = np.zeros(envs.num_envs, bool)
        while not done.all():
            obs_steps.append(o)
            act_steps.append(expert(o))
            step = envs.step(torch.as_tensor(act_steps[-1], device=envs.device))
            o, _, _, trunc, success = (x.cpu().numpy() for x in step)
            for i in np.where(~done & success)[0][: n - len(trajs)]:
                trajs.append((np.stack(obs_steps)[:, i].astype(np.float32), np.stack(act_steps)[:, i]))
            done |= success | trunc
    if len(trajs) < n:
        fail(f"the scripted expert solved only {len(trajs)} of {tried} episodes under {shift}: ask fewer")
    return trajs


def demo_chunks(trajs, H: int) -> tuple[np.ndarray, np.ndarray]:
    """-> obs (N, d), action chunks (N, H * A): each step's next H actions, the last repeated past the end."""
    obs, chunks = [], []
    for o, a in trajs:
        idx = np.minimum(np.arange(len(a))[:, None] + np.arange(H)[None], len(a) - 1)
        obs.append(o)
        chunks.append(a[idx].reshape(len(a), -1))
    return np.concatenate(obs), np.concatenate(chunks)


# ---------------------------------------------------------------- plumbing: evaluation and checkpoints
def chunk_actions(policy, chain, C: int) -> torch.Tensor:
    """The env actions of chains (B, K+1, H*A): the first C actions of clip(a^K, -1, 1) in the demos' range,
    (B, C, A)."""
    return policy.to_env(chain[:, -1].unflatten(-1, (-1, len(policy.act_low)))[:, :C])


@torch.no_grad()
def evaluate(policy, envs: VecEnv, domains: dict, n: int, seed: int, C: int) -> dict:
    """Noise-free policy in each domain on the layouts of seeds seed..seed+n-1, full episodes. a^0 comes from
    a generator seeded with seed: a checkpoint gets the same numbers during training and with --evaluate."""
    results = {}
    for domain, shift in domains.items():
        envs.set_shift(shift)
        generator = torch.Generator(envs.device).manual_seed(seed)
        stats = {"return": [], "success_once": [], "success_at_end": []}
        for start in range(0, n, envs.num_envs):
            o = envs.reset([seed + start + i for i in range(envs.num_envs)], rebuild=start == 0)
            ep = new_episodes(envs.num_envs, envs.device)
            alive = torch.ones(envs.num_envs, dtype=torch.bool, device=envs.device)
            while alive.any():
                chain = sample_chain(policy, o, deterministic=True, generator=generator)
                o = step_chunk(envs, chunk_actions(policy, chain, C), alive, ep)[0]
            for k, v in ep.items():
                stats[k] += v[: n - start].tolist()
        results[domain] = {k: float(np.mean(v)) for k, v in stats.items()}
    return results


def rng_states() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), random=random.getstate())


def set_rng_states(states: dict):
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])


def load_checkpoint(path: str, env_id: str) -> dict:
    if not os.path.exists(path):
        fail(f"checkpoint {path} not found: pass a ckpt.pt or sft.pt written by rl_cotrain.py")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}): pass a ckpt.pt or sft.pt of rl_cotrain.py")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "rl_cotrain":
        fail(f"{path} is not an rl_cotrain.py checkpoint: pass a ckpt.pt or sft.pt written by this script")
    if ckpt["args"]["env_id"] != env_id:
        fail(f"{path} was trained on {ckpt['args']['env_id']}: pass --env-id {ckpt['args']['env_id']}")
    return ckpt


def check_args(args: Args) -> dict | None:
    """Every check that needs no env, before anything slow; fills in the seed, backend and batch sizes.
    Returns the checkpoint (or None)."""
    if args.mode not in MODES:
        fail(f"unknown --mode {args.mode}: use one of {', '.join(MODES)}")
    positive = ("num_envs", "num_eval_envs", "eval_freq", "eval_episodes", "real_demos", "denoising_steps",
                "hidden_dim", "sft_batch_size", "num_minibatches", "update_epochs", "num_steps",
                "action_horizon", "num_action_chunks")  # fmt: skip
    for name in positive + ("num_demos",) * (args.num_demos is not None):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("total_timesteps", "sft_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1):
        fail(f"need 0 < --gamma <= 1 and 0 <= --gae-lambda <= 1, got {args.gamma} and {args.gae_lambda}")
    if args.num_action_chunks > args.action_horizon:
        fail(f"--num-action-chunks {args.num_action_chunks} > --action-horizon {args.action_horizon}: C <= H")
    if not 0 < args.sigma_min <= args.sigma_max:
        fail(f"need 0 < --sigma-min <= --sigma-max, got {args.sigma_min} and {args.sigma_max}")
    if not 0.0 <= args.sim_ratio <= 1.0 or args.aux_coef < 0:
        fail("--sim-ratio must be in [0, 1] and --aux-coef >= 0")
    parse_shift(args.real_shift)
    parse_shift(args.eval_shift)
    if args.evaluate and not args.checkpoint:
        fail("--evaluate needs --checkpoint PATH")
    ckpt = load_checkpoint(args.checkpoint, args.env_id) if args.checkpoint else None
    if args.seed is None:
        args.seed = ckpt["args"]["seed"] if ckpt else 1
    evals = range(args.seed + 10_000, args.seed + 10_000 + args.eval_episodes)
    demos = range(10_000 + 1000 * args.seed, 10_000 + 1000 * args.seed + 4 * args.real_demos + 8)
    if args.seed < 0 or (evals.start < demos.stop and demos.start < evals.stop):
        fail(f"--seed {args.seed}: evaluation would replay the real demos' layouts: use --seed >= 1")
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    steps_per_iteration = args.batch_size * args.num_action_chunks
    args.num_iterations = args.total_timesteps // steps_per_iteration if args.mode.startswith("rl-") else 0
    stage_two = args.num_iterations > (ckpt["iteration"] if ckpt else 0) and not args.evaluate
    if stage_two and args.minibatch_size < 2:
        fail(f"--num-envs x --num-steps / --num-minibatches = {args.batch_size / args.num_minibatches:g}: "
             "a minibatch needs >= 2 samples (its advantages are standardised)")  # fmt: skip

    if args.sim_backend == "auto":
        args.sim_backend = "physx_cuda" if args.cuda and torch.cuda.is_available() else "physx_cpu"
    if args.vector_env == "auto":
        args.vector_env = "maniskill" if args.sim_backend == "physx_cuda" else "gymnasium"
    if args.sim_backend == "physx_cuda" and not torch.cuda.is_available():
        fail("--sim-backend physx_cuda needs a CUDA GPU: use --sim-backend physx_cpu")
    if args.sim_backend == "physx_cuda" and args.vector_env == "gymnasium":
        fail("--vector-env gymnasium runs one physx_cpu simulator per process: use --sim-backend physx_cpu")
    one_scene = args.vector_env == "maniskill" and args.sim_backend == "physx_cpu"
    if one_scene and max(args.num_envs, args.num_eval_envs) > 1:
        fail("--vector-env maniskill on physx_cpu simulates one env: pass --num-envs 1 --num-eval-envs 1")
    if not is_maniskill(args.env_id):
        fail(f"--env-id {args.env_id} is not a ManiSkill3 task: use one of {', '.join(EXPERTS)}")
    if args.env_id not in EXPERTS and not args.evaluate:
        fail(f"no scripted real-domain expert for {args.env_id}: use one of {', '.join(EXPERTS)}")
    return ckpt


# ---------------------------------------------------------------- main
def main(args: Args):
    ckpt = check_args(args)
    real_shift = parse_shift(args.real_shift)
    domains = {"sim": dict(NOMINAL_SHIFT), "real": real_shift}
    if args.eval_shift:
        domains["eval_shift"] = parse_shift(args.eval_shift)
    sim_ratio = 0.0 if args.mode == "real-only" else args.sim_ratio
    beta = args.aux_coef if args.mode == "rl-co" else 0.0
    stage_one = sim_ratio > 0 and ckpt is None and not args.evaluate  # sim demos serve Stage I only
    sim_file, real_file = stage_one and args.demo_path, args.real_demo_path and not args.evaluate
    sim_demos = load_demos(args.demo_path, args.num_demos, NOMINAL_SHIFT) if sim_file else None
    real = load_demos(args.real_demo_path, args.real_demos, real_shift) if real_file else None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    eval_envs = VecEnv(args, args.num_eval_envs, real_shift, device, evaluation=True)
    obs_dim, A = eval_envs.obs_dim, eval_envs.act_dim
    for path, trajs in ((args.demo_path, sim_demos), (args.real_demo_path, real)):
        dims = {(o.shape[1], a.shape[1]) for o, a in trajs or []}
        if dims - {(obs_dim, A)}:
            eval_envs.close()
            fail(f"{path} has obs/action dims {'/'.join(map(str, dims.pop()))}, "
                 f"{args.env_id} {obs_dim}/{A}: pass demos made for this task")  # fmt: skip
    K, H, C = args.denoising_steps, args.action_horizon, args.num_action_chunks
    policy = FlowNoisePolicy(obs_dim, A, H, K, args.sigma_min, args.sigma_max, args.hidden_dim, args.a0_zero)
    policy = policy.to(device)
    critic = mlp(obs_dim, 1, args.hidden_dim).to(device)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate)
    nets = {"policy": policy, "critic": critic, "actor_opt": actor_opt, "critic_opt": critic_opt}
    start_iter, global_step = 0, 0
    if ckpt is not None:
        for key, fill in (("act_low", -1.0), ("act_high", 1.0)):  # checkpoints from before the demos' range
            ckpt["policy"].setdefault(key, torch.full((A,), fill))
        try:
            for name, net in nets.items():
                net.load_state_dict(ckpt[name])
        except (RuntimeError, ValueError, KeyError):
            eval_envs.close()
            fail(f"{args.checkpoint} does not fit these networks: pass its --hidden-dim, "
                 "--denoising-steps, --action-horizon")  # fmt: skip
        # this run's learning rates, not the saved run's (RL from an SFT checkpoint)
        for opt, lr in ((actor_opt, args.learning_rate), (critic_opt, args.critic_learning_rate)):
            for group in opt.param_groups:
                group["lr"] = lr
        start_iter, global_step = ckpt["iteration"], ckpt["global_step"]

    if args.evaluate:
        stats = evaluate(policy, eval_envs, domains, args.eval_episodes, args.seed + 10_000, C)
        result = {"checkpoint": args.checkpoint, "global_step": global_step, "seed": args.seed, **stats}
        eval_envs.close()
        out = args.checkpoint.removesuffix(".pt") + ".eval.json"
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
        print(json.dumps(result), flush=True)
        return result

    expert = EXPERTS[args.env_id]
    if real is None:
        real = collect_demos(eval_envs, real_shift, args.real_demos, 10_000 + 1000 * args.seed, expert)
    if stage_one and not args.demo_path:  # layouts apart from the real demos' and the evaluation's
        sim_demos = collect_demos(eval_envs, domains["sim"], args.num_demos or 100, 10**6 * args.seed, expert)
    real_o, real_a = (torch.as_tensor(x, device=device) for x in demo_chunks(real, H))
    sim_o, sim_a = (None, None)
    if sim_demos:
        sim_o, sim_a = (torch.as_tensor(x, device=device) for x in demo_chunks(sim_demos, H))
    if ckpt is None:  # the demos Stage I trains on fix o's mean and std and a's range per action dim
        used = [(sim_o, sim_a)] * (sim_ratio > 0) + [(real_o, real_a)] * (sim_ratio < 1)
        all_o, all_a = (torch.cat(x) for x in zip(*used, strict=True))
        policy.obs_mean.copy_(all_o.mean(0))
        policy.obs_std.copy_(all_o.std(0).clamp_min(1e-2))  # constant features (e.g. zero qvel) stay finite
        policy.act_low.copy_(all_a.view(-1, A).amin(0))
        policy.act_high.copy_(torch.maximum(all_a.view(-1, A).amax(0), policy.act_low + 1e-3))
    real_a, sim_a = policy.from_env(real_a), None if sim_a is None else policy.from_env(sim_a)

    from torch.utils.tensorboard import SummaryWriter

    run_name = f"{args.env_id}__{args.exp_name}__{args.mode}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/{run_name}"
    try:  # a run started the same second under the same name would overwrite this one's checkpoints
        os.makedirs(run_dir)
    except FileExistsError:
        fail(f"{run_dir} exists: a run with this --exp-name and --seed began the same second; rename it")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    n_sim = 0 if sim_o is None else len(sim_o)
    backend = f"{args.sim_backend}, {args.vector_env}"
    source, real_source = args.demo_path or "expert", args.real_demo_path or "expert"
    demos = f"{n_sim + len(real_o)} transitions"
    demos += f" ({n_sim} sim from {source}, {len(real_o)} real from {real_source})"
    print(f"run {run_dir} | env {args.env_id} ({backend}) | device {device} | demos {demos}", flush=True)
    if ckpt is not None:
        print(f"resumed {args.checkpoint} at step {global_step}", flush=True)
    last_ckpt, rng_at_ckpt = (args.checkpoint, ckpt["rng"]) if ckpt else ("none", None)

    def checkpoint(names, iteration):
        nonlocal last_ckpt, rng_at_ckpt
        rng_at_ckpt = rng_states()
        for name in names if args.save_model else ():
            last_ckpt = f"{run_dir}/{name}"
            state = {k: v.state_dict() for k, v in nets.items()}
            torch.save({"script": "rl_cotrain", **state, "args": vars(args), "global_step": global_step,
                        "iteration": iteration, "rng": rng_at_ckpt}, last_ckpt + ".tmp")  # fmt: skip
            os.replace(last_ckpt + ".tmp", last_ckpt)  # a crash never leaves a half-written checkpoint
            print(f"checkpoint {last_ckpt}", flush=True)

    def log_eval(step):
        results = evaluate(policy, eval_envs, domains, args.eval_episodes, args.seed + 10_000, C)
        for domain, res in results.items():
            for k, v in res.items():
                writer.add_scalar(f"eval/{k}" if domain == "sim" else f"eval_{domain}/{k}", v, step)
        success = " ".join(f"{d}={r['success_once']:.2f}" for d, r in results.items())
        print(f"eval step {step}: {success}", flush=True)

    def finite(loss, name):
        if not torch.isfinite(loss):
            fail(f"non-finite {name} at step {global_step}; last good checkpoint: {last_ckpt}")
        return loss

    def demo_batch(n, ratio):
        """n samples: a ratio fraction from sim demos, the rest from real demos."""
        n_sim = int(round(n * ratio))
        i_r = torch.randint(len(real_o), (n - n_sim,), device=device)
        if n_sim == 0:
            return real_o[i_r], real_a[i_r]
        i_s = torch.randint(len(sim_o), (n_sim,), device=device)
        return torch.cat([sim_o[i_s], real_o[i_r]]), torch.cat([sim_a[i_s], real_a[i_r]])

    # ---- ALGO LOGIC: Stage I, SFT warm start on the real/sim mixture ----
    if ckpt is None:
        sft_opt = torch.optim.Adam(policy.v.parameters(), lr=args.sft_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(sft_opt, max(args.sft_steps, 1))
        t0 = time.time()
        for step in range(args.sft_steps):
            loss = finite(flow_matching_loss(policy, *demo_batch(args.sft_batch_size, sim_ratio)), "sft_loss")
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            sched.step()
            if step % 500 == 0 or step == args.sft_steps - 1:
                writer.add_scalar("losses/sft_loss", loss.item(), step)
                print(f"sft step {step}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.0f}s",
                      flush=True)  # fmt: skip
        log_eval(0)
        checkpoint(["sft.pt", "ckpt.pt"], 0)
    if args.num_iterations <= start_iter:
        eval_envs.close()
        writer.close()
        return

    # ---- ALGO LOGIC: Stage II, PPO in sim + beta * SFT on real demos ----
    envs = VecEnv(args, args.num_envs, domains["sim"], device, evaluation=False)
    N, T = args.num_envs, args.num_steps
    eval_iters = max(1, round(args.eval_freq / (args.batch_size * C)))
    obs_b = torch.zeros(T, N, obs_dim, device=device)
    chain_b = torch.zeros(T, N, K + 1, H * A, device=device)
    rew_b, done_b, val_b = (torch.zeros(T, N, device=device) for _ in range(3))
    logp_b = torch.zeros((T, N, C * A) if args.logprob_type == "token" else (T, N), device=device)
    ep = new_episodes(N, device)
    # exact resume: the random state of the checkpoint, whatever building the envs drew
    set_rng_states(rng_at_ckpt)
    next_obs = envs.reset([args.seed + global_step + i for i in range(N)], rebuild=True)
    for iteration in range(start_iter + 1, args.num_iterations + 1):
        t_iter, finished = time.time(), []
        for t in range(T):
            global_step += N * C
            obs_b[t] = next_obs
            with torch.no_grad():
                chain = sample_chain(policy, next_obs)
                logp_b[t] = chain_log_prob(policy, next_obs, chain, args.logprob_type, C * A)
                val_b[t] = critic(policy.norm(next_obs)).squeeze(-1)
            chain_b[t] = chain
            alive = torch.ones(N, dtype=torch.bool, device=device)
            obs, r, end_obs, cut = step_chunk(envs, chunk_actions(policy, chain, C), alive, ep)
            if cut.any():  # a truncated episode is bootstrapped with V(its last obs)
                with torch.no_grad():
                    r = torch.where(cut, r + args.gamma * critic(policy.norm(end_obs)).squeeze(-1), r)
            done = ~alive
            rew_b[t], done_b[t] = r, done.float()
            for i in done.nonzero()[:, 0].tolist():
                finished.append((ep["return"][i].item(), float(ep["success_once"][i])))
                writer.add_scalar("charts/episodic_return", ep["return"][i].item(), global_step)
                writer.add_scalar("charts/success_once", float(ep["success_once"][i]), global_step)
            for v in ep.values():
                v[done] = 0
            next_obs = envs.reset_done(done, obs)
        with torch.no_grad():
            next_value = critic(policy.norm(next_obs)).squeeze(-1)
        adv_b, ret_b = gae(rew_b, val_b, done_b, next_value, args.gamma, args.gae_lambda)
        explained_var = 1 - (ret_b - val_b).var() / (ret_b.var() + 1e-8)
        writer.add_scalar("losses/explained_variance", explained_var.item(), global_step)

        b_obs, b_chain = obs_b.reshape(-1, obs_dim), chain_b.reshape(-1, K + 1, H * A)
        b_logp, b_adv, b_ret = logp_b.flatten(0, 1), adv_b.reshape(-1), ret_b.reshape(-1)
        actor_on = iteration > args.critic_warmup_iters
        for _epoch in range(args.update_epochs):
            for mb in torch.randperm(args.batch_size, device=device).tensor_split(args.num_minibatches):
                v = critic(policy.norm(b_obs[mb])).squeeze(-1)
                v_loss = finite(0.5 * ((v - b_ret[mb]) ** 2).mean(), "value_loss")
                critic_opt.zero_grad()
                (args.vf_coef * v_loss).backward()
                nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_opt.step()
                if not actor_on:
                    continue
                adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                new_logp = chain_log_prob(policy, b_obs[mb], b_chain[mb], args.logprob_type, C * A)
                pg_loss, approx_kl = ppo_policy_loss(new_logp, b_logp[mb], adv, args.clip_coef)
                sft_loss = torch.zeros((), device=device)
                if beta > 0:
                    sft_loss = flow_matching_loss(policy, *demo_batch(args.sft_batch_size, 0.0))
                actor_opt.zero_grad()
                finite(rl_co_loss(pg_loss, sft_loss, beta), "policy_loss").backward()
                nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                actor_opt.step()
            if actor_on and approx_kl.item() > args.target_kl:
                break

        sps = int(N * T * C / (time.time() - t_iter))
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        if actor_on:
            writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
            writer.add_scalar("losses/sft_real_loss", sft_loss.item(), global_step)
            writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        eta = (args.num_iterations - iteration) * N * T * C / max(sps, 1) / 60
        train = "none ended"
        if finished:
            ret, succ = np.mean(finished, 0)
            train = f"return {ret:.2f} success {succ:.2f} ({len(finished)})"
        total = args.num_iterations * args.batch_size * C
        print(f"step {global_step}/{total} | {sps} steps/s | ETA {eta:.0f}m"
              f" | train episodes (end at success): {train}", flush=True)  # fmt: skip
        if iteration % eval_iters == 0 or iteration == args.num_iterations:
            log_eval(global_step)
            checkpoint(["ckpt.pt"], iteration)
            if iteration < args.num_iterations:  # where a run resumed from this checkpoint starts
                next_obs = envs.reset([args.seed + global_step + i for i in range(N)], rebuild=True)
                for v in ep.values():
                    v[:] = 0
    envs.close()
    eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

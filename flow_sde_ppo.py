"""πRL Flow-SDE: PPO fine-tuning of a flow-matching action-chunk policy through an ODE-to-SDE conversion.

Paper: Chen, Liu, Zhang et al. 2025, "πRL: Online RL Fine-tuning for Flow-based Vision-Language-Action
Models", Sec. 4 (Flow-SDE, two-layer MDP); SDE from Flow-GRPO (Liu et al. 2025, Sec. 4.1), CPS sampler
from Wang & Yu 2025 (Coefficients-Preserving Sampling). Reference code: RLinf (openpi_action_model.py,
noise_method="flow_sde" / "flow_cps") and Flow-GRPO (sd3_sde_with_logprob.py).

Policy. A velocity field v_θ(x_t, t, o) over an action chunk x ∈ R^{H×A}; t = 1 is noise, t = 0 is data:
    x_t = (1 − t)·a + t·ε,   a ~ demo chunks,  ε ~ N(0, I),   SFT loss ‖v_θ(x_t, t, o) − (ε − a)‖².
K denoising steps on the grid t_k = 1 − k/K (k = 0..K), Δ = t_k − t_{k+1} = 1/K; below, x_k is the k-th state
of the chain (at time t_k): x_0 ~ N(0, I) is noise and x_K the action chunk. The first C of H actions
are executed in the env (one env step of the outer MDP = one chunk of C actions). Demo actions are min-max
scaled to [-1, 1] by the demos' per-dimension range (kept in the checkpoint, mapped back before env.step).
v_θ is an MLP over (o, x, t), or with --backbone transformer π0's layout: state tokens, then one token per
action of the chunk (plus the time embedding), through a small Hugging Face model (or --backbone-path).

ODE → SDE. The ODE dx = v dt has the same marginals p_t as the SDE (reverse time, dt < 0)
    dx = [v + σ_t²/(2t)·(x + (1 − t)·v)] dt + σ_t dw,
because the score of p_t is ∇log p_t(x) = −(x + (1 − t)·v)/t for the linear path above, and adding
σ²/2·∇log p to the drift of the reverse-time process plus σ dw leaves every p_t unchanged. Euler–Maruyama
with dt = −Δ gives the Gaussian step
    x_{t−Δ} = x_t·(1 − σ_t²Δ/(2t)) − v·Δ·(1 + σ_t²(1 − t)/(2t)) + σ_t·√Δ·ε,   ε ~ N(0, I),
    σ_t = a·√(t / (1 − t))  (at t = 1 the denominator is 1 − t_1),  a = --noise-level.
a = 0 gives the deterministic Euler step x − Δ·v (the ODE), used for evaluation.
The 1 − t_1 substitution (the reference's) makes the first step's noise σ²Δ = a² and its contraction 1 − a²/2,
so a stochastic step at t = 1 leaves x_1 with variance (1 − Δ − a²/2)² + a² = (1 − Δ)² + a²Δ + a⁴/4: an excess
of a⁴/4 that does not vanish as K grows. Measured on Gaussian data (exact velocity, 400k chains), the first
step alone stochastic inflates the action variance by a⁴/4 of the data variance (a = 0.5: 1.6 %; a = 1: 25 %)
at every K from 16 to 256; with every step stochastic (--sde-steps all) the later steps remove it (< 0.3 %).
Kept: it is the reference's sampler, the scorer scores exactly what it samples (the policy gradient is
unbiased for that policy), and at the default a = 0.5, K = 4 it happens in 1 of 4 chunk steps and is 1/30 of
the K = 4 Euler error of the ODE itself (−50 % of the data variance).
CPS (--sampler cps): with the predicted data â = x − t·v and noise ε̂ = x + (1 − t)·v,
    μ = â·(1 − t + Δ) + ε̂·(t − Δ)·cos(πa/2),   std = (t − Δ)·sin(πa/2).

Two-layer MDP (RLinf). Each chunk step draws one denoising index k* ~ U{0..K−1} (U{0..K−2} for CPS, whose
last step has std 0), shared by the env batch. Step k* is the SDE step, all other steps are ODE steps, so the
chunk's likelihood is one Gaussian transition:
    log π(a | o) = log N(x_{k*+1}; μ_{k*}(x_{k*}, o), σ_{k*}²Δ)  restricted to the executed C×A entries,
summed (--logprob-type chunk, one ratio per chunk step) or kept per element (token). PPO recomputes only that
transition: one velocity forward per sample instead of K. --sde-steps all makes every step stochastic and
averages the per-step log-probs over the stochastic steps (RLinf's joint mode).
PPO: r = exp(log π_θ − log π_old), L_π = −E[min(r·Â, clip(r, 1 ± ε)·Â)], Â from GAE over chunk steps with
the chunk's summed reward (of r_t − r_{t−1} with --relative-reward, RLinf's use_rel_reward); value loss
max(Huber(V − R), Huber(V_clip − R)); no entropy bonus.
"""

import importlib.util
import json
import math
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
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to runs/{run_name}/videos"""
    save_model: bool = True
    """whether to save checkpoints into runs/{run_name}"""
    checkpoint: str | None = None
    """a checkpoint to resume training from (or to evaluate with --evaluate)"""
    evaluate: bool = False
    """only evaluate --checkpoint with the deterministic ODE sampler, then exit"""

    # Environment
    env_id: str = "PickCube-v1"
    """a ManiSkill3 id (state obs) or a gymnasium id with a Box action space (e.g. Hopper-v5)"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller; must match the demos'"""
    reward_mode: str = "sparse"
    """ManiSkill reward: sparse = 1 at success (πRL fine-tunes on task success) or normalized_dense"""
    relative_reward: bool = False
    """if toggled, the agent gets r_t - r_{t-1} (r_{-1} = 0), RLinf's use_rel_reward: with normalized_dense,
    a shaping whose episode sum is the last step's reward (1 at success), so hovering near success earns 0"""
    max_episode_steps: int | None = None
    """episode length; None: 100 for ManiSkill (motion-planned PickCube demos take <= 99), else the env's"""
    num_envs: int = 2
    """parallel training envs"""
    num_eval_envs: int = 2
    """parallel evaluation envs"""
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = "auto"
    """auto: physx_cuda when --cuda and a GPU exist, else physx_cpu; ignored for gymnasium/MuJoCo ids"""
    vector_env: Literal["auto", "gymnasium", "maniskill"] = "auto"
    """gymnasium: one simulator per process in gymnasium's AsyncVectorEnv (CPU); maniskill: ManiSkill's
    batched env in ManiSkillVectorEnv, the GPU path (on physx_cpu it needs --num-envs 1 and is how the tests
    run the GPU code); auto: maniskill on physx_cuda, gymnasium otherwise"""
    eval_freq: int = 5000
    """evaluate and checkpoint every N env steps (rounded to whole iterations), before RL and at the end;
    0: only at the end"""
    eval_episodes: int = 20
    """episodes per evaluation (0: no evaluation while training)"""

    # Policy (flow-matching action expert)
    denoising_steps: int = 4
    """K, the number of denoising steps"""
    hidden_dim: int = 256
    """width of the 3-layer MLPs (velocity net and critic)"""
    action_horizon: int = 8
    """H, length of the predicted action chunk"""
    num_action_chunks: int = 5
    """C, how many of the H actions are executed per policy call"""
    backbone: Literal["mlp", "transformer"] = "mlp"
    """velocity net: an MLP over (o, x, t), or a π0-style transformer over [state tokens ; action tokens]"""
    backbone_path: str | None = None
    """a local Hugging Face checkpoint for the transformer (from_pretrained, offline); default: tiny Gemma"""

    # SFT on demonstrations
    demo_path: str | None = None
    """ManiSkill h5 demos (traj_i/obs, traj_i/actions); without it RL starts from a random policy"""
    num_demos: int | None = None
    """use only the first N trajectories of the file"""
    sft_steps: int = 2000
    """gradient steps of flow-matching behaviour cloning before RL"""
    sft_batch_size: int = 256
    """SFT minibatch size"""
    sft_lr: float = 3e-4
    """SFT learning rate"""

    # Flow-SDE
    noise_level: float = 0.5
    """a in σ_t = a·sqrt(t/(1−t)) (for CPS: the angle πa/2)"""
    sampler: Literal["sde", "cps"] = "sde"
    """the stochastic step: Flow-SDE (Flow-GRPO) or coefficients-preserving sampling"""
    sde_steps: Literal["one", "all"] = "one"
    """one: the two-layer MDP (one SDE step k* per chunk, the rest ODE); all: every step is stochastic"""
    logprob_type: Literal["chunk", "token"] = "chunk"
    """chunk: one PPO ratio per chunk step (sum over C×A); token: one ratio per executed action entry"""

    # PPO
    learning_rate: float = 3e-5
    """actor (velocity net) learning rate"""
    critic_learning_rate: float = 3e-4
    """critic learning rate"""
    critic_warmup_iters: int = 2
    """the first N iterations train only the critic (a random critic would drag the SFT policy)"""
    gamma: float = 0.99
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE λ"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """PPO epochs per rollout"""
    clip_coef: float = 0.2
    """PPO ratio clip ε"""
    vf_coef: float = 0.5
    """value-loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    target_kl: float | None = None
    """stop the epochs early above this approximate KL"""
    total_timesteps: int = 100_000
    """total env steps of RL"""
    num_steps: int = 100
    """chunk steps per env per rollout (env steps per rollout = num_envs·num_steps·C)"""

    # filled at runtime
    batch_size: int = 0
    """chunk transitions per rollout"""
    minibatch_size: int = 0
    """chunk transitions per minibatch"""
    num_iterations: int = 0
    """PPO iterations"""


# ---------------------------------------------------------------- ALGO LOGIC: Flow-SDE math (pure functions)
def time_grid(K: int) -> torch.Tensor:
    """t_k = 1 − k/K for k = 0..K (t = 1 noise, t = 0 data)."""
    return torch.linspace(1.0, 0.0, K + 1, dtype=torch.float64)


def flow_sde_sigma(t: torch.Tensor, a: float) -> torch.Tensor:
    """σ_k = a·sqrt(t_k/(1 − t_k)) for k = 0..K−1; the t = 1 singularity uses 1 − t_1 instead."""
    denom = 1 - torch.where(t == 1, t[1], t)
    return a * torch.sqrt(t / denom)[:-1]


def denoise_step(x, v, t, dt, sigma, a: float, sampler: str):
    """Mean and std of x_{t−Δ} given x_t and the velocity v (t, dt, sigma broadcast against x)."""
    if sampler == "ode":
        return x - v * dt, torch.zeros_like(x)
    if sampler == "sde":
        mu = x * (1 - sigma**2 * dt / (2 * t)) - v * dt * (1 + sigma**2 * (1 - t) / (2 * t))
        return mu, (sigma * torch.sqrt(dt)).expand_as(x)
    if sampler == "cps":
        a_hat, eps_hat, s = x - t * v, x + (1 - t) * v, t - dt
        mu = a_hat * (1 - s) + eps_hat * s * math.cos(math.pi * a / 2)
        return mu, (s * math.sin(math.pi * a / 2)).expand_as(x)
    raise ValueError(sampler)


def gaussian_log_prob(x, mu, std):
    """Element-wise log N(x; μ, std²)."""
    return -((x - mu) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def stochastic_steps(K, sde_steps, sampler, rng):
    """The two-layer MDP's k* ~ U{0..K'−1} (shared by the env batch), or every step with --sde-steps all."""
    last = K - 1 if sampler == "cps" else K  # CPS's last step has std 0
    return list(range(last)) if sde_steps == "all" else [int(rng.integers(last))]


def reduce_log_prob(logp, C: int, logprob_type: str):
    """(B, S, H, A) per-step log-probs → mean over the S stochastic steps, executed C actions only;
    chunk: sum over (C, A) → (B,); token: (B, C, A)."""
    logp = logp[:, :, :C].mean(1)
    return logp.sum((1, 2)) if logprob_type == "chunk" else logp


def policy_loss(new_logp, old_logp, adv, clip_coef: float):
    """Clipped PPO surrogate L_π; adv (B,) broadcasts over token log-probs (B, C, A). Returns (L_π, approx KL,
    clip fraction)."""
    adv = adv.view(-1, *([1] * (new_logp.dim() - 1)))
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return pg_loss, approx_kl, clipfrac


def value_loss(new_v, old_v, returns, value_clip: float = 0.2, huber_delta: float = 10.0):
    """L_V: the larger Huber loss of V and of V clipped to ±value_clip around the rollout's values."""
    v_clipped = old_v + (new_v - old_v).clamp(-value_clip, value_clip)
    huber = partial(nn.functional.huber_loss, reduction="none", delta=huber_delta)
    return torch.max(huber(new_v, returns), huber(v_clipped, returns)).mean()


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
def mlp(inp, hidden, out):
    layers = [nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out))


def time_features(t, dim=32):
    """(B,) → (B, dim): π0's sinusoidal embedding of t, periods from 4e-3 to 4."""
    period = 4e-3 * (4.0 / 4e-3) ** torch.linspace(0, 1, dim // 2, device=t.device, dtype=t.dtype)
    angle = 2 * math.pi * t[:, None] / period
    return torch.cat([angle.sin(), angle.cos()], -1)


class MLPVelocity(nn.Module):
    def __init__(self, obs_dim, H, A, hidden_dim):
        super().__init__()
        self.net = mlp(obs_dim + H * A + 32, hidden_dim, H * A)

    def forward(self, x, t, o):
        return self.net(torch.cat([o, x.flatten(1), time_features(t)], -1)).view_as(x)


class TransformerVelocity(nn.Module):
    """π0-style action expert: P state tokens (the prefix), then one token per action x_k[h] plus the time
    embedding, through one Hugging Face model. Its causal mask keeps the prefix blind to the actions, as in π0
    (there the prefix's keys/values are computed once per chunk; here K is small and it is recomputed)."""

    P = 4

    def __init__(self, obs_dim, A, path=None, config=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, GemmaConfig

        if config is not None:  # from our checkpoint: the architecture here, the weights in its state dict
            config = dict(config)
            self.lm = AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
        elif path is not None:
            self.lm = AutoModel.from_pretrained(path, local_files_only=True)
        else:  # π0's action expert is a Gemma; this one is tiny enough for a CPU
            self.lm = AutoModel.from_config(GemmaConfig(
                vocab_size=1, hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=32,
                num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=0, eos_token_id=0,
            ))  # fmt: skip
        d = self.lm.config.hidden_size
        self.prefix = nn.Linear(obs_dim, self.P * d)
        self.action_in = nn.Linear(A, d)
        self.time_in = nn.Sequential(nn.Linear(32, d), nn.SiLU(), nn.Linear(d, d))
        self.v_out = nn.Linear(d, A)

    def train(self, mode=True):  # the backbone's dropout stays off: log π of a stored chain must not change
        super().train(mode)
        self.lm.eval()
        return self

    def forward(self, x, t, o):
        tokens = [
            self.prefix(o).view(o.shape[0], self.P, -1),
            self.action_in(x) + self.time_in(time_features(t))[:, None],
        ]
        h = self.lm(inputs_embeds=torch.cat(tokens, 1), use_cache=False).last_hidden_state
        return self.v_out(h[:, self.P :])


class Agent(nn.Module):
    """Flow-matching action expert v_θ(x_t, t, o) over (H, A) chunks, a critic V(o), and the observation
    statistics and action range the checkpoint must carry (o is normalised, x lives in [-1, 1])."""

    def __init__(self, obs_dim, act_dim, horizon, hidden_dim, backbone="mlp", path=None, config=None):
        super().__init__()
        self.shape = (horizon, act_dim)
        for name, fill in (("obs_mean", 0), ("obs_std", 1), ("act_low", -1), ("act_high", 1)):
            self.register_buffer(name, torch.full((act_dim if "act" in name else obs_dim,), float(fill)))
        if backbone == "mlp":
            self.velocity = MLPVelocity(obs_dim, horizon, act_dim, hidden_dim)
        else:
            self.velocity = TransformerVelocity(obs_dim, act_dim, path, config)
        self.critic = mlp(obs_dim, hidden_dim, 1)

    def v(self, x, t, o):
        return self.velocity(x, t.to(x.dtype).expand(x.shape[0]), o)

    def value(self, o):
        return self.critic(o).squeeze(-1)

    def normalize(self, obs):
        return ((obs - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def to_env(self, x):
        """Chunk in [-1, 1] → [act_low, act_high]: the demos' action range after SFT, else the env bounds."""
        return self.act_low + (x.clamp(-1, 1) + 1) / 2 * (self.act_high - self.act_low)

    @torch.no_grad()
    def sample(self, o, K, stochastic, a, sampler, generator=None):
        """Runs the K-step chain from x_{t=1} ~ N(0, I); steps in `stochastic` use the SDE/CPS step.
        Returns the chain (B, K+1, H, A) and the stochastic steps' log-probs (B, S, H, A)."""
        t = time_grid(K).to(o)
        shape = (o.shape[0], *self.shape)
        randn = partial(torch.randn, shape, device=o.device, dtype=o.dtype, generator=generator)
        x = randn()
        sigma = flow_sde_sigma(t, a)
        chain, logps = [x], []
        for k in range(K):
            v = self.v(x, t[k], o)
            step = sampler if k in stochastic else "ode"
            mu, std = denoise_step(x, v, t[k], t[k] - t[k + 1], sigma[k], a, step)
            x = mu + std * randn() if k in stochastic else mu
            if k in stochastic:
                logps.append(gaussian_log_prob(x, mu, std))
            chain.append(x)
        logp = torch.stack(logps, 1) if logps else None
        return torch.stack(chain, 1), logp

    def transition(self, o, chain, k, K, a, sampler):
        """μ_k and std_k of x_{k+1} given the stored x_k, one step index k (B,) per sample."""
        t, rows = time_grid(K).to(o), torch.arange(o.shape[0], device=o.device)
        x = chain[rows, k]
        tk, dt, sk = (u[:, None, None] for u in (t[k], t[k] - t[k + 1], flow_sde_sigma(t, a)[k]))
        return denoise_step(x, self.v(x, t[k], o), tk, dt, sk, a, sampler)

    def log_prob(self, o, chain, idx, K, a, sampler):
        """Recomputes log N(x_{k+1}; μ_k, std_k²) at the stored stochastic indices idx (B, S): S forwards."""
        rows, logps = torch.arange(o.shape[0], device=o.device), []
        for k in idx.T:
            mu, std = self.transition(o, chain, k, K, a, sampler)
            logps.append(gaussian_log_prob(chain[rows, k + 1], mu, std))
        return torch.stack(logps, 1)


def sft_loss(agent, o, chunk):
    """Conditional flow matching: ‖v_θ((1−t)·a + t·ε, t, o) − (ε − a)‖², t ~ U(0, 1)."""
    t = torch.rand(chunk.shape[0], 1, 1, device=chunk.device)
    eps = torch.randn_like(chunk)
    return ((agent.v((1 - t) * chunk + t * eps, t[:, 0, 0], o) - (eps - chunk)) ** 2).mean()


def ppo_update(agent, optimizer, b, args, update_policy=True):
    """PPO epochs over one rollout batch b (flat tensors); returns the last minibatch's stats. A non-finite
    loss raises FloatingPointError(its name) before the optimiser step."""
    advantages = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)  # per batch: minibatches are small
    K, a, n = args.denoising_steps, args.noise_level, b["obs"].shape[0]
    for _epoch in range(args.update_epochs):
        for mb in torch.randperm(n, device=b["obs"].device).tensor_split(args.num_minibatches):
            logp = agent.log_prob(b["obs"][mb], b["chain"][mb], b["idx"][mb], K, a, args.sampler)
            logp = reduce_log_prob(logp, args.num_action_chunks, args.logprob_type)
            value = agent.value(b["obs"][mb])
            pg_loss, approx_kl, clipfrac = policy_loss(logp, b["logp"][mb], advantages[mb], args.clip_coef)
            v_loss = value_loss(value, b["values"][mb], b["returns"][mb])
            for name, loss in (("policy_loss", pg_loss), ("value_loss", v_loss)):
                if not torch.isfinite(loss):
                    raise FloatingPointError(name)
            optimizer.zero_grad()
            (pg_loss * update_policy + args.vf_coef * v_loss).backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    stats = dict(policy_loss=pg_loss, value_loss=v_loss, approx_kl=approx_kl, clipfrac=clipfrac)
    return {k: v.item() for k, v in stats.items()}


# ---------------------------------------------------------------- validation and environments
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


def check_args(args):
    """Every flag check, before anything slow; resolves --sim-backend/--vector-env and the runtime sizes."""
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // max(args.num_minibatches, 1)
    args.num_iterations = max(args.total_timesteps, 0) // max(args.batch_size * args.num_action_chunks, 1)
    checks = [
        (args.num_envs >= 1, f"--num-envs {args.num_envs}: must be >= 1"),
        (args.num_eval_envs >= 1, f"--num-eval-envs {args.num_eval_envs}: must be >= 1"),
        (args.num_steps >= 1, f"--num-steps {args.num_steps}: must be >= 1"),
        (args.total_timesteps >= 0, f"--total-timesteps {args.total_timesteps}: must be >= 0"),
        (args.denoising_steps >= 1, f"--denoising-steps {args.denoising_steps}: must be >= 1"),
        (args.sampler != "cps" or args.denoising_steps >= 2, "--sampler cps needs --denoising-steps >= 2"),
        (args.hidden_dim >= 1, f"--hidden-dim {args.hidden_dim}: must be >= 1"),
        (1 <= args.num_action_chunks <= args.action_horizon,
         f"--num-action-chunks {args.num_action_chunks}: must be in [1, --action-horizon "
         f"{args.action_horizon}]"),
        (0 < args.gamma <= 1, f"--gamma {args.gamma}: must be in (0, 1]"),
        (0 <= args.gae_lambda <= 1, f"--gae-lambda {args.gae_lambda}: must be in [0, 1]"),
        (args.noise_level >= 0, f"--noise-level {args.noise_level}: must be >= 0"),
        (args.update_epochs >= 1, f"--update-epochs {args.update_epochs}: must be >= 1"),
        (args.num_iterations == 0 or args.num_minibatches >= 1 and args.minibatch_size >= 2,
         f"--num-envs × --num-steps = {args.batch_size} chunk transitions in --num-minibatches "
         f"{args.num_minibatches} leave minibatches of {args.minibatch_size}: need >= 2 each"),
        (args.eval_freq >= 0 and args.eval_episodes >= 0, "--eval-freq and --eval-episodes must be >= 0"),
        (args.sft_steps >= 0 and args.sft_batch_size >= 1, "--sft-steps must be >= 0, --sft-batch-size >= 1"),
        (args.num_demos is None or args.num_demos >= 1, f"--num-demos {args.num_demos}: must be >= 1"),
        (not args.evaluate or args.checkpoint is not None and args.eval_episodes >= 1,
         "--evaluate needs --checkpoint PATH and --eval-episodes >= 1"),
        (args.demo_path is None or args.demo_path.endswith(".h5"),
         f"--demo-path {args.demo_path}: must be a ManiSkill .h5 file"),
        (args.backbone_path is None or os.path.exists(os.path.join(args.backbone_path, "config.json")),
         f"--backbone-path {args.backbone_path} has no config.json: pass a save_pretrained dir"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            fail(msg)
    gpu = torch.cuda.is_available()
    maniskill = is_maniskill(args.env_id)
    if args.sim_backend == "auto":
        args.sim_backend = "physx_cuda" if args.cuda and gpu else "physx_cpu"
    if args.vector_env == "auto":
        args.vector_env = "maniskill" if maniskill and args.sim_backend == "physx_cuda" else "gymnasium"
    n = args.num_eval_envs if args.evaluate else max(args.num_envs, args.num_eval_envs)
    if not maniskill and args.vector_env == "maniskill":
        fail(f"--vector-env maniskill needs a ManiSkill id; {args.env_id} is a gymnasium one")
    if maniskill and args.sim_backend == "physx_cuda" and not gpu:
        fail("--sim-backend physx_cuda needs a CUDA GPU; none is visible: use --sim-backend physx_cpu")
    if maniskill and args.sim_backend == "physx_cuda" and args.vector_env == "gymnasium":
        fail("--sim-backend physx_cuda runs in ManiSkill's batched env: use --vector-env maniskill")
    if args.vector_env == "maniskill" and args.sim_backend == "physx_cpu" and n > 1:
        fail("--vector-env maniskill on physx_cpu runs one env: pass --num-envs 1 --num-eval-envs 1")
    if args.capture_video and not maniskill and importlib.util.find_spec("moviepy") is None:
        fail("--capture-video of a gymnasium env needs moviepy: pip install moviepy")
    return maniskill


def make_maniskill(args, num_envs, video_dir=None):
    """The one ManiSkill gym.make: a single env for a gymnasium worker, or num_envs in one batched scene."""
    import mani_skill.envs  # noqa: F401  (registers the ids, in a worker process too)

    env = gym.make(
        args.env_id, num_envs=num_envs, obs_mode="state", control_mode=args.control_mode,
        reward_mode=args.reward_mode, max_episode_steps=args.max_episode_steps or 100,
        sim_backend=args.sim_backend, render_backend="cpu" if args.sim_backend == "physx_cpu" else "gpu",
        render_mode="rgb_array" if video_dir else None,
        enhanced_determinism=True,  # else unseeded resets use the process's unseeded torch RNG
    )  # fmt: skip
    if video_dir:
        from mani_skill.utils.wrappers.record import RecordEpisode

        env = RecordEpisode(env, video_dir, save_trajectory=False)
    return env


class RelativeReward(gym.Wrapper):
    """r_t − r_{t−1}, with r_{−1} = 0 from every reset (--relative-reward). A batched ManiSkill env keeps one
    r_{t−1} per env, and a partial reset (options env_idx) clears only those envs'."""

    prev = 0.0

    def reset(self, *, seed=None, options=None):
        idx = (options or {}).get("env_idx")
        if idx is not None and torch.is_tensor(self.prev):
            self.prev[idx] = 0.0
        else:
            self.prev = 0.0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        obs, r, term, trunc, info = self.env.step(action)
        r, self.prev = r - self.prev, r.clone() if torch.is_tensor(r) else r
        return obs, r, term, trunc, info


def make_single_env(args, maniskill, video_dir=None, relative=False):
    """One env of gymnasium's AsyncVectorEnv (built in its worker process)."""
    if maniskill:
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        env = CPUGymWrapper(make_maniskill(args, 1, video_dir))
    else:
        render_mode = "rgb_array" if video_dir else None
        env = gym.make(args.env_id, max_episode_steps=args.max_episode_steps, render_mode=render_mode)
        env = gym.wrappers.RecordVideo(env, video_dir) if video_dir else env
    return RelativeReward(env) if relative else env


def make_envs(args, maniskill, num_envs, video_dir=None, relative=False):
    """num_envs envs that never autoreset: step_chunk resets the ones that ended, between chunks.
    relative: the training envs' --relative-reward (evaluation reports the env's own reward)."""
    if args.vector_env == "maniskill":
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = make_maniskill(args, num_envs, video_dir)
        return ManiSkillVectorEnv(RelativeReward(env) if relative else env, auto_reset=False)
    videos = [video_dir] + [None] * (num_envs - 1)  # the first env records
    fns = [partial(make_single_env, args, maniskill, v, relative) for v in videos]
    context = "spawn" if maniskill else "fork"  # fork hangs once SAPIEN is initialised
    return gym.vector.AsyncVectorEnv(fns, context=context, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


def reset_done(envs, done, obs, device):
    """Resets the envs in the mask `done`; the others keep their observation."""
    if not done.any():
        return obs
    if isinstance(envs, gym.vector.AsyncVectorEnv):
        new = envs.reset(options={"reset_mask": done.cpu().numpy()})[0]
    else:
        new = envs.reset(options={"env_idx": done.nonzero().flatten()})[0]
    return torch.where(done[:, None], torch.as_tensor(new, dtype=torch.float32, device=device), obs)


def step_chunk(envs, actions, ep, device):
    """Executes C actions (N, C, A) of every env; returns next obs, the chunk's summed reward, whether the
    episode ended by termination/truncation inside the chunk, the obs where it ended, finished episodes.
    An env whose episode ends mid-chunk idles through the rest of the chunk (ignored) and is reset after it:
    leftover actions played in the next episode start it off the demos' distribution (on PickCube one SFT
    policy succeeded 0.11 that way vs 0.39 this way, 100 episodes each)."""
    as_t = partial(torch.as_tensor, device=device)
    n = actions.shape[0]
    reward, alive = torch.zeros(n, device=device), torch.ones(n, dtype=torch.bool, device=device)
    term, trunc = torch.zeros_like(alive), torch.zeros_like(alive)
    end_obs, finished = None, []
    for j in range(actions.shape[1]):
        act = actions[:, j].cpu().numpy() if isinstance(envs, gym.vector.AsyncVectorEnv) else actions[:, j]
        obs, r, te, tr, info = envs.step(act)
        obs, r = as_t(obs, dtype=torch.float32), as_t(r, dtype=torch.float32) * alive
        te, tr = as_t(te, dtype=torch.bool) & alive, as_t(tr, dtype=torch.bool) & alive
        success = as_t(info["success"], dtype=torch.bool) & alive if "success" in info else None
        done = te | tr
        ep["return"] += r
        ep["length"] += alive
        if success is not None:
            ep["success_once"] |= success
        reward += r
        term, trunc = term | te, trunc | tr
        end_obs = obs if end_obs is None else torch.where(done[:, None], obs, end_obs)
        for i in done.nonzero().flatten().tolist():
            stats = {k: float(v[i]) for k, v in ep.items()}
            if success is not None:
                stats["success_at_end"] = float(success[i])
            else:
                stats.pop("success_once")
            finished.append((i, stats))
            for v in ep.values():
                v[i] = 0
        alive &= ~done
    return reset_done(envs, ~alive, obs, device), reward, term, trunc, end_obs, finished


def new_episode_stats(n, device):
    z = torch.zeros(n, device=device)
    return {"return": z.clone(), "length": z.clone(), "success_once": torch.zeros_like(z, dtype=torch.bool)}


@torch.no_grad()
def evaluate(agent, envs, args, device):
    """Deterministic ODE sampling (no stochastic step) in rounds of N episodes, one per env: episode i starts
    from the reset with seed seed + 10000 + i whatever N is (every script evaluates on the same initial
    states), and the chains' initial noise comes from seed + 10000: a checkpoint's --evaluate repeats the
    evaluation its run logged. Each round keeps every env's first episode, so short (often successful)
    episodes are not over-counted."""
    seed = args.seed + 10_000
    gen = torch.Generator(device).manual_seed(seed)
    episodes = []
    while len(episodes) < args.eval_episodes:
        obs, _ = envs.reset(seed=[seed + len(episodes) + i for i in range(envs.num_envs)])
        obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
        ep, first = new_episode_stats(envs.num_envs, device), {}
        while len(first) < envs.num_envs:
            chain, _ = agent.sample(agent.normalize(obs), args.denoising_steps, [], 0.0, "ode", gen)
            acts = agent.to_env(chain[:, -1, : args.num_action_chunks])
            obs, _, _, _, _, finished = step_chunk(envs, acts, ep, device)
            for i, e in finished:
                first.setdefault(i, e)
        episodes += [first[i] for i in range(envs.num_envs)]
    episodes = episodes[: args.eval_episodes]
    return {k: float(np.mean([e[k] for e in episodes])) for k in episodes[0]}


# ---------------------------------------------------------------- demos and checkpoints
def read_demos(path, num_demos, control_mode):
    """ManiSkill h5 → [(obs (L+1, obs_dim), actions (L, act_dim))] of the first num_demos trajectories."""
    import h5py

    if not os.path.exists(path):
        fail(f"demo file {path} not found: make one with `bash make_demos.sh PickCube-v1 100`")
    meta = path[: -len(".h5")] + ".json"
    if os.path.exists(meta):
        saved = json.load(open(meta)).get("env_info", {}).get("env_kwargs", {}).get("control_mode")
        if saved is not None and saved != control_mode:
            fail(f"demos use control_mode {saved!r} but --control-mode is {control_mode!r}")
    try:
        with h5py.File(path, "r") as f:
            keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))
            demos = []
            for k in keys[:num_demos]:
                if not {"obs", "actions"} <= set(f[k]):
                    fail(f"demo file {path}: {k} has {sorted(f[k])}, needs obs and actions")
                demos.append((np.asarray(f[k]["obs"], np.float32), np.asarray(f[k]["actions"], np.float32)))
    except (OSError, KeyError, ValueError) as e:
        fail(f"cannot read demo file {path} ({str(e).splitlines()[0]}): pass a ManiSkill h5 file")
    if not demos:
        fail(f"demo file {path} has no traj_* groups")
    return demos


def demo_chunks(demos, obs_dim, act_dim, H):
    """(observations, action chunks of length H padded with the episode's last action, in [-1, 1] by the
    demos' own per-dimension range, and that range (low, high))."""
    obs, chunks = [], []
    for i, (o, a) in enumerate(demos):
        if o.ndim != 2 or a.ndim != 2 or o.shape[1] != obs_dim or a.shape[1] != act_dim:
            fail(f"demo traj_{i} has obs {o.shape} / actions {a.shape} but the env has obs dim {obs_dim} "
                 f"and action dim {act_dim}: use demos recorded for this env")  # fmt: skip
        a = np.concatenate([a, np.repeat(a[-1:], H - 1, 0)])
        obs.append(o[: len(a) - H + 1])
        chunks.append(np.stack([a[i : i + H] for i in range(len(a) - H + 1)]))
    chunks = torch.as_tensor(np.concatenate(chunks))
    # planned ee deltas are ~0.05 wide in the env's [-1, 1]: at that scale the K-step ODE can't resolve them
    low = chunks.amin((0, 1))
    high = torch.maximum(chunks.amax((0, 1)), low + 1e-3)
    return torch.as_tensor(np.concatenate(obs)), (chunks - low) / (high - low) * 2 - 1, low, high


def save_checkpoint(path, agent, optimizer, args, global_step, iteration, kstar_rng):
    """Everything a resume needs, written atomically: model (with its observation statistics and action
    range), optimiser, args, step, and the RNG states (torch, numpy, python, the k* generator)."""
    rng = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
               kstar=kstar_rng.bit_generator.state,
               cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)  # fmt: skip
    backbone = agent.velocity.lm.config.to_dict() if args.backbone == "transformer" else None
    state = dict(script="flow_sde_ppo", agent=agent.state_dict(), optimizer=optimizer.state_dict(), rng=rng,
                 args=vars(args), global_step=global_step, iteration=iteration, backbone_config=backbone)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"checkpoint {path}", flush=True)


def restore_rng(rng, kstar_rng):
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    kstar_rng.bit_generator.state = rng["kstar"]
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_checkpoint(path, args):
    """The checkpoint at path, if this script wrote it for the same env and architecture; else fail()."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} not found: pass a file written by this script")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"{path} is not a torch checkpoint ({type(e).__name__}): pass a file written by this script")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "flow_sde_ppo":
        who = ckpt.get("script") if isinstance(ckpt, dict) else None
        who = who or "another script or an older version of this one"
        fail(f"{path} is a checkpoint of {who}, not of flow_sde_ppo: pass a file written by this script")
    saved = ckpt["args"]
    keys = ("env_id", "control_mode", "backbone", "action_horizon", "hidden_dim", "denoising_steps")
    wrong = ", ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in keys if saved[k] != getattr(args, k))
    if wrong:
        fail(f"checkpoint {path} was made for {saved['env_id']} with {wrong}: pass the same flags")
    return ckpt


# ---------------------------------------------------------------- main
def main(args):
    maniskill = check_args(args)
    ckpt = None if args.checkpoint is None else load_checkpoint(args.checkpoint, args)
    demos = None
    if ckpt is None and args.demo_path is not None:
        demos = read_demos(args.demo_path, args.num_demos, args.control_mode)
    if args.seed is None:
        args.seed = 1 if ckpt is None else ckpt["args"]["seed"]
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.evaluate:
        envs = make_envs(args, maniskill, args.num_eval_envs)
    else:
        envs = make_envs(args, maniskill, args.num_envs, relative=args.relative_reward)
    space, obs_shape = envs.single_action_space, envs.single_observation_space.shape
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1 or len(obs_shape) != 1:
        envs.close()
        fail(f"{args.env_id} has action space {space} / obs {obs_shape}: this script needs flat Box spaces")
    obs_dim, act_dim = obs_shape[0], space.shape[0]
    if demos is not None:
        demo_obs, demo_chunk, act_low, act_high = demo_chunks(demos, obs_dim, act_dim, args.action_horizon)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    kstar_rng = np.random.default_rng(args.seed)  # the two-layer MDP's k*

    agent = Agent(obs_dim, act_dim, args.action_horizon, args.hidden_dim, args.backbone, args.backbone_path,
                  ckpt and ckpt["backbone_config"]).to(device)  # fmt: skip
    groups = [{"params": agent.velocity.parameters(), "lr": args.learning_rate},
              {"params": agent.critic.parameters(), "lr": args.critic_learning_rate}]  # fmt: skip
    optimizer = torch.optim.Adam(groups, eps=1e-5)
    agent.act_low.copy_(torch.as_tensor(space.low))
    agent.act_high.copy_(torch.as_tensor(space.high))
    global_step, start_iter = 0, 1
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        global_step, start_iter = ckpt["global_step"], ckpt["iteration"] + 1
    elif demos is not None:
        agent.obs_mean.copy_(demo_obs.mean(0))
        agent.obs_std.copy_(demo_obs.std(0).clamp_min(1e-2))
        agent.act_low.copy_(act_low)
        agent.act_high.copy_(act_high)

    if args.evaluate:
        res = evaluate(agent, envs, args, device)
        envs.close()
        print(f"eval step {global_step}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
        with open(args.checkpoint.removesuffix(".pt") + ".eval.json", "w") as f:
            json.dump(dict(res, checkpoint=args.checkpoint, global_step=global_step, seed=args.seed,
                           eval_episodes=args.eval_episodes), f, indent=1)  # fmt: skip
        return res
    if ckpt is not None:
        restore_rng(ckpt["rng"], kstar_rng)

    from torch.utils.tensorboard import SummaryWriter

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
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
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    backend = args.sim_backend if maniskill else "cpu"
    banner = f"run {run_dir} | env {args.env_id} ({backend}, {args.vector_env}) | device {device}"
    print(banner + (f" | demos {len(demo_obs)} transitions" if demos is not None else ""), flush=True)
    if ckpt is not None:
        print(f"resumed {args.checkpoint} at step {global_step}", flush=True)
    ckpt_path = f"{run_dir}/ckpt.pt"
    last_ckpt = args.checkpoint if ckpt is not None else None

    eval_envs = []

    def log_eval(step):
        if args.eval_episodes < 1:
            return
        if not eval_envs:  # made on first use: runs without evaluation spawn no extra simulators
            video_dir = f"{run_dir}/videos" if args.capture_video else None
            eval_envs.append(make_envs(args, maniskill, args.num_eval_envs, video_dir))
        res = evaluate(agent, eval_envs[0], args, device)
        for k, v in res.items():
            writer.add_scalar(f"eval/{k}", v, step)
        print(f"eval step {step}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)

    # SFT: flow-matching behaviour cloning on the demos
    if demos is not None and args.sft_steps > 0:
        sft_opt = torch.optim.Adam(agent.velocity.parameters(), lr=args.sft_lr)
        demo_obs, demo_chunk = agent.normalize(demo_obs.to(device)), demo_chunk.to(device)
        t0 = time.time()
        for i in range(1, args.sft_steps + 1):
            mb = torch.randint(0, demo_obs.shape[0], (args.sft_batch_size,), device=device)
            loss = sft_loss(agent, demo_obs[mb], demo_chunk[mb])
            if not torch.isfinite(loss):
                fail(f"non-finite sft_loss at SFT step {i}; last good checkpoint: none")
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            if i % 500 == 0 or i == args.sft_steps:
                writer.add_scalar("losses/sft_loss", loss.item(), i)
                line = f"sft step {i}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.0f} s"
                print(line, flush=True)
        if args.save_model:
            last_ckpt = f"{run_dir}/sft.pt"
            save_checkpoint(last_ckpt, agent, optimizer, args, 0, 0, kstar_rng)
    steps_per_iter = args.batch_size * args.num_action_chunks
    eval_iters = max(round(args.eval_freq / steps_per_iter), 1) if args.eval_freq > 0 else 0
    if eval_iters and start_iter == 1 <= args.num_iterations:  # (0 iterations: the final eval only)
        log_eval(global_step)

    T, N, K = args.num_steps, args.num_envs, args.denoising_steps
    S = len(stochastic_steps(K, args.sde_steps, args.sampler, np.random.default_rng(0)))
    logp_shape = () if args.logprob_type == "chunk" else (args.num_action_chunks, act_dim)
    buf = dict(
        obs=torch.zeros(T, N, obs_dim, device=device),
        chain=torch.zeros(T, N, K + 1, args.action_horizon, act_dim, device=device),
        idx=torch.zeros(T, N, S, dtype=torch.long, device=device),
        logp=torch.zeros(T, N, *logp_shape, device=device),
        values=torch.zeros(T, N, device=device),
        rewards=torch.zeros(T, N, device=device),
        dones=torch.zeros(T, N, device=device),
    )
    # a resumed run restarts the episodes exactly as the unbroken run does after each checkpoint (below)
    next_obs, _ = envs.reset(seed=args.seed + global_step)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    ep = new_episode_stats(N, device)

    for iteration in range(start_iter, args.num_iterations + 1):
        t_iter = time.time()
        finished_all = []
        agent.eval()
        for step in range(T):
            o = agent.normalize(next_obs)
            ks = stochastic_steps(K, args.sde_steps, args.sampler, kstar_rng)
            with torch.no_grad():
                chain, logp = agent.sample(o, K, ks, args.noise_level, args.sampler)
                buf["values"][step] = agent.value(o)
            buf["obs"][step] = o
            buf["chain"][step] = chain
            buf["idx"][step] = torch.tensor(ks, device=device)
            buf["logp"][step] = reduce_log_prob(logp, args.num_action_chunks, args.logprob_type)
            acts = agent.to_env(chain[:, -1, : args.num_action_chunks])
            next_obs, reward, term, trunc, end_obs, finished = step_chunk(envs, acts, ep, device)
            global_step += N * args.num_action_chunks
            if trunc.any():  # bootstrap truncated episodes with the value of their last observation
                with torch.no_grad():
                    reward = reward + args.gamma * agent.value(agent.normalize(end_obs)) * (trunc & ~term)
            buf["rewards"][step] = reward
            buf["dones"][step] = (term | trunc).float()
            finished_all += finished
        with torch.no_grad():
            next_value = agent.value(agent.normalize(next_obs))
        adv, ret = gae(buf["rewards"], buf["values"], buf["dones"], next_value, args.gamma, args.gae_lambda)
        b = {k: v.flatten(0, 1) for k, v in buf.items()}
        b["adv"] = adv.flatten()
        b["returns"] = ret.flatten()

        agent.train()
        t_update = time.time()
        try:
            stats = ppo_update(agent, optimizer, b, args, update_policy=iteration > args.critic_warmup_iters)
        except FloatingPointError as e:
            fail(f"non-finite {e} at step {global_step}; last good checkpoint: {last_ckpt or 'none'}")
        t_update = time.time() - t_update

        sps = int(steps_per_iter / (time.time() - t_iter))
        eta = (args.num_iterations - iteration) * steps_per_iter / max(sps, 1) / 60
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/update_time", t_update, global_step)
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", v, global_step)
        line = f"step {global_step}/{args.num_iterations * steps_per_iter} | {sps} steps/s | ETA {eta:.0f}m"
        if finished_all:
            line += " | train episodes (end at success):"
            for k in finished_all[0][1]:
                val = float(np.mean([e[k] for _, e in finished_all]))
                tag = f"episodic_{k}" if k in ("return", "length") else k
                writer.add_scalar(f"charts/{tag}", val, global_step)
                line += f" {k}={val:.3f}"
        print(line, flush=True)
        if iteration == args.num_iterations or eval_iters and iteration % eval_iters == 0:
            log_eval(global_step)
            if args.save_model:
                save_checkpoint(ckpt_path, agent, optimizer, args, global_step, iteration, kstar_rng)
                last_ckpt = ckpt_path
            next_obs, _ = envs.reset(seed=args.seed + global_step)  # what a resume from here does too
            next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            ep = new_episode_stats(N, device)
    if args.num_iterations < start_iter:  # nothing to train (SFT only, or a finished run): still evaluate
        log_eval(global_step)
    for e in [envs, *eval_envs]:
        e.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

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
CPS (--sampler cps): with the predicted data â = x − t·v and noise ε̂ = x + (1 − t)·v,
    μ = â·(1 − t + Δ) + ε̂·(t − Δ)·cos(πa/2),   std = (t − Δ)·sin(πa/2).

Two-layer MDP (RLinf). Each chunk step draws one denoising index k* ~ U{0..K−1} (U{0..K−2} with
--ignore-last or CPS, whose last step has std 0), shared by the env batch. Step k* is the SDE step, all
other steps are ODE steps, so the chunk's likelihood is one Gaussian transition:
    log π(a | o) = log N(x_{k*+1}; μ_{k*}(x_{k*}, o), σ_{k*}²Δ)  restricted to the executed C×A entries,
summed (--logprob-type chunk, one ratio per chunk step) or kept per element (token). PPO recomputes only that
transition: one velocity forward per sample instead of K. --sde-steps all makes every step stochastic and
averages the per-step log-probs over the stochastic steps (RLinf's joint mode).
PPO: r = exp(log π_θ − log π_old), L_π = −E[min(r·Â, clip(r, 1 ± ε)·Â)], Â from GAE over chunk steps with
the chunk's summed reward; value loss max(Huber(V − R), Huber(V_clip − R)); no entropy bonus.
"""

import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda (and ManiSkill's physx_cuda backend) is used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb's project name"""
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
    num_envs: int = 2
    """parallel training envs (AsyncVectorEnv processes on CPU, one physx_cuda process on GPU)"""
    num_eval_envs: int = 2
    """parallel evaluation envs"""
    reward_mode: str = "sparse"
    """ManiSkill reward: sparse = 1 at success (πRL fine-tunes on task success) or normalized_dense"""
    max_episode_steps: int | None = None
    """episode length; None: 100 for ManiSkill (motion-planned PickCube demos take <= 99), else the env's"""

    # Policy (flow-matching action expert)
    denoising_steps: int = 4
    """K, the number of denoising steps"""
    action_horizon: int = 8
    """H, length of the predicted action chunk"""
    num_action_chunks: int = 5
    """C, how many of the H actions are executed per policy call"""
    hidden_dim: int = 256
    """width of the 3-layer MLPs (velocity net and critic)"""
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
    sft_lr: float = 3e-4
    """SFT learning rate"""
    sft_batch_size: int = 256
    """SFT minibatch size"""

    # Flow-SDE
    noise_level: float = 0.5
    """a in σ_t = a·sqrt(t/(1−t)) (for CPS: the angle πa/2)"""
    noise_level_end: float | None = None
    """if set, a is annealed linearly from --noise-level to this over --noise-anneal-iters iterations"""
    noise_anneal_iters: int = 100
    """iterations of the linear anneal of a"""
    sampler: Literal["sde", "cps"] = "sde"
    """the stochastic step: Flow-SDE (Flow-GRPO) or coefficients-preserving sampling"""
    sde_steps: Literal["one", "all"] = "one"
    """one: the two-layer MDP (one SDE step k* per chunk, the rest ODE); all: every step is stochastic"""
    ignore_last: bool = False
    """never make the last denoising step stochastic (keeps the executed actions noise-free at k=K−1)"""
    logprob_type: Literal["chunk", "token"] = "chunk"
    """chunk: one PPO ratio per chunk step (sum over C×A); token: one ratio per executed action entry"""

    # PPO
    total_timesteps: int = 100_000
    """total env steps of RL"""
    num_steps: int = 100
    """chunk steps per env per rollout (env steps per rollout = num_envs·num_steps·C)"""
    learning_rate: float = 3e-5
    """actor (velocity net) learning rate"""
    critic_learning_rate: float = 3e-4
    """critic learning rate"""
    critic_warmup: int = 2
    """the first N updates train only the critic (a random critic would drag the SFT policy)"""
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
    value_clip: float = 0.2
    """value clip around the rollout's values"""
    huber_delta: float = 10.0
    """δ of the Huber value loss"""
    vf_coef: float = 0.5
    """value-loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    target_kl: float | None = None
    """stop the epochs early above this approximate KL"""

    # Evaluation and logging
    eval_every: int = 5
    """evaluate every N iterations (and before RL and at the end); 0: only at the end"""
    eval_episodes: int = 20
    """episodes per evaluation (0: no evaluation while training)"""
    checkpoint_every: int = 5
    """checkpoint every N iterations (and at the end)"""

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


def reduce_log_prob(logp, C: int, logprob_type: str):
    """(B, S, H, A) per-step log-probs → mean over the S stochastic steps, executed C actions only;
    chunk: sum over (C, A) → (B,); token: (B, C, A)."""
    logp = logp[:, :, :C].mean(1)
    return logp.sum((1, 2)) if logprob_type == "chunk" else logp


def ppo_loss(logp, old_logp, adv, value, old_value, ret, clip_coef, value_clip, huber_delta):
    """Clipped-ratio policy loss and clipped Huber value loss; adv (B,) broadcasts over token log-probs."""
    adv = adv.view(-1, *([1] * (logp.dim() - 1)))
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    v_clipped = old_value + (value - old_value).clamp(-value_clip, value_clip)
    huber = partial(nn.functional.huber_loss, reduction="none", delta=huber_delta)
    v_loss = torch.max(huber(value, ret), huber(v_clipped, ret)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return pg_loss, v_loss, approx_kl, clipfrac


def gae(rewards, values, dones, next_value, gamma, lam):
    """GAE over chunk steps; dones[t] = the episode ended during transition t (T, N tensors)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nxt = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nxt * (1 - dones[t]) - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


def noise_level_at(iteration: int, a0: float, a1: float | None, anneal_iters: int) -> float:
    """Linear anneal of a from a0 to a1 (constant a0 when a1 is None)."""
    if a1 is None:
        return a0
    return a0 + (a1 - a0) * min(iteration / max(anneal_iters, 1), 1.0)


# ---------------------------------------------------------------- networks
def mlp(inp, hidden, out):
    return nn.Sequential(
        nn.Linear(inp, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, out),
    )


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
    def sample(self, o, K, stochastic, a, sampler):
        """Runs the K-step chain from x_{t=1} ~ N(0, I); steps in `stochastic` use the SDE/CPS step.
        Returns the chain (B, K+1, H, A) and the stochastic steps' log-probs (B, S, H, A)."""
        t, x = time_grid(K).to(o), torch.randn(o.shape[0], *self.shape, device=o.device, dtype=o.dtype)
        sigma = flow_sde_sigma(t, a)
        chain, logps = [x], []
        for k in range(K):
            v = self.v(x, t[k], o)
            step = sampler if k in stochastic else "ode"
            mu, std = denoise_step(x, v, t[k], t[k] - t[k + 1], sigma[k], a, step)
            x = mu + std * torch.randn_like(x) if k in stochastic else mu
            if k in stochastic:
                logps.append(gaussian_log_prob(x, mu, std))
            chain.append(x)
        logp = torch.stack(logps, 1) if logps else None
        return torch.stack(chain, 1), logp

    def log_prob(self, o, chain, idx, K, a, sampler):
        """Recomputes log N(x_{k+1}; μ_k, std_k²) at the stored stochastic indices idx (B, S): S forwards."""
        t = time_grid(K).to(o)
        sigma, rows, logps = flow_sde_sigma(t, a), torch.arange(o.shape[0], device=o.device), []
        for s in range(idx.shape[1]):
            k = idx[:, s]
            x, x_next = chain[rows, k], chain[rows, k + 1]
            tk, dt, sk = (u[:, None, None] for u in (t[k], t[k] - t[k + 1], sigma[k]))
            mu, std = denoise_step(x, self.v(x, t[k], o), tk, dt, sk, a, sampler)
            logps.append(gaussian_log_prob(x_next, mu, std))
        return torch.stack(logps, 1)


def stochastic_steps(K, sde_steps, ignore_last, sampler, rng):
    """The two-layer MDP's k* ~ U{0..K'−1} (shared by the env batch), or every step with --sde-steps all."""
    last = K - 1 if (ignore_last or sampler == "cps") else K  # CPS's last step has std 0
    return list(range(last)) if sde_steps == "all" else [int(rng.integers(last))]


def sft_loss(agent, o, chunk):
    """Conditional flow matching: ‖v_θ((1−t)·a + t·ε, t, o) − (ε − a)‖², t ~ U(0, 1)."""
    t = torch.rand(chunk.shape[0], 1, 1, device=chunk.device)
    eps = torch.randn_like(chunk)
    return ((agent.v((1 - t) * chunk + t * eps, t[:, 0, 0], o) - (eps - chunk)) ** 2).mean()


def ppo_update(agent, optimizer, b, args, a, update_policy=True):
    """PPO epochs over one rollout batch b (flat tensors); returns the last minibatch's stats."""
    n = b["obs"].shape[0]
    advantages = (b["adv"] - b["adv"].mean()) / (b["adv"].std() + 1e-8)  # per batch: minibatches are small
    for _epoch in range(args.update_epochs):
        perm = torch.randperm(n, device=b["obs"].device)
        for start in range(0, n, args.minibatch_size):
            mb = perm[start : start + args.minibatch_size]
            logp = agent.log_prob(
                b["obs"][mb], b["chain"][mb], b["idx"][mb], args.denoising_steps, a, args.sampler
            )
            logp = reduce_log_prob(logp, args.num_action_chunks, args.logprob_type)
            adv = advantages[mb]
            pg_loss, v_loss, approx_kl, clipfrac = ppo_loss(
                logp,
                b["logp"][mb],
                adv,
                agent.value(b["obs"][mb]),
                b["values"][mb],
                b["returns"][mb],
                args.clip_coef,
                args.value_clip,
                args.huber_delta,
            )
            optimizer.zero_grad()
            (pg_loss * update_policy + args.vf_coef * v_loss).backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    stats = dict(policy_loss=pg_loss, value_loss=v_loss, approx_kl=approx_kl, clipfrac=clipfrac)
    return {k: v.item() for k, v in stats.items()}


# ---------------------------------------------------------------- environments
def env_kind(env_id):
    if env_id in gym.registry and not gym.registry[env_id].entry_point.startswith("mani_skill"):
        return "gymnasium"
    import mani_skill.envs  # noqa: F401  (registers the ManiSkill ids)
    from mani_skill.utils.registration import REGISTERED_ENVS

    if env_id in REGISTERED_ENVS:
        return "maniskill"
    raise SystemExit(
        f"error: unknown env id {env_id!r}: use a ManiSkill3 id (e.g. PickCube-v1) or a gymnasium id"
    )


def make_single_env(env_id, kind, control_mode, reward_mode, max_episode_steps):
    if kind == "gymnasium":
        return gym.make(env_id, max_episode_steps=max_episode_steps)
    import mani_skill.envs  # noqa: F401
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    kw = dict(
        obs_mode="state", sim_backend="physx_cpu", render_backend="cpu", max_episode_steps=max_episode_steps
    )
    kw |= dict(enhanced_determinism=True)  # else unseeded resets use the worker's unseeded torch RNG
    return CPUGymWrapper(gym.make(env_id, control_mode=control_mode, reward_mode=reward_mode, **kw))


def make_vector_env(args, kind, num_envs, device):
    steps = args.max_episode_steps or (100 if kind == "maniskill" else None)
    if kind == "maniskill" and device.type == "cuda":  # many envs in one GPU process
        import mani_skill.envs  # noqa: F401
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = gym.make(
            args.env_id,
            num_envs=num_envs,
            obs_mode="state",
            sim_backend="physx_cuda",
            control_mode=args.control_mode,
            reward_mode=args.reward_mode,
            max_episode_steps=steps,
            enhanced_determinism=True,
        )
        return ManiSkillVectorEnv(
            env, num_envs, auto_reset=False, ignore_terminations=False, record_metrics=False
        )
    fn = partial(make_single_env, args.env_id, kind, args.control_mode, args.reward_mode, steps)
    return gym.vector.AsyncVectorEnv(
        [fn] * num_envs, context="spawn", autoreset_mode=gym.vector.AutoresetMode.DISABLED
    )  # spawn: fork hangs once SAPIEN is initialised; no autoreset: step_chunk resets between chunks


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
    return {
        "return": z.clone(),
        "length": z.clone(),
        "success_once": torch.zeros(n, dtype=torch.bool, device=device),
    }


@torch.no_grad()
def evaluate(agent, envs, args, device):
    """Deterministic ODE sampling (no stochastic step); each env plays its first ceil(E/N) episodes, so
    short (often successful) episodes are not over-counted."""
    obs, _ = envs.reset(seed=args.seed + 10_000)
    obs = torch.as_tensor(obs, dtype=torch.float32, device=device)
    n = obs.shape[0]
    m = -(-args.eval_episodes // n)
    ep, done_eps = new_episode_stats(n, device), [[] for _ in range(n)]
    while min(len(d) for d in done_eps) < m:
        chain, _ = agent.sample(agent.normalize(obs), args.denoising_steps, [], 0.0, "ode")
        acts = agent.to_env(chain[:, -1, : args.num_action_chunks])
        obs, _, _, _, _, finished = step_chunk(envs, acts, ep, device)
        for i, e in finished:
            done_eps[i].append(e)
    done_eps = [e for d in done_eps for e in d[:m]]
    return {k: float(np.mean([e[k] for e in done_eps])) for k in done_eps[0]}


# ---------------------------------------------------------------- demos and checkpoints
def load_demos(path, num_demos, obs_dim, act_dim, H, control_mode):
    """ManiSkill h5 → (observations, action chunks of length H padded with the last action, in [-1, 1]
    by the demos' own per-dimension range, and that range (low, high))."""
    import json

    import h5py

    if not os.path.exists(path):
        raise SystemExit(
            f"error: demo file {path} not found: make one with `bash make_demos.sh PickCube-v1 100`"
        )
    meta = path[: -len(".h5")] + ".json"
    if os.path.exists(meta):
        saved = json.load(open(meta)).get("env_info", {}).get("env_kwargs", {}).get("control_mode")
        if saved is not None and saved != control_mode:
            raise SystemExit(
                f"error: demos use control_mode {saved!r} but --control-mode is {control_mode!r}"
            )
    obs, chunks = [], []
    with h5py.File(path, "r") as f:
        keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))[:num_demos]
        for k in keys:
            o, a = np.asarray(f[k]["obs"], np.float32), np.asarray(f[k]["actions"], np.float32)
            if o.ndim != 2 or a.ndim != 2 or o.shape[1] != obs_dim or a.shape[1] != act_dim:
                raise SystemExit(
                    f"error: demo {k} has obs {o.shape} / actions {a.shape} but the env has obs "
                    f"dim {obs_dim} and action dim {act_dim}: use demos recorded for this env"
                )
            a = np.concatenate([a, np.repeat(a[-1:], H - 1, 0)])
            obs.append(o[: len(a) - H + 1])
            chunks.append(np.stack([a[i : i + H] for i in range(len(a) - H + 1)]))
    if not keys:
        raise SystemExit(f"error: no traj_* groups in {path}")
    chunks = torch.as_tensor(np.concatenate(chunks))
    # planned ee deltas are ~0.05 wide in the env's [-1, 1]: at that scale the K-step ODE can't resolve them
    low = chunks.amin((0, 1))
    high = torch.maximum(chunks.amax((0, 1)), low + 1e-3)
    return torch.as_tensor(np.concatenate(obs)), (chunks - low) / (high - low) * 2 - 1, low, high


def save_checkpoint(path, agent, optimizer, args, global_step, iteration):
    """Model (with its observation statistics and action range), optimiser, args, step: written atomically."""
    tmp = path + ".tmp"
    state = dict(
        agent=agent.state_dict(),
        optimizer=optimizer.state_dict(),
        args=vars(args),
        backbone_config=agent.velocity.lm.config.to_dict() if args.backbone == "transformer" else None,
        global_step=global_step,
        iteration=iteration,
    )
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, obs_dim, act_dim, args):
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} not found: pass a file written by this script")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["args"]
        shapes = ckpt["agent"]["obs_mean"].shape[0], ckpt["agent"]["act_low"].shape[0]
    except Exception as e:
        raise SystemExit(f"error: {path} is not a flow_sde_ppo checkpoint ({type(e).__name__})") from None
    want = (obs_dim, act_dim)
    keys = ("backbone", "action_horizon", "hidden_dim", "denoising_steps")
    if shapes != want or any(saved[k] != getattr(args, k) for k in keys):
        raise SystemExit(
            f"error: checkpoint {path} was made for {saved['env_id']} with obs/action dims {shapes}, "
            f"{', '.join(f'{k}={saved[k]}' for k in keys)}: pass the same --env-id and flags"
        )
    return ckpt


# ---------------------------------------------------------------- main
def main(args):
    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        raise SystemExit(f"error: checkpoint {args.checkpoint} not found: pass a file written by this script")
    if args.num_action_chunks > args.action_horizon:
        raise SystemExit("error: --num-action-chunks must be <= --action-horizon")
    if args.evaluate and (args.checkpoint is None or args.eval_episodes < 1):
        raise SystemExit("error: --evaluate needs --checkpoint PATH and --eval-episodes >= 1")
    if args.backbone_path is not None and not os.path.exists(os.path.join(args.backbone_path, "config.json")):
        raise SystemExit(
            f"error: --backbone-path {args.backbone_path} has no config.json: pass a save_pretrained dir"
        )
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    kind = env_kind(args.env_id)
    envs = make_vector_env(args, kind, args.num_eval_envs if args.evaluate else args.num_envs, device)
    space, obs_shape = envs.single_action_space, envs.single_observation_space.shape
    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1 or len(obs_shape) != 1:
        envs.close()
        raise SystemExit(
            f"error: {args.env_id} has action space {space} / obs {obs_shape}: "
            "this script needs a flat Box action space and flat observations"
        )
    obs_dim, act_dim = obs_shape[0], space.shape[0]

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    steps_per_iter = args.num_envs * args.num_steps * args.num_action_chunks
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = max(args.batch_size // args.num_minibatches, 1)
    args.num_iterations = args.total_timesteps // steps_per_iter  # 0: SFT (and its evaluation) only

    ckpt = None if args.checkpoint is None else load_checkpoint(args.checkpoint, obs_dim, act_dim, args)
    agent = Agent(
        obs_dim, act_dim, args.action_horizon, args.hidden_dim, args.backbone, args.backbone_path,
        ckpt and ckpt["backbone_config"],
    ).to(device)  # fmt: skip
    optimizer = torch.optim.Adam(
        [
            {"params": agent.velocity.parameters(), "lr": args.learning_rate},
            {"params": agent.critic.parameters(), "lr": args.critic_learning_rate},
        ],
        eps=1e-5,
    )
    agent.act_low.copy_(torch.as_tensor(space.low)), agent.act_high.copy_(torch.as_tensor(space.high))
    global_step, start_iter = 0, 1
    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        optimizer.load_state_dict(ckpt["optimizer"])
        global_step, start_iter = ckpt["global_step"], ckpt["iteration"] + 1
    elif args.demo_path is not None:
        demo_obs, demo_chunks, act_low, act_high = load_demos(
            args.demo_path, args.num_demos, obs_dim, act_dim, args.action_horizon, args.control_mode
        )
        agent.obs_mean.copy_(demo_obs.mean(0)), agent.obs_std.copy_(demo_obs.std(0).clamp_min(1e-2))
        agent.act_low.copy_(act_low), agent.act_high.copy_(act_high)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.evaluate:
        res = evaluate(agent, envs, args, device)
        print(f"eval {args.checkpoint}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
        envs.close()
        return res

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    ckpt_dir = f"runs/{run_name}"
    print(
        f"run {run_name}: obs {obs_dim}, act {act_dim}, device {device}, {args.num_iterations} iterations",
        flush=True,
    )

    eval_envs, eval_time = [], 0.0

    def log_eval(step):
        nonlocal eval_time
        if args.eval_episodes < 1:
            return
        t0 = time.time()
        if not eval_envs:  # made on first use: smoke runs without evaluation spawn no extra simulators
            eval_envs.append(make_vector_env(args, kind, args.num_eval_envs, device))
        res = evaluate(agent, eval_envs[0], args, device)
        for k, v in res.items():
            writer.add_scalar(f"eval/{k}", v, step)
        print(f"eval step={step} " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
        eval_time += time.time() - t0

    # SFT: flow-matching behaviour cloning on the demos
    if args.checkpoint is None and args.demo_path is not None and args.sft_steps > 0:
        sft_opt = torch.optim.Adam(agent.velocity.parameters(), lr=args.sft_lr)
        demo_obs, demo_chunks = agent.normalize(demo_obs.to(device)), demo_chunks.to(device)
        t0 = time.time()
        for i in range(1, args.sft_steps + 1):
            mb = torch.randint(0, demo_obs.shape[0], (args.sft_batch_size,), device=device)
            loss = sft_loss(agent, demo_obs[mb], demo_chunks[mb])
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            if i % 500 == 0 or i == args.sft_steps:
                writer.add_scalar("losses/sft_loss", loss.item(), i)
                print(f"sft step={i} loss={loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        if args.save_model:
            save_checkpoint(f"{ckpt_dir}/sft_ckpt.pt", agent, optimizer, args, 0, 0)
    if args.eval_every > 0 and start_iter == 1 <= args.num_iterations:  # (0 iterations: the final eval)
        log_eval(global_step)

    T, N, K = args.num_steps, args.num_envs, args.denoising_steps
    S = len(stochastic_steps(K, args.sde_steps, args.ignore_last, args.sampler, np.random.default_rng(0)))
    buf = dict(
        obs=torch.zeros(T, N, obs_dim, device=device),
        chain=torch.zeros(T, N, K + 1, args.action_horizon, act_dim, device=device),
        idx=torch.zeros(T, N, S, dtype=torch.long, device=device),
        logp=torch.zeros(
            (T, N) + (() if args.logprob_type == "chunk" else (args.num_action_chunks, act_dim)),
            device=device,
        ),
        values=torch.zeros(T, N, device=device),
        rewards=torch.zeros(T, N, device=device),
        dones=torch.zeros(T, N, device=device),
    )
    rng = np.random.default_rng(args.seed)
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    ep = new_episode_stats(N, device)
    start_time, start_step, eval_time = time.time(), global_step, 0.0

    for iteration in range(start_iter, args.num_iterations + 1):
        a = noise_level_at(iteration - 1, args.noise_level, args.noise_level_end, args.noise_anneal_iters)
        finished_all = []
        agent.eval()
        for step in range(T):
            o = agent.normalize(next_obs)
            ks = stochastic_steps(K, args.sde_steps, args.ignore_last, args.sampler, rng)
            with torch.no_grad():
                chain, logp = agent.sample(o, K, ks, a, args.sampler)
                buf["values"][step] = agent.value(o)
            buf["obs"][step], buf["chain"][step] = o, chain
            buf["idx"][step] = torch.tensor(ks, device=device)
            buf["logp"][step] = reduce_log_prob(logp, args.num_action_chunks, args.logprob_type)
            acts = agent.to_env(chain[:, -1, : args.num_action_chunks])
            next_obs, reward, term, trunc, end_obs, finished = step_chunk(envs, acts, ep, device)
            global_step += N * args.num_action_chunks
            if trunc.any():  # bootstrap truncated episodes with the value of their last observation
                with torch.no_grad():
                    reward = reward + args.gamma * agent.value(agent.normalize(end_obs)) * (trunc & ~term)
            buf["rewards"][step], buf["dones"][step] = reward, (term | trunc).float()
            finished_all += finished
        with torch.no_grad():
            next_value = agent.value(agent.normalize(next_obs))
        adv, returns = gae(
            buf["rewards"], buf["values"], buf["dones"], next_value, args.gamma, args.gae_lambda
        )
        b = {k: v.flatten(0, 1) for k, v in buf.items()}
        b["adv"], b["returns"] = adv.flatten(), returns.flatten()

        agent.train()
        t_update = time.time()
        stats = ppo_update(agent, optimizer, b, args, a, update_policy=iteration > args.critic_warmup)
        t_update = time.time() - t_update

        sps = int((global_step - start_step) / (time.time() - start_time - eval_time))
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/noise_level", a, global_step)
        writer.add_scalar("charts/update_time", t_update, global_step)
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", v, global_step)
        line = f"iter={iteration} step={global_step} SPS={sps} update={t_update:.2f}s"
        if finished_all:
            for k in finished_all[0][1]:
                val = float(np.mean([e[k] for _, e in finished_all]))
                writer.add_scalar(
                    f"charts/{'episodic_' if k in ('return', 'length') else ''}{k}", val, global_step
                )
                line += f" {k}={val:.3f}"
        print(line, flush=True)
        if args.eval_every > 0 and iteration % args.eval_every == 0 and iteration != args.num_iterations:
            log_eval(global_step)
        if args.save_model and (iteration % args.checkpoint_every == 0 or iteration == args.num_iterations):
            name = "final_ckpt.pt" if iteration == args.num_iterations else f"ckpt_{iteration}.pt"
            save_checkpoint(f"{ckpt_dir}/{name}", agent, optimizer, args, global_step, iteration)
            print(f"saved {ckpt_dir}/{name}", flush=True)
    log_eval(global_step)
    for e in [envs, *eval_envs]:
        e.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

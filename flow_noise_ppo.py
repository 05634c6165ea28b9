"""πRL Flow-Noise: PPO fine-tuning of a flow-matching action-chunk policy whose denoising chain is an MDP.

Paper: Chen, Liu, Zhang et al. 2025, "πRL: Online RL Fine-tuning for Flow-based Vision-Language-Action
Models", Sec. 4.1 (Flow-Noise) and Sec. 4.3 (PPO on action chunks); reference code: RLinf
(rlinf/models/embodiment/openpi/openpi_action_model.py, noise_method="flow_noise").

Time convention (openpi): t = 1 is noise, t = 0 is data, grid t_k = 1 - k/K, k = 0..K, Δ = 1/K.
An action chunk x ∈ R^{H×A} (H = --action-horizon) is denoised in K = --denoising-steps steps:

    x_0 ~ N(0, I)
    μ_k = x_k - Δ · v_θ(x_k, t_k, o)                                   (the Euler step)
    σ_k = exp(½ · [log σ_min² + (log σ_max² - log σ_min²) · (tanh u_θ(x_k, t_k, o) + 1)/2])
    x_{k+1} = μ_k + σ_k · ε_k,  ε_k ~ N(0, I)                         (all K steps stochastic)

u_θ is a noise head on the action expert's features, so σ_k ∈ [σ_min, σ_max] = [0.08, 0.16].
Only the first C = --num-action-chunks actions of x_K are executed (clipped to [-1, 1]).

Log-likelihood of a chain, per element (h, a), averaged over its K+1 Gaussian terms:

    ℓ_{h,a} = 1/(K+1) · [log N(x_0; 0, 1) + Σ_k log N(x_{k+1}; μ_k, σ_k²)]_{h,a}

restricted by the executed-chunk mask m_{h,a} = [h < C]·[a < A_real].
    --logprob-type token: one ratio per (h, a):  r_{h,a} = exp(ℓ_{h,a} - ℓ^old_{h,a})
    --logprob-type chunk: one ratio per chunk:   r = exp(Σ_{h,a} m (ℓ - ℓ^old))

PPO on chunk steps (one decision = one chunk, reward R = Σ of the C executed rewards, done = max):
    L_π = -E_m[min(r Â, clip(r, 1-ε, 1+ε) Â)],  ε = 0.2, Â = GAE(γ, λ) normalised
    L_V = max(Huber(V - R̂), Huber(V_old + clip(V - V_old, ±0.2) - R̂))
    L = L_π + c_v L_V - c_H · H[σ],  H = mean_k ½ log(2πe σ_k²)

SFT (flow matching, before RL): x_t = t·ε + (1 - t)·a, target v = ε - a, loss ||v_θ(x_t, t, o) - v||²,
t ~ U(0, 1), actions min-max scaled to [-1, 1] by the demos' range (kept in the checkpoint).

Multi-task (--env-id A,B,...): sub-env i runs task i mod T, and every observation becomes
    õ = [o ; 0 … 0 ; onehot(task)] ∈ R^{D_max + T}   (o zero-padded to the largest task's obs dim D_max)
so policy and critic see the task token; SFT uses the union of one demo file per task; eval is per task.

Reward: sparse (1 at success) by default; --reward-mode normalized_dense --relative-reward gives RLinf's
PickCube shaping r'_t = r_t - r_{t-1} (r_{-1} = 0), whose episode sum is the last step's dense reward.

Defaults: H = 8, C = 5, K = 4, σ ∈ [0.08, 0.16], token ratios, sparse ManiSkill reward, 100-step episodes,
2 CPU envs, 100 chunk decisions per env per update, 4 epochs x 4 minibatches, lr 3e-5 (critic 3e-4),
2 critic-only warm-up updates, γ = 0.99 and λ = 0.95 per chunk step. Evaluation runs the noiseless ODE.
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
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
    """if toggled and CUDA exists, use it and ManiSkill's physx_cuda backend (many envs in one process)"""
    track: bool = False
    """if toggled, track the run with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to runs/{run_name}/videos"""
    save_model: bool = False
    """if toggled, save runs/{run_name}/flow_noise_ppo.pt after SFT, periodically and at the end"""
    checkpoint: str | None = None
    """checkpoint to resume from (training continues to --total-timesteps; SFT is skipped)"""
    evaluate: bool = False
    """with --checkpoint: only evaluate it and exit"""

    # Environment
    env_id: str = "PickCube-v1"
    """ManiSkill3 (PickCube-v1, PushCube-v1, StackCube-v1, PullCube-v1) or gymnasium MuJoCo (Hopper-v5);
    comma-separated for a multi-task run with a task token (e.g. PickCube-v1,PushCube-v1)"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller; must match the demos"""
    reward_mode: str = "sparse"
    """ManiSkill reward: sparse = 1 at success, as πRL fine-tunes on task success (or normalized_dense)"""
    relative_reward: bool = False
    """if toggled, the agent gets r_t - r_{t-1} (r_{-1} = 0), RLinf's use_rel_reward: with normalized_dense,
    a shaping whose episode sum is the last step's reward (1 at success), so hovering near success earns 0"""
    max_episode_steps: int | None = None
    """episode length; none: 100 for ManiSkill (PickCube's motion-planned demos take <= 99), else the env's"""
    num_envs: int = 2
    """parallel training envs (2 is fastest on 2 CPU cores; hundreds with physx_cuda); >= number of tasks"""
    num_eval_envs: int = 2
    """parallel evaluation envs (>= number of tasks)"""
    eval_episodes: int = 20
    """episodes per evaluation (per task)"""
    eval_every: int = 5
    """evaluate every this many PPO updates"""
    checkpoint_every: int = 5
    """with --save-model: checkpoint every this many PPO updates"""

    # Flow policy
    backbone: Literal["mlp", "transformer"] = "mlp"
    """action expert: MLP over (o, x, t), or a π0-style transformer over [state tokens ; action tokens]"""
    backbone_path: str | None = None
    """local Hugging Face checkpoint for the transformer (offline from_pretrained); default: a tiny GPT-2"""
    action_horizon: int = 8
    """H: actions predicted per chunk"""
    num_action_chunks: int = 5
    """C: actions of the chunk executed before re-planning (C <= H)"""
    denoising_steps: int = 4
    """K: Euler steps of the chain (all stochastic in rollouts)"""
    sigma_min: float = 0.08
    """lower bound of the learned noise std"""
    sigma_max: float = 0.16
    """upper bound of the learned noise std"""
    logprob_type: Literal["token", "chunk"] = "token"
    """PPO ratio per (action step, dim) or per chunk (sum over the executed part)"""

    # SFT on demonstrations
    demo_path: str | None = None
    """h5 from `bash make_demos.sh` (state obs), one per task, comma-separated; none: RL from scratch"""
    num_demos: int | None = None
    """use only the first N trajectories of each file (few-shot SFT); none: all"""
    sft_steps: int = 2000
    """flow-matching gradient steps before RL"""
    sft_batch_size: int = 256
    """SFT minibatch size (chunks)"""
    sft_lr: float = 3e-4
    """SFT learning rate"""

    # PPO
    total_timesteps: int = 200_000
    """env steps of RL (SFT steps not counted)"""
    num_steps: int = 100
    """chunk decisions per env per rollout (num_steps * C env steps)"""
    learning_rate: float = 3e-5
    """policy learning rate"""
    critic_learning_rate: float = 3e-4
    """critic learning rate"""
    critic_warmup: int = 2
    """first updates train only the critic (the SFT policy is not moved by a random critic)"""
    gamma: float = 0.99
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 4
    """epochs per update"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    value_clip: float = 0.2
    """value clip around the rollout values"""
    huber_delta: float = 10.0
    """Huber delta of the value loss"""
    ent_coef: float = 0.005
    """entropy bonus of the learned noise"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    target_kl: float | None = None
    """stop the epoch loop when approx KL exceeds this"""


# ---------------------------------------------------------------- ALGO LOGIC: the math, pure functions


def time_grid(K: int, device=None) -> torch.Tensor:
    """t_k = 1 - k/K for k = 0..K (openpi: t = 1 noise, t = 0 data)."""
    return 1.0 - torch.arange(K + 1, device=device, dtype=torch.float32) / K


def bounded_sigma(u: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Noise head output u -> σ ∈ [σ_min, σ_max] through tanh on the log-variance."""
    lo, hi = 2 * np.log(sigma_min), 2 * np.log(sigma_max)
    return torch.exp(0.5 * (lo + (hi - lo) * (torch.tanh(u) + 1) / 2))


def gaussian_log_prob(x: torch.Tensor, mu, sigma) -> torch.Tensor:
    return (
        -torch.log(torch.as_tensor(sigma, dtype=x.dtype))
        - 0.5 * np.log(2 * np.pi)
        - 0.5 * ((x - mu) / sigma) ** 2
    )


def executed_mask(H: int, A: int, C: int, A_real: int | None = None, device=None) -> torch.Tensor:
    """m_{h,a} = [h < C]·[a < A_real]: only executed actions and real action dims carry likelihood."""
    h = torch.arange(H, device=device)[:, None]
    a = torch.arange(A, device=device)[None, :]
    return (h < C) & (a < (A if A_real is None else A_real))


def chain_log_prob(chain, mu, sigma, mask, logprob_type: str) -> torch.Tensor:
    """chain (B,K+1,H,A), μ/σ (B,K,H,A) -> ℓ (B,H,A), zero outside the mask (token), or Σ_m ℓ (B,) (chunk)."""
    K = mu.shape[1]
    terms = gaussian_log_prob(chain[:, 0], 0.0, 1.0) + gaussian_log_prob(chain[:, 1:], mu, sigma).sum(1)
    ell = terms / (K + 1) * mask
    return ell if logprob_type == "token" else ell.sum((-2, -1))


def chain_entropy(sigma, mask) -> torch.Tensor:
    """Mean Gaussian entropy ½ log(2πe σ²) over the K steps and the executed elements -> (B,)."""
    ent = (0.5 * np.log(2 * np.pi * np.e) + torch.log(sigma)).mean(1)
    return (ent * mask).sum((-2, -1)) / mask.sum()


def gae(rewards, values, dones, next_value, gamma: float, lam: float):
    """GAE over chunk steps; dones[t] = the episode ended inside chunk t (no bootstrap from t+1)."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        v_next = next_value if t == T - 1 else values[t + 1]
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * v_next * nonterminal - values[t]
        last = delta + gamma * lam * nonterminal * last
        adv[t] = last
    return adv, adv + values


def ppo_loss(
    new_logp, old_logp, adv, new_v, old_v, returns, entropy, mask, clip_coef, value_clip, ent_coef, vf_coef,
    huber_delta,
):  # fmt: skip
    """Clipped PPO; token log-probs (B,H,A) average the objective over the mask; chunk log-probs are (B,)."""
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    if new_logp.dim() == 3:  # token: Â is shared by every element of the chunk
        adv = adv[:, None, None]
        w = mask.expand_as(new_logp).to(new_logp.dtype)
    else:
        w = torch.ones_like(new_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    pg_loss = (pg * w).sum() / w.sum()
    v_clipped = old_v + (new_v - old_v).clamp(-value_clip, value_clip)
    v_loss = torch.max(
        F.huber_loss(new_v, returns, delta=huber_delta, reduction="none"),
        F.huber_loss(v_clipped, returns, delta=huber_delta, reduction="none"),
    ).mean()
    loss = pg_loss + vf_coef * v_loss - ent_coef * entropy.mean()
    stats = {"value_loss": v_loss}  # kept differentiable for the critic warm-up
    with torch.no_grad():
        stats |= {
            "policy_loss": pg_loss.detach(),
            "entropy": entropy.mean(),
            "approx_kl": (((ratio - 1) - logratio) * w).sum() / w.sum(),
            "clipfrac": (((ratio - 1).abs() > clip_coef).to(w.dtype) * w).sum() / w.sum(),
        }
    return loss, stats


# ---------------------------------------------------------------- networks


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t with periods from 4e-3 to 4 (as π0)."""
    period = 4e-3 * (4.0 / 4e-3) ** torch.linspace(0, 1, dim // 2, device=t.device)
    angle = 2 * np.pi * t[:, None] / period
    return torch.cat([angle.sin(), angle.cos()], -1)


def noise_head(in_dim: int, out_dim: int) -> nn.Module:
    """u_θ: RLinf's ExploreNoiseNet sizes (128, 64, tanh)."""
    return nn.Sequential(
        nn.Linear(in_dim, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, out_dim)
    )


class MLPExpert(nn.Module):
    """(o, x_k, t_k) -> (v, u), one feature vector for the whole chunk."""

    def __init__(self, obs_dim, H, A, hidden=256, t_dim=32):
        super().__init__()
        self.t_dim = t_dim
        self.trunk = nn.Sequential(
            nn.Linear(obs_dim + H * A + t_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
        )  # fmt: skip
        self.v_out = nn.Linear(hidden, H * A)
        self.noise_head = noise_head(hidden, H * A)

    def forward(self, x, t, o):
        f = self.trunk(torch.cat([o, x.flatten(1), time_embedding(t, self.t_dim)], -1))
        return self.v_out(f).view_as(x), self.noise_head(f).view_as(x)


class TransformerExpert(nn.Module):
    """π0-style: prefix of state tokens, suffix of H action tokens (x_k[h] + time), one HF decoder."""

    num_state_tokens = 4

    def __init__(self, obs_dim, H, A, backbone_path=None, backbone_config=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, GPT2Config

        if backbone_config is not None:  # rebuilt from a checkpoint: the weights come from its state dict
            cfg = dict(backbone_config)
            self.lm = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        elif backbone_path is not None:
            self.lm = AutoModel.from_pretrained(backbone_path, local_files_only=True)
        else:
            tiny = GPT2Config(
                vocab_size=1, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
            )
            self.lm = AutoModel.from_config(tiny)
        for m in self.lm.modules():  # dropout would make log-probs of the same chain differ between calls
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        d = self.lm.config.hidden_size
        self.H, self.d = H, d
        self.state_in = nn.Linear(obs_dim, self.num_state_tokens * d)
        self.action_in = nn.Linear(A, d)
        self.time_in = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.v_out = nn.Linear(d, A)
        self.noise_head = noise_head(d, A)

    def forward(self, x, t, o):
        prefix = self.state_in(o).view(o.shape[0], self.num_state_tokens, self.d)
        suffix = self.action_in(x) + self.time_in(time_embedding(t, self.d))[:, None]
        # no KV cache for the prefix: K small, and the code stays one forward
        h = self.lm(inputs_embeds=torch.cat([prefix, suffix], 1)).last_hidden_state[:, -self.H :]
        return self.v_out(h), self.noise_head(h)


class FlowNoisePolicy(nn.Module):
    def __init__(
        self, obs_dim, A, H, K, sigma_min, sigma_max, backbone="mlp", backbone_path=None, backbone_config=None
    ):
        super().__init__()
        self.A, self.H, self.K, self.sigma_min, self.sigma_max = A, H, K, sigma_min, sigma_max
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        # x lives in [-1, 1]; the env gets act_low + (x + 1)/2 (act_high - act_low), bounds = the demos' range
        self.register_buffer("act_low", -torch.ones(A))
        self.register_buffer("act_high", torch.ones(A))
        if backbone == "mlp":
            self.expert = MLPExpert(obs_dim, H, A)
        else:
            self.expert = TransformerExpert(obs_dim, H, A, backbone_path, backbone_config)

    def normalize(self, obs):
        return ((obs - self.obs_mean) / self.obs_std).clamp(-10, 10)

    def to_env(self, x):
        return self.act_low + (x.clamp(-1, 1) + 1) / 2 * (self.act_high - self.act_low)

    def step_gaussian(self, x, t, o):
        """μ_k, σ_k of one denoising step (o already normalised)."""
        v, u = self.expert(x, t, o)
        return x - v / self.K, bounded_sigma(u, self.sigma_min, self.sigma_max)

    @torch.no_grad()
    def sample(self, obs, stochastic=True):
        """-> chain (B,K+1,H,A), μ and σ (B,K,H,A); deterministic = the plain Euler ODE (evaluation)."""
        o = self.normalize(obs)
        t = time_grid(self.K, obs.device)
        x = torch.randn(obs.shape[0], self.H, self.A, device=obs.device)
        chain, mus, sigmas = [x], [], []
        for k in range(self.K):
            mu, sigma = self.step_gaussian(x, t[k].expand(x.shape[0]), o)
            x = mu + sigma * torch.randn_like(mu) if stochastic else mu
            chain.append(x), mus.append(mu), sigmas.append(sigma)
        return torch.stack(chain, 1), torch.stack(mus, 1), torch.stack(sigmas, 1)

    def chain_gaussians(self, obs, chain):
        """Re-evaluates all K steps of stored chains in one batched call -> μ, σ (B,K,H,A)."""
        B, K = chain.shape[0], self.K
        o = self.normalize(obs).repeat_interleave(K, 0)
        t = time_grid(K, obs.device)[:K].repeat(B)
        mu, sigma = self.step_gaussian(chain[:, :K].reshape(B * K, self.H, self.A), t, o)
        return mu.view(B, K, self.H, self.A), sigma.view(B, K, self.H, self.A)

    def sft_loss(self, obs, actions):
        eps = torch.randn_like(actions)
        t = torch.rand(actions.shape[0], device=actions.device)
        x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * actions
        v, _ = self.expert(x_t, t, self.normalize(obs))
        return F.mse_loss(v, eps - actions)


def make_critic(obs_dim, hidden=256):
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )  # fmt: skip


# ---------------------------------------------------------------- environments and data


def is_maniskill(env_id: str) -> bool:
    if env_id not in gym.registry:  # ManiSkill registers its ids on import, which is slow: only when needed
        import mani_skill.envs  # noqa: F401
    spec = gym.registry.get(env_id)
    return spec is not None and "mani_skill" in getattr(
        getattr(spec.entry_point, "func", None), "__module__", ""
    )


def task_token_obs(obs, task: int, num_tasks: int, pad_to: int) -> np.ndarray:
    """o (..., d) -> õ = [o ; 0 … 0 ; onehot(task)] (..., pad_to + num_tasks): one layout for every task."""
    obs = np.asarray(obs, np.float32)
    out = np.zeros((*obs.shape[:-1], pad_to + num_tasks), np.float32)
    out[..., : obs.shape[-1]] = obs
    out[..., pad_to + task] = 1.0
    return out


def make_maniskill(args: Args, env_id: str, video_dir: str | None, **backend):
    """One ManiSkill env (or, with num_envs=n on physx_cuda, n of them in one scene batch)."""
    env = gym.make(
        env_id, obs_mode="state", control_mode=args.control_mode, reward_mode=args.reward_mode,
        max_episode_steps=args.max_episode_steps or 100, render_mode="rgb_array" if video_dir else None,
        enhanced_determinism=True,  # else unseeded resets use the worker process's unseeded torch RNG
        **backend,
    )  # fmt: skip
    if video_dir:
        from mani_skill.utils.wrappers.record import RecordEpisode

        env = RecordEpisode(env, video_dir, save_trajectory=False)
    return env


def make_env(args: Args, env_id: str, maniskill: bool, video_dir: str | None = None, token=None):
    """token = (task, num_tasks, pad_to): the env returns task_token_obs of its observations."""

    def thunk():
        if maniskill:
            import mani_skill.envs  # noqa: F401  (registers the ids in the subprocess)
            from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

            env = CPUGymWrapper(
                make_maniskill(args, env_id, video_dir, sim_backend="physx_cpu", render_backend="cpu")
            )
        else:
            env = gym.make(env_id, max_episode_steps=args.max_episode_steps,
                           render_mode="rgb_array" if video_dir else None)  # fmt: skip
            env = gym.wrappers.RecordVideo(env, video_dir) if video_dir else env
        if token is None:
            return env
        space = gym.spaces.Box(-np.inf, np.inf, (token[2] + token[1],), np.float32)
        return gym.wrappers.TransformObservation(env, lambda o: task_token_obs(o, *token), space)

    return thunk


def task_obs_dims(args: Args, tasks: list[str]) -> list[int]:
    """Obs dim of each task, from one throw-away env each; one action head needs one action space."""
    dims, spaces = [], []
    for task in tasks:
        env = make_env(args, task, is_maniskill(task))()
        dims.append(env.observation_space.shape[0]), spaces.append(env.action_space), env.close()
    if any(space != spaces[0] for space in spaces):
        raise SystemExit(f"error: the tasks' action spaces differ ({spaces}); pass tasks of one robot")
    return dims


class VecEnv:
    """N envs behind one torch API. Episodes reset only when the caller asks, i.e. between chunks."""

    def __init__(self, args: Args, n: int, device, video_dir=None, tokens=(None,)):
        self.device = device
        self.relative = args.relative_reward
        self.prev_r = torch.zeros(n, device=device)  # r_{t-1} of each env, for --relative-reward
        self.tasks = args.env_id.split(",")
        T = len(self.tasks)
        self.task_of_env = [i % T for i in range(n)]  # round-robin
        # physx_cuda runs one scene type per process: a multi-task run keeps its sub-envs on physx_cpu
        self.gpu = device.type == "cuda" and T == 1 and is_maniskill(args.env_id)
        if self.gpu:  # physx_cuda: all envs in this process, tensors stay on the GPU
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            env = make_maniskill(args, args.env_id, video_dir, num_envs=n, sim_backend="physx_cuda")
            self.envs = ManiSkillVectorEnv(
                env, n, auto_reset=False, ignore_terminations=False, record_metrics=False
            )
        else:
            ms = [is_maniskill(task) for task in self.tasks]
            thunks = [
                make_env(args, self.tasks[k], ms[k], video_dir if i == 0 else None, tokens[k])
                for i, k in enumerate(self.task_of_env)
            ]
            # one process per env ("spawn": SAPIEN does not survive fork); unlike SyncVectorEnv, these workers
            # let an env that ended inside a chunk keep stepping until the chunk is over
            self.envs = gym.vector.AsyncVectorEnv(
                thunks,
                context="spawn" if any(ms) else "fork",
                autoreset_mode=gym.vector.AutoresetMode.DISABLED,
            )
        space = self.envs.single_action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            self.envs.close()
            raise SystemExit(f"error: {args.env_id} has action space {space}; flow_noise_ppo needs a 1-D Box")
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = space.shape[0]
        self.low = torch.as_tensor(space.low, dtype=torch.float32, device=device)
        self.high = torch.as_tensor(space.high, dtype=torch.float32, device=device)

    def _t(self, x, dtype=torch.float32):
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x, device=self.device).to(dtype)

    def reset(self, seed=None):
        self.prev_r.zero_()
        return self._t(self.envs.reset(seed=seed)[0])

    def step(self, a):
        """env action a -> obs, reward, terminated, truncated, success (all tensors)."""
        a = torch.maximum(torch.minimum(a, self.high), self.low)
        obs, r, term, trunc, info = self.envs.step(a if self.gpu else a.cpu().numpy())
        success = info.get("success", np.zeros(len(r), bool))
        r = self._t(r)
        if self.relative:
            r, self.prev_r = r - self.prev_r, r
        return (self._t(obs), r, self._t(term, torch.bool), self._t(trunc, torch.bool),
                self._t(success, torch.bool))  # fmt: skip

    def reset_done(self, done, obs):
        if not done.any():
            return obs
        self.prev_r[done] = 0.0
        if self.gpu:
            return self.envs.reset(options={"env_idx": done.nonzero()[:, 0]})[0]
        return self._t(self.envs.reset(options={"reset_mask": done.cpu().numpy()})[0])

    def close(self):
        self.envs.close()


def check_demo_file(path, env_id: str, control_mode: str):
    """Before any env starts: the file exists and its json sidecar names this env and controller."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"error: demo file {path} not found; make one with `bash make_demos.sh {env_id}`")
    meta = path.with_suffix(".json")
    if meta.exists():
        info = json.loads(meta.read_text()).get("env_info", {})
        if info.get("env_id", env_id) != env_id:
            raise SystemExit(
                f"error: demos are for {info['env_id']}, not {env_id}; pass matching --env-id (and order)"
            )
        mode = info.get("env_kwargs", {}).get("control_mode", control_mode)
        if mode != control_mode:
            raise SystemExit(f"error: demos use control mode {mode}; pass --control-mode {mode}")


def load_demos(path, args: Args, obs_dim, act_dim, token=None):
    """ManiSkill h5 -> obs (N,D), action chunks (N,H,A); chunks past the end repeat the last action.
    token = (task, num_tasks, pad_to): obs become task_token_obs, as the multi-task envs return them."""
    import h5py

    obs, chunks = [], []
    with h5py.File(path, "r") as f:
        keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))
        if not keys:
            raise SystemExit(f"error: {path} has no traj_i groups; make demos with `bash make_demos.sh`")
        for k in keys[: args.num_demos]:
            o, a = f[k]["obs"], f[k]["actions"]
            if (
                not hasattr(o, "shape")
                or o.ndim != 2
                or a.ndim != 2
                or (o.shape[1], a.shape[1]) != (obs_dim, act_dim)
            ):
                raise SystemExit(
                    f"error: {path}:{k} has obs {getattr(o, 'shape', 'dict')} / actions {a.shape}, env needs "
                    f"(L+1, {obs_dim}) / (L, {act_dim}); make state demos for {args.control_mode}"
                )
            o, a = np.asarray(o[:-1], np.float32), np.asarray(a, np.float32)
            o = o if token is None else task_token_obs(o, *token)
            idx = np.minimum(np.arange(len(a))[:, None] + np.arange(args.action_horizon)[None], len(a) - 1)
            obs.append(o), chunks.append(a[idx])
    return torch.as_tensor(np.concatenate(obs)), torch.as_tensor(np.concatenate(chunks))


# ---------------------------------------------------------------- evaluation and checkpoints


@torch.no_grad()
def evaluate(policy, envs: VecEnv, n_episodes: int, C: int, seed: int):
    """Deterministic chains (σ = 0), no partial resets: rounds of N full episodes until each task has
    n_episodes. Returns the task-averaged means and, with several tasks, "{task}/{metric}" too."""
    rows, first = [], True  # (task, return, success_once, success_at_end)
    while min(sum(row[0] == k for row in rows) for k in range(len(envs.tasks))) < n_episodes:
        obs = envs.reset(seed=seed if first else None)
        first = False
        N = obs.shape[0]
        ret = torch.zeros(N, device=obs.device)
        once = torch.zeros(N, dtype=torch.bool, device=obs.device)
        at_end, alive = once.clone(), ~once
        while alive.any():
            x = policy.sample(obs, stochastic=False)[0][:, -1]
            for j in range(C):
                obs, r, term, trunc, success = envs.step(policy.to_env(x[:, j]))
                ret += r * alive
                once |= success & alive
                end = alive & (term | trunc)
                at_end[end] = success[end]
                alive &= ~(term | trunc)
        rows += list(zip(envs.task_of_env, ret.tolist(), once.tolist(), at_end.tolist(), strict=True))
    per_task = {}
    for k, task in enumerate(envs.tasks):
        ret, once, at_end = np.array([row[1:] for row in rows if row[0] == k][:n_episodes], np.float64).T
        per_task[task] = {"return": ret.mean(), "success_once": once.mean(), "success_at_end": at_end.mean()}
    stats = {key: np.mean([s[key] for s in per_task.values()]) for key in per_task[envs.tasks[0]]}
    if len(envs.tasks) > 1:
        stats |= {f"{task}/{key}": v for task, s in per_task.items() for key, v in s.items()}
    return stats


def save_checkpoint(path, policy, critic, optimizer, args, global_step, iteration):
    path.parent.mkdir(parents=True, exist_ok=True)
    expert = policy.expert
    state = {
        "policy": policy.state_dict(),
        "critic": critic.state_dict(),
        "optimizer": optimizer.state_dict(),
        "args": asdict(args),
        "backbone_config": expert.lm.config.to_dict() if isinstance(expert, TransformerExpert) else None,
        "global_step": global_step,
        "iteration": iteration,
    }
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)  # a crash never leaves a half-written checkpoint


def load_checkpoint(args: Args):
    if not Path(args.checkpoint).exists():
        raise SystemExit(f"error: checkpoint {args.checkpoint} not found")
    try:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        raise SystemExit(
            f"error: cannot read checkpoint {args.checkpoint} ({type(e).__name__}); pass a flow_noise_ppo .pt"
        ) from None
    if not isinstance(ckpt, dict) or "policy" not in ckpt:
        raise SystemExit(f"error: {args.checkpoint} is not a flow_noise_ppo checkpoint")
    for key in ("env_id", "backbone", "action_horizon"):
        if ckpt["args"][key] != getattr(args, key):
            raise SystemExit(
                f"error: checkpoint has --{key.replace('_', '-')} {ckpt['args'][key]}, "
                f"this run {getattr(args, key)}; pass the same value"
            )
    return ckpt


def restore_checkpoint(ckpt, policy, critic, optimizer, args: Args):
    try:
        policy.load_state_dict(ckpt["policy"])
        critic.load_state_dict(ckpt["critic"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(
            f"error: checkpoint does not fit this model ({str(e).splitlines()[0][:120]})"
        ) from None
    # the optimizer state carries the saved run's learning rates: this run's flags win (RL from an SFT ckpt)
    lrs = (args.learning_rate, args.critic_learning_rate)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


# ---------------------------------------------------------------- main


def main(args: Args):
    tasks = args.env_id.split(",")
    for task in tasks:
        if not is_maniskill(task) and task not in gym.registry:
            raise SystemExit(f"error: unknown env id {task!r}; try PickCube-v1, PushCube-v1 or Hopper-v5")
    if len(set(tasks)) < len(tasks) or min(args.num_envs, args.num_eval_envs) < len(tasks):
        raise SystemExit(
            f"error: {len(tasks)} tasks need distinct ids and --num-envs, --num-eval-envs >= {len(tasks)}"
        )
    if not 1 <= args.num_action_chunks <= args.action_horizon:
        raise SystemExit(f"error: --num-action-chunks must be in [1, --action-horizon={args.action_horizon}]")
    if args.evaluate and args.checkpoint is None:
        raise SystemExit("error: --evaluate needs --checkpoint PATH")
    if args.backbone_path is not None and not Path(args.backbone_path, "config.json").exists():
        raise SystemExit(
            f"error: --backbone-path {args.backbone_path} has no config.json (save one with save_pretrained)"
        )
    demo_paths = args.demo_path.split(",") if args.demo_path else []
    if demo_paths and len(demo_paths) != len(tasks):
        raise SystemExit(f"error: {len(tasks)} tasks need {len(tasks)} comma-separated --demo-path files")
    for path, task in zip(demo_paths, tasks, strict=False):
        check_demo_file(path, task, args.control_mode)
    ckpt = load_checkpoint(args) if args.checkpoint else None

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path("runs", run_name)
    ckpt_path = run_dir / "flow_noise_ppo.pt"
    video_dir = str(run_dir / "videos") if args.capture_video else None

    dims = task_obs_dims(args, tasks) if len(tasks) > 1 else None  # one task: no padding, no token
    tokens = [(k, len(tasks), max(dims)) for k in range(len(tasks))] if dims else [None]
    eval_envs = VecEnv(args, args.num_eval_envs, device, video_dir, tokens)
    envs = None if args.evaluate else VecEnv(args, args.num_envs, device, tokens=tokens)
    N, C, K, H = args.num_envs, args.num_action_chunks, args.denoising_steps, args.action_horizon
    D, A = eval_envs.obs_dim, eval_envs.act_dim
    # SFT data: the union of the tasks' demos, each in its task's observation layout
    parts = [
        load_demos(p, args, d, A, tok) for p, d, tok in zip(demo_paths, dims or [D], tokens, strict=False)
    ]
    demos = tuple(torch.cat(x) for x in zip(*parts, strict=True)) if parts else None

    policy = FlowNoisePolicy(
        D, A, H, K, args.sigma_min, args.sigma_max, args.backbone, args.backbone_path,
        ckpt["backbone_config"] if ckpt else None,
    ).to(device)  # fmt: skip
    critic = make_critic(D).to(device)
    optimizer = torch.optim.Adam(
        [{"params": policy.parameters(), "lr": args.learning_rate},
         {"params": critic.parameters(), "lr": args.critic_learning_rate}], eps=1e-5,
    )  # fmt: skip
    global_step, start_iteration = 0, 1
    # the env bounds, until SFT narrows them to the demos' range
    policy.act_low.copy_(eval_envs.low)
    policy.act_high.copy_(eval_envs.high)
    if ckpt:
        restore_checkpoint(ckpt, policy, critic, optimizer, args)
        global_step, start_iteration = ckpt["global_step"], ckpt["iteration"] + 1
    mask = executed_mask(H, A, C, device=device)

    if args.evaluate:
        stats = evaluate(policy, eval_envs, args.eval_episodes, C, args.seed + 10_000)
        print(" ".join(f"eval/{k}={v:.3f}" for k, v in stats.items()) + f" episodes={args.eval_episodes}")
        eval_envs.close()
        return stats

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name,
                   save_code=True)  # fmt: skip
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )

    # ---- SFT: few-shot flow matching on the demonstrations
    if demos is not None and ckpt is None:
        obs_d, act_d = demos[0].to(device), demos[1].to(device)
        policy.obs_mean.copy_(obs_d.mean(0))
        policy.obs_std.copy_(obs_d.std(0).clamp_min(1e-2))
        # ManiSkill's planned ee deltas are ~0.02 wide: in env units the K-step ODE could not resolve them
        policy.act_low.copy_(act_d.amin((0, 1)))
        policy.act_high.copy_(torch.maximum(act_d.amax((0, 1)), policy.act_low + 1e-3))
        act_d = 2 * (act_d - policy.act_low) / (policy.act_high - policy.act_low) - 1
        sft_opt = torch.optim.Adam(policy.parameters(), lr=args.sft_lr)
        t0 = time.time()
        for step in range(1, args.sft_steps + 1):
            idx = torch.randint(len(obs_d), (args.sft_batch_size,), device=device)
            loss = policy.sft_loss(obs_d[idx], act_d[idx])
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            if step % 500 == 0 or step == args.sft_steps:
                writer.add_scalar("sft/loss", loss.item(), step)
                print(f"sft step={step} loss={loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        print(f"sft: {len(obs_d)} samples, {args.sft_steps} steps, {time.time() - t0:.1f}s", flush=True)
    if ckpt is None:
        stats = evaluate(policy, eval_envs, args.eval_episodes, C, args.seed + 10_000)
        for k, v in stats.items():
            writer.add_scalar(f"eval/{k}", v, 0)
        print("step=0 (after SFT) " + " ".join(f"eval/{k}={v:.3f}" for k, v in stats.items()), flush=True)
        if args.save_model:
            save_checkpoint(ckpt_path, policy, critic, optimizer, args, 0, 0)

    # ---- PPO on chunk steps
    T = args.num_steps
    batch_size = T * N
    minibatch_size = batch_size // args.num_minibatches
    num_iterations = args.total_timesteps // (batch_size * C)
    obs_buf = torch.zeros(T, N, D, device=device)
    chain_buf = torch.zeros(T, N, K + 1, H, A, device=device)
    logp_buf = torch.zeros((T, N, H, A) if args.logprob_type == "token" else (T, N), device=device)
    rew_buf, done_buf, val_buf = (torch.zeros(T, N, device=device) for _ in range(3))
    ep_ret, ep_success = torch.zeros(N, device=device), torch.zeros(N, dtype=torch.bool, device=device)
    recent_ret, recent_success = [], []

    obs = envs.reset(seed=args.seed)
    start_time, start_step = time.time(), global_step
    for iteration in range(start_iteration, num_iterations + 1):
        for step in range(T):
            with torch.no_grad():
                chain, mu, sigma = policy.sample(obs)
                logp_buf[step] = chain_log_prob(chain, mu, sigma, mask, args.logprob_type)
                val_buf[step] = critic(policy.normalize(obs)).squeeze(-1)
            obs_buf[step], chain_buf[step] = obs, chain
            reward = torch.zeros(N, device=device)
            alive = torch.ones(N, dtype=torch.bool, device=device)
            for j in range(C):  # envs that end inside the chunk idle until it is over, then reset
                next_obs, r, term, trunc, success = envs.step(policy.to_env(chain[:, -1, j]))
                reward += r * alive
                ep_ret += r * alive
                ep_success |= success & alive
                end = alive & (term | trunc)
                if (end & trunc & ~term).any():  # time limit is not failure: bootstrap from the last state
                    with torch.no_grad():
                        v_last = critic(policy.normalize(next_obs)).squeeze(-1)
                    reward += args.gamma * v_last * (end & trunc & ~term)
                for i in end.nonzero()[:, 0].tolist():
                    recent_ret.append(ep_ret[i].item()), recent_success.append(float(ep_success[i]))
                ep_ret[end], ep_success[end] = 0.0, False
                alive &= ~end
            global_step += N * C
            rew_buf[step], done_buf[step] = reward, (~alive).float()
            obs = envs.reset_done(~alive, next_obs)

        with torch.no_grad():
            next_value = critic(policy.normalize(obs)).squeeze(-1)
        advantages, returns = gae(rew_buf, val_buf, done_buf, next_value, args.gamma, args.gae_lambda)

        b_obs, b_chain = obs_buf.flatten(0, 1), chain_buf.flatten(0, 1)
        b_logp, b_adv = logp_buf.flatten(0, 1), advantages.flatten()
        b_ret, b_val = returns.flatten(), val_buf.flatten()
        update_policy = iteration > args.critic_warmup
        t_update = time.time()
        for _epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = perm[start : start + minibatch_size]
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                mu, sigma = policy.chain_gaussians(b_obs[mb], b_chain[mb])
                new_logp = chain_log_prob(b_chain[mb], mu, sigma, mask, args.logprob_type)
                new_v = critic(policy.normalize(b_obs[mb])).squeeze(-1)
                loss, stats = ppo_loss(
                    new_logp, b_logp[mb], mb_adv, new_v, b_val[mb], b_ret[mb],
                    chain_entropy(sigma, mask), mask, args.clip_coef, args.value_clip, args.ent_coef,
                    args.vf_coef, args.huber_delta,
                )  # fmt: skip
                if not update_policy:  # critic warm-up: the value loss alone
                    loss = args.vf_coef * stats["value_loss"]
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(
                    list(policy.parameters()) + list(critic.parameters()), args.max_grad_norm
                )
                optimizer.step()
            if args.target_kl is not None and stats["approx_kl"] > args.target_kl:
                break
        update_time = time.time() - t_update

        var_y = b_ret.var()
        explained_var = (1 - (b_ret - b_val).var() / var_y).item() if var_y > 0 else float("nan")
        sps = int((global_step - start_step) / (time.time() - start_time))
        for k, v in stats.items():
            writer.add_scalar(f"losses/{k}", v.item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("losses/sigma_mean", sigma.mean().item(), global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/update_seconds", update_time, global_step)
        line = f"iter={iteration}/{num_iterations} step={global_step} SPS={sps} update={update_time:.2f}s"
        if recent_ret:
            writer.add_scalar("charts/episodic_return", np.mean(recent_ret), global_step)
            writer.add_scalar("charts/success_once", np.mean(recent_success), global_step)
            line += f" return={np.mean(recent_ret):.3f} success={np.mean(recent_success):.3f}"
            recent_ret, recent_success = [], []
        print(line + f" kl={stats['approx_kl'].item():.4f} sigma={sigma.mean().item():.3f}", flush=True)

        if iteration % args.eval_every == 0 or iteration == num_iterations:
            ev = evaluate(policy, eval_envs, args.eval_episodes, C, args.seed + 10_000)
            for k, v in ev.items():
                writer.add_scalar(f"eval/{k}", v, global_step)
            print(f"step={global_step} " + " ".join(f"eval/{k}={v:.3f}" for k, v in ev.items()), flush=True)
        if args.save_model and iteration % args.checkpoint_every == 0:
            save_checkpoint(ckpt_path, policy, critic, optimizer, args, global_step, iteration)

    if args.save_model:
        save_checkpoint(ckpt_path, policy, critic, optimizer, args, global_step, num_iterations)
        print(f"model saved to {ckpt_path}")
    envs.close(), eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

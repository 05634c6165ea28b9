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
from typing import Literal, NoReturn

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
    seed: int | None = None
    """1 for a new run; with --checkpoint, the checkpoint's seed"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and CUDA exists, run the networks (and with --sim-backend auto the simulator) on the GPU"""
    track: bool = False
    """if toggled, track the run with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to runs/{run_name}/videos"""
    save_model: bool = True
    """save runs/{run_name}/ckpt.pt at every evaluation and at the end, and sft.pt after SFT"""
    checkpoint: str | None = None
    """ckpt.pt or sft.pt to start from (model, optimiser, normalisation, step, RNG state); SFT is skipped"""
    evaluate: bool = False
    """with --checkpoint: only evaluate it, print the result and write it to <checkpoint>.eval.json"""

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
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = "auto"
    """auto: physx_cuda when --cuda and a GPU exist, else physx_cpu; ignored for gymnasium/MuJoCo ids"""
    vector_env: Literal["auto", "gymnasium", "maniskill"] = "auto"
    """gymnasium: one simulator per process in gymnasium's AsyncVectorEnv (CPU); maniskill: ManiSkill's
    batched env in ManiSkillVectorEnv, the GPU path (on physx_cpu it needs --num-envs 1 and is how the tests
    run the GPU code); auto: maniskill on physx_cuda, gymnasium otherwise"""
    eval_freq: int = 5000
    """evaluate (and checkpoint) every this many env steps, rounded to whole PPO updates"""
    eval_episodes: int = 20
    """episodes per evaluation (per task)"""

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
    learning_rate: float = 3e-5
    """policy learning rate"""
    critic_learning_rate: float = 3e-4
    """critic learning rate"""
    critic_warmup_iters: int = 2
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
    ent_coef: float = 0.005
    """c_H: entropy bonus of the learned noise"""
    vf_coef: float = 0.5
    """c_v: value loss coefficient"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    target_kl: float | None = None
    """stop the epoch loop when approx KL exceeds this"""
    total_timesteps: int = 200_000
    """env steps of RL (SFT steps not counted)"""
    num_steps: int = 100
    """chunk decisions per env per rollout (num_steps * C env steps)"""

    # filled at runtime
    batch_size: int = 0
    """chunk decisions per update (num_envs * num_steps)"""
    minibatch_size: int = 0
    """batch_size // num_minibatches"""
    num_iterations: int = 0
    """PPO updates (total_timesteps // (batch_size * C))"""


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


def policy_loss(new_logp, old_logp, adv, mask, clip_coef: float):
    """Clipped PPO surrogate L_π. Token log-probs (B,H,A) share their chunk's Â and are averaged over the
    mask; chunk log-probs are (B,). Returns (L_π, approx KL, clip fraction)."""
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    if new_logp.dim() == 3:
        adv = adv[:, None, None]
        w = mask.expand_as(new_logp).to(new_logp.dtype)
    else:
        w = torch.ones_like(new_logp)
    pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():
        approx_kl = (((ratio - 1) - logratio) * w).sum() / w.sum()
        clipfrac = (((ratio - 1).abs() > clip_coef).to(w.dtype) * w).sum() / w.sum()
    return (pg * w).sum() / w.sum(), approx_kl, clipfrac


def value_loss(new_v, old_v, returns, value_clip: float = 0.2, huber_delta: float = 10.0):
    """L_V: the larger Huber loss of V and of V clipped to ±value_clip around the rollout's values."""
    v_clipped = old_v + (new_v - old_v).clamp(-value_clip, value_clip)
    return torch.max(
        F.huber_loss(new_v, returns, delta=huber_delta, reduction="none"),
        F.huber_loss(v_clipped, returns, delta=huber_delta, reduction="none"),
    ).mean()


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
            tiny = GPT2Config(vocab_size=1, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
                              eos_token_id=0)  # fmt: skip
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
    def __init__(self, obs_dim, A, H, K, sigma_min, sigma_max, backbone="mlp", backbone_path=None,
                 backbone_config=None):  # fmt: skip
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
    def sample(self, obs, stochastic=True, generator=None):
        """-> chain (B,K+1,H,A), μ and σ (B,K,H,A); deterministic = the plain Euler ODE (evaluation); x_0 from
        `generator` if given."""
        o = self.normalize(obs)
        t = time_grid(self.K, obs.device)
        x = torch.randn(obs.shape[0], self.H, self.A, device=obs.device, generator=generator)
        chain, mus, sigmas = [x], [], []
        for k in range(self.K):
            mu, sigma = self.step_gaussian(x, t[k].expand(x.shape[0]), o)
            x = mu + sigma * torch.randn_like(mu) if stochastic else mu
            chain.append(x)
            mus.append(mu)
            sigmas.append(sigma)
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


# ---------------------------------------------------------------- plumbing: validation, environments, demos


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


def validate(args: Args) -> list[str]:
    """Every flag check, before anything slow; resolves --sim-backend/--vector-env auto and fills the batch
    sizes. Returns the tasks."""
    tasks = args.env_id.split(",")
    checks = [
        (args.num_envs >= 1 and args.num_eval_envs >= 1, "--num-envs and --num-eval-envs must be >= 1"),
        (args.denoising_steps >= 1, "--denoising-steps must be >= 1"),
        (1 <= args.num_action_chunks <= args.action_horizon,
         "--num-action-chunks must be in [1, --action-horizon]"),
        (min(args.num_steps, args.num_minibatches, args.update_epochs) >= 1,
         "--num-steps, --num-minibatches and --update-epochs must be >= 1"),
        (args.total_timesteps >= 0 and args.sft_steps >= 0, "--total-timesteps and --sft-steps must be >= 0"),
        (0 < args.gamma <= 1 and 0 <= args.gae_lambda <= 1, "need 0 < --gamma <= 1, 0 <= --gae-lambda <= 1"),
        (0 < args.sigma_min <= args.sigma_max, "need 0 < --sigma-min <= --sigma-max"),
        (args.eval_freq >= 1 and args.eval_episodes >= 1, "--eval-freq and --eval-episodes must be >= 1"),
        (args.num_demos is None or args.num_demos >= 1, "--num-demos must be >= 1"),
        (len(set(tasks)) == len(tasks), f"--env-id {args.env_id} names a task twice"),
        (min(args.num_envs, args.num_eval_envs) >= len(tasks),
         f"{len(tasks)} tasks need --num-envs and --num-eval-envs >= {len(tasks)}"),
        (not args.evaluate or args.checkpoint is not None, "--evaluate needs --checkpoint PATH"),
        (args.demo_path is None or len(args.demo_path.split(",")) == len(tasks),
         f"{len(tasks)} tasks need {len(tasks)} comma-separated --demo-path files"),
        (args.backbone_path is None or Path(args.backbone_path, "config.json").exists(),
         f"--backbone-path {args.backbone_path} has no config.json (save one with save_pretrained)"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            fail(msg)
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    if args.batch_size % args.num_minibatches or args.minibatch_size < 2:  # a 1-sample minibatch: Â std NaN
        fail(f"--num-envs x --num-steps = {args.batch_size} chunks do not split into --num-minibatches "
             f"{args.num_minibatches} equal minibatches of >= 2")  # fmt: skip
    args.num_iterations = args.total_timesteps // (args.batch_size * args.num_action_chunks)

    maniskill = [is_maniskill(task) for task in tasks]
    if args.sim_backend == "physx_cuda" and not torch.cuda.is_available():
        fail("--sim-backend physx_cuda needs a CUDA GPU; pass --sim-backend physx_cpu")
    if args.sim_backend == "auto":  # physx_cuda runs one scene type per process: multi-task stays on the CPU
        gpu = args.cuda and torch.cuda.is_available() and all(maniskill) and len(tasks) == 1
        args.sim_backend = "physx_cuda" if gpu else "physx_cpu"
    if args.vector_env == "auto":
        args.vector_env = "maniskill" if args.sim_backend == "physx_cuda" else "gymnasium"
    if args.vector_env == "maniskill" and not (all(maniskill) and len(tasks) == 1):
        fail(f"--vector-env maniskill needs one ManiSkill --env-id, not {args.env_id}")
    cpu_batched = args.vector_env == "maniskill" and args.sim_backend == "physx_cpu"
    if cpu_batched and args.num_envs + args.num_eval_envs > 2:
        fail("--vector-env maniskill on physx_cpu runs one env: pass --num-envs 1 --num-eval-envs 1")
    if args.vector_env == "gymnasium" and args.sim_backend == "physx_cuda" and any(maniskill):
        fail("--sim-backend physx_cuda runs in ManiSkill's batched env: pass --vector-env maniskill")
    return tasks


def task_token_obs(obs, task: int, num_tasks: int, pad_to: int) -> np.ndarray:
    """o (..., d) -> õ = [o ; 0 … 0 ; onehot(task)] (..., pad_to + num_tasks): one layout for every task."""
    obs = np.asarray(obs, np.float32)
    out = np.zeros((*obs.shape[:-1], pad_to + num_tasks), np.float32)
    out[..., : obs.shape[-1]] = obs
    out[..., pad_to + task] = 1.0
    return out


def make_maniskill(args: Args, num_envs: int, env_id: str, video_dir=None, sim_backend="physx_cpu"):
    """num_envs ManiSkill envs in one process (one on physx_cpu), batched torch tensors."""
    env = gym.make(
        env_id, num_envs=num_envs, obs_mode="state", control_mode=args.control_mode,
        reward_mode=args.reward_mode, max_episode_steps=args.max_episode_steps or 100,
        render_mode="rgb_array" if video_dir else None, sim_backend=sim_backend,
        render_backend="cpu" if sim_backend == "physx_cpu" else "gpu",
        enhanced_determinism=True,  # else unseeded resets use the process's unseeded torch RNG
    )  # fmt: skip
    if video_dir:
        from mani_skill.utils.wrappers.record import RecordEpisode

        env = RecordEpisode(env, video_dir, save_trajectory=False)
    return env


def make_env(args: Args, env_id: str, maniskill: bool, video_dir: str | None = None, token=None):
    """One env for an AsyncVectorEnv worker; token = (task, num_tasks, pad_to): it returns task_token_obs."""

    def thunk():
        if maniskill:
            import mani_skill.envs  # noqa: F401  (registers the ids in the subprocess)
            from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

            env = CPUGymWrapper(make_maniskill(args, 1, env_id, video_dir))
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
        dims.append(env.observation_space.shape[0])
        spaces.append(env.action_space)
        env.close()
    if any(space != spaces[0] for space in spaces):
        fail(f"the tasks' action spaces differ ({spaces}); pass tasks of one robot")
    return dims


class VecEnv:
    """N envs behind one torch API, without autoreset: episodes reset only when the caller asks."""

    def __init__(self, args: Args, n: int, device, video_dir=None, tokens=(None,)):
        self.device = device
        self.relative = args.relative_reward
        self.prev_r = torch.zeros(n, device=device)  # r_{t-1} of each env, for --relative-reward
        self.tasks = args.env_id.split(",")
        self.task_of_env = [i % len(self.tasks) for i in range(n)]  # round-robin
        self.batched = args.vector_env == "maniskill"
        if self.batched:  # all envs in this process, torch tensors on the simulator's device
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            env = make_maniskill(args, n, args.env_id, video_dir, args.sim_backend)
            self.envs = ManiSkillVectorEnv(env, n, auto_reset=False, ignore_terminations=False,
                                           record_metrics=False)  # fmt: skip
        else:
            ms = [is_maniskill(task) for task in self.tasks]
            thunks = [
                make_env(args, self.tasks[k], ms[k], video_dir if i == 0 else None, tokens[k])
                for i, k in enumerate(self.task_of_env)
            ]
            # one process per env ("spawn": SAPIEN does not survive fork)
            self.envs = gym.vector.AsyncVectorEnv(
                thunks, context="spawn" if any(ms) else "fork",
                autoreset_mode=gym.vector.AutoresetMode.DISABLED,
            )  # fmt: skip
        space = self.envs.single_action_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
            self.envs.close()
            fail(f"{args.env_id} has action space {space}; flow_noise_ppo needs a 1-D Box")
        self.obs_dim = self.envs.single_observation_space.shape[0]
        self.act_dim = space.shape[0]
        self.low = torch.as_tensor(space.low, dtype=torch.float32, device=device)
        self.high = torch.as_tensor(space.high, dtype=torch.float32, device=device)

    def _t(self, x, dtype=torch.float32):
        return torch.as_tensor(x if torch.is_tensor(x) else np.asarray(x), device=self.device).to(dtype)

    def reset(self, seed=None):
        self.prev_r.zero_()
        return self._t(self.envs.reset(seed=seed)[0])

    def step(self, a):
        """env action a -> obs, reward, terminated, truncated, success (all tensors)."""
        a = torch.maximum(torch.minimum(a, self.high), self.low)
        obs, r, term, trunc, info = self.envs.step(a if self.batched else a.cpu().numpy())
        success = info.get("success", np.zeros(len(r), bool))
        r = self._t(r)
        if self.relative:
            r, self.prev_r = r - self.prev_r, r
        return (self._t(obs), r, self._t(term, torch.bool), self._t(trunc, torch.bool),
                self._t(success, torch.bool))  # fmt: skip

    def reset_done(self, done, obs):
        """Resets exactly the envs in the mask done (their next episode from the env's own seeded RNG)."""
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


def read_demos(path, env_id: str, args: Args) -> list[tuple[np.ndarray, np.ndarray]]:
    """Before any env starts: (obs without the last, actions) of the first --num-demos trajectories of an h5
    with traj_i/{obs, actions} whose json sidecar names this env and controller."""
    import h5py

    path = Path(path)
    make = f"make state demos with `bash make_demos.sh {env_id}`"
    if not path.is_file():
        fail(f"demo file {path} not found; {make}")
    meta = path.with_suffix(".json")
    if meta.exists():
        info = json.loads(meta.read_text()).get("env_info", {})
        if info.get("env_id", env_id) != env_id:
            fail(f"demos are for {info['env_id']}, not {env_id}; pass matching --env-id (and order)")
        mode = info.get("env_kwargs", {}).get("control_mode", args.control_mode)
        if mode != args.control_mode:
            fail(f"demos use control mode {mode}; pass --control-mode {mode}")
    trajs = []
    try:
        with h5py.File(path, "r") as f:
            keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k[5:]))
            for k in keys[: args.num_demos]:
                if not (isinstance(f[k], h5py.Group) and "obs" in f[k] and "actions" in f[k]):
                    fail(f"{path}:{k} has no obs and actions; {make}")
                o, a = f[k]["obs"], f[k]["actions"]
                if not isinstance(o, h5py.Dataset) or (o.ndim, a.ndim) != (2, 2):
                    fail(f"{path}:{k} has obs {getattr(o, 'shape', 'dict')} / actions {a.shape}; {make}")
                trajs.append((np.asarray(o[:-1], np.float32), np.asarray(a, np.float32)))
    except OSError as e:  # not HDF5, or truncated
        fail(f"cannot read demo file {path} ({str(e).splitlines()[0][:80]}); {make}")
    if not trajs:
        fail(f"{path} has no traj_i groups; {make}")
    return trajs


def demo_chunks(path, trajs, H: int, obs_dim: int, act_dim: int, token=None):
    """-> obs (N,D), action chunks (N,H,A); chunks past an episode's end repeat its last action.
    token = (task, num_tasks, pad_to): obs become task_token_obs, as the multi-task envs return them."""
    obs, chunks = [], []
    for o, a in trajs:
        if (o.shape[1], a.shape[1]) != (obs_dim, act_dim):
            fail(f"{path} has obs dim {o.shape[1]} / action dim {a.shape[1]}, the env {obs_dim} / {act_dim}: "
                 "make state demos of this env and controller")  # fmt: skip
        obs.append(o if token is None else task_token_obs(o, *token))
        idx = np.minimum(np.arange(len(a))[:, None] + np.arange(H)[None], len(a) - 1)
        chunks.append(a[idx])
    return torch.as_tensor(np.concatenate(obs)), torch.as_tensor(np.concatenate(chunks))


# ---------------------------------------------------------------- evaluation and checkpoints


@torch.no_grad()
def evaluate(policy, envs: VecEnv, n_episodes: int, C: int, seed: int):
    """Noiseless chains, no partial resets: rounds of N full episodes until each task has n_episodes; env i of
    the round that starts at episode j resets with seed + j + i, so with one task episode i starts from the
    reset with seed + i whatever N is (every script evaluates on the same initial states). Returns the
    task-averaged means and, with several tasks, "{task}/{metric}" too. x_0 comes from a generator seeded with
    seed, so a checkpoint's --evaluate repeats the number its run logged and evaluating leaves training's RNG
    alone."""
    rows = []  # (task, return, success_once, success_at_end)
    gen = torch.Generator(policy.obs_mean.device).manual_seed(seed)
    while min(sum(row[0] == k for row in rows) for k in range(len(envs.tasks))) < n_episodes:
        obs = envs.reset(seed=[seed + len(rows) + i for i in range(len(envs.task_of_env))])
        ep = new_episodes(obs.shape[0], obs.device)
        alive = torch.ones_like(ep["success_once"])
        while alive.any():
            x = policy.sample(obs, stochastic=False, generator=gen)[0][:, -1]
            obs = step_chunk(envs, policy.to_env(x[:, :C]), alive, ep)[0]
        rows += list(zip(envs.task_of_env, *(ep[k].tolist() for k in ep), strict=True))
    per_task = {}
    for k, task in enumerate(envs.tasks):
        ret, once, at_end = np.array([row[1:] for row in rows if row[0] == k][:n_episodes], np.float64).T
        per_task[task] = {"return": ret.mean(), "success_once": once.mean(), "success_at_end": at_end.mean()}
    stats = {key: np.mean([s[key] for s in per_task.values()]) for key in per_task[envs.tasks[0]]}
    if len(envs.tasks) > 1:
        stats |= {f"{task}/{key}": v for task, s in per_task.items() for key, v in s.items()}
    return stats


def save_checkpoint(path, policy, critic, optimizer, args: Args, global_step: int, iteration: int):
    """Everything a resume needs, RNG states included; written atomically (tmp file + os.replace)."""
    expert = policy.expert
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip
    state = {"script": "flow_noise_ppo", "policy": policy.state_dict(), "critic": critic.state_dict(),
             "optimizer": optimizer.state_dict(), "args": asdict(args), "global_step": global_step,
             "iteration": iteration, "rng": rng,
             "backbone_config": expert.lm.config.to_dict() if isinstance(expert, TransformerExpert) else None}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    print(f"checkpoint {path}", flush=True)


def load_checkpoint(args: Args):
    path = Path(args.checkpoint)
    ours = "pass a ckpt.pt or sft.pt written by flow_noise_ppo.py"
    if not path.is_file():
        fail(f"checkpoint {path} not found; {ours}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"cannot read checkpoint {path} ({type(e).__name__}); {ours}")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "flow_noise_ppo":
        fail(f"{path} is not a flow_noise_ppo checkpoint; {ours}")
    for key in ("env_id", "backbone", "action_horizon"):
        if ckpt["args"][key] != getattr(args, key):
            flag = key.replace("_", "-")
            fail(f"checkpoint has --{flag} {ckpt['args'][key]}, this run {getattr(args, key)}; pass --{flag} "
                 f"{ckpt['args'][key]}")  # fmt: skip
    return ckpt


def restore_checkpoint(ckpt, policy, critic, optimizer, args: Args):
    try:
        policy.load_state_dict(ckpt["policy"])
        critic.load_state_dict(ckpt["critic"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        fail(f"checkpoint does not fit this model ({str(e).splitlines()[0][:120]})")
    # the optimizer state carries the saved run's learning rates: this run's flags win (RL from an SFT ckpt)
    optimizer.param_groups[0]["lr"] = args.learning_rate
    optimizer.param_groups[1]["lr"] = args.critic_learning_rate
    if ckpt["args"]["seed"] == args.seed:  # the same run continues; another --seed starts its own RNG streams
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])


# ---------------------------------------------------------------- main


def main(args: Args):
    tasks = validate(args)
    ckpt = load_checkpoint(args) if args.checkpoint else None
    demo_paths = args.demo_path.split(",") if args.demo_path else []
    demos = [read_demos(p, task, args) for p, task in zip(demo_paths, tasks, strict=False)]
    num_transitions = sum(len(a) for trajs in demos for _, a in trajs)
    if args.seed is None:
        args.seed = ckpt["args"]["seed"] if ckpt else 1
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    run_dir = Path("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    backend = f"{args.sim_backend}, {args.vector_env}" if is_maniskill(tasks[0]) else args.vector_env
    what = f"evaluate {args.checkpoint}" if args.evaluate else f"run {run_dir}"
    demos_part = f" | demos {num_transitions} transitions" if num_transitions else ""
    print(f"{what} | env {args.env_id} ({backend}) | device {device}{demos_part}", flush=True)
    if not args.evaluate:  # before the video recorder makes run_dir/videos
        try:  # a run started the same second under the same name would overwrite this one's checkpoints
            os.makedirs(run_dir)
        except FileExistsError:
            fail(f"{run_dir} exists: a run with this --exp-name and --seed began the same second; rename it")

    dims = task_obs_dims(args, tasks) if len(tasks) > 1 else None  # one task: no padding, no token
    tokens = [(k, len(tasks), max(dims)) for k in range(len(tasks))] if dims else [None]
    video_dir = str((Path(args.checkpoint).parent if args.evaluate else run_dir) / "videos")
    eval_envs = VecEnv(args, args.num_eval_envs, device, video_dir if args.capture_video else None, tokens)
    envs = None if args.evaluate else VecEnv(args, args.num_envs, device, tokens=tokens)
    demo_files = list(zip(demo_paths, demos, dims or [None], tokens, strict=False))
    try:
        return train(args, ckpt, envs, eval_envs, demo_files, device, run_dir)
    finally:
        eval_envs.close()
        if envs is not None:
            envs.close()


def train(args: Args, ckpt, envs, eval_envs, demo_files, device, run_dir):
    """demo_files: (path, trajectories, the task's obs dim, its task token) per task."""
    N, C, K, H = args.num_envs, args.num_action_chunks, args.denoising_steps, args.action_horizon
    D, A = eval_envs.obs_dim, eval_envs.act_dim
    # SFT data: the union of the tasks' demos, each in its task's observation layout
    parts = [demo_chunks(path, trajs, H, d or D, A, tok) for path, trajs, d, tok in demo_files]
    demos = tuple(torch.cat(x) for x in zip(*parts, strict=True)) if parts else None

    policy = FlowNoisePolicy(
        D, A, H, K, args.sigma_min, args.sigma_max, args.backbone, args.backbone_path,
        ckpt["backbone_config"] if ckpt else None,
    ).to(device)  # fmt: skip
    critic = make_critic(D).to(device)
    groups = [{"params": policy.parameters(), "lr": args.learning_rate},
              {"params": critic.parameters(), "lr": args.critic_learning_rate}]  # fmt: skip
    optimizer = torch.optim.Adam(groups, eps=1e-5)
    global_step, start_iteration = 0, 1
    # the env bounds, until SFT narrows them to the demos' range
    policy.act_low.copy_(eval_envs.low)
    policy.act_high.copy_(eval_envs.high)
    if ckpt:
        restore_checkpoint(ckpt, policy, critic, optimizer, args)
        global_step, start_iteration = ckpt["global_step"], ckpt["iteration"] + 1
    mask = executed_mask(H, A, C, device=device)

    def log_eval(writer=None):
        stats = evaluate(policy, eval_envs, args.eval_episodes, C, args.seed + 10_000)
        for k, v in stats.items() if writer else ():
            writer.add_scalar(f"eval/{k}", v, global_step)
        print(f"eval step {global_step}: " + " ".join(f"{k}={v:.3f}" for k, v in stats.items()), flush=True)
        return stats

    if args.evaluate:
        stats = log_eval()
        out = Path(args.checkpoint).with_suffix(".eval.json")
        out.write_text(json.dumps({"checkpoint": args.checkpoint, "step": global_step, "seed": args.seed,
                                   "episodes": args.eval_episodes, **stats}, indent=1))  # fmt: skip
        print(f"wrote {out}")
        return stats

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args),
                   name=run_dir.name, save_code=True)  # fmt: skip
    writer = SummaryWriter(str(run_dir))
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    last_ckpt = None

    def checkpoint(name, iteration):
        nonlocal last_ckpt
        if args.save_model:
            last_ckpt = run_dir / name
            save_checkpoint(last_ckpt, policy, critic, optimizer, args, global_step, iteration)

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
            if not torch.isfinite(loss):
                fail(f"non-finite SFT loss at SFT step {step}; last good checkpoint: none")
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            if step % 500 == 0 or step == args.sft_steps:
                writer.add_scalar("sft/loss", loss.item(), step)
                print(f"sft step {step}/{args.sft_steps} | loss {loss.item():.4f} | {time.time() - t0:.0f}s",
                      flush=True)  # fmt: skip
        checkpoint("sft.pt", 0)
    if ckpt is None:
        log_eval(writer)
        checkpoint("ckpt.pt", 0)
    else:
        print(f"resumed {args.checkpoint} at step {global_step}", flush=True)

    # ---- PPO on chunk steps
    T, B = args.num_steps, args.batch_size
    eval_iters = max(1, round(args.eval_freq / (B * C)))
    obs_buf = torch.zeros(T, N, D, device=device)
    chain_buf = torch.zeros(T, N, K + 1, H, A, device=device)
    logp_buf = torch.zeros((T, N, H, A) if args.logprob_type == "token" else (T, N), device=device)
    rew_buf, done_buf, val_buf = (torch.zeros(T, N, device=device) for _ in range(3))
    recent_ret, recent_success = [], []
    # after every checkpoint, as a resumed run does: the cut episodes count as truncated (bootstrapped by GAE)
    obs = envs.reset(seed=args.seed + global_step)
    ep = new_episodes(N, device)
    for iteration in range(start_iteration, args.num_iterations + 1):
        t_start, step_start = time.time(), global_step
        for step in range(T):
            with torch.no_grad():
                chain, mu, sigma = policy.sample(obs)
                logp_buf[step] = chain_log_prob(chain, mu, sigma, mask, args.logprob_type)
                val_buf[step] = critic(policy.normalize(obs)).squeeze(-1)
            obs_buf[step] = obs
            chain_buf[step] = chain
            alive = torch.ones(N, dtype=torch.bool, device=device)
            actions = policy.to_env(chain[:, -1, :C])
            next_obs, reward, end_obs, truncated = step_chunk(envs, actions, alive, ep)
            if truncated.any():  # a time limit is not failure: bootstrap from the last state
                with torch.no_grad():
                    reward += args.gamma * critic(policy.normalize(end_obs)).squeeze(-1) * truncated
            recent_ret += ep["return"][~alive].tolist()
            recent_success += ep["success_once"][~alive].float().tolist()
            for v in ep.values():
                v[~alive] = 0
            global_step += N * C
            rew_buf[step] = reward
            done_buf[step] = (~alive).float()
            obs = envs.reset_done(~alive, next_obs)

        with torch.no_grad():
            next_value = critic(policy.normalize(obs)).squeeze(-1)
        advantages, returns = gae(rew_buf, val_buf, done_buf, next_value, args.gamma, args.gae_lambda)

        b_obs, b_chain = obs_buf.flatten(0, 1), chain_buf.flatten(0, 1)
        b_logp, b_adv = logp_buf.flatten(0, 1), advantages.flatten()
        b_ret, b_val = returns.flatten(), val_buf.flatten()
        update_policy = iteration > args.critic_warmup_iters
        t_update = time.time()
        for _epoch in range(args.update_epochs):
            perm = torch.randperm(B, device=device)
            for start in range(0, B, args.minibatch_size):
                mb = perm[start : start + args.minibatch_size]
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                mu, sigma = policy.chain_gaussians(b_obs[mb], b_chain[mb])
                new_logp = chain_log_prob(b_chain[mb], mu, sigma, mask, args.logprob_type)
                new_v = critic(policy.normalize(b_obs[mb])).squeeze(-1)
                pg_loss, approx_kl, clipfrac = policy_loss(new_logp, b_logp[mb], mb_adv, mask, args.clip_coef)
                v_loss = value_loss(new_v, b_val[mb], b_ret[mb])
                entropy = chain_entropy(sigma, mask).mean()
                if update_policy:
                    loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy
                else:  # critic warm-up: the value loss alone
                    loss = args.vf_coef * v_loss
                if not torch.isfinite(loss):
                    terms = {"policy loss": pg_loss, "value loss": v_loss, "entropy": entropy}
                    name = next((k for k, v in terms.items() if not torch.isfinite(v)), "loss")
                    fail(f"non-finite {name} at step {global_step}; last good checkpoint: {last_ckpt}")
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*policy.parameters(), *critic.parameters()], args.max_grad_norm)
                optimizer.step()
            if args.target_kl is not None and approx_kl > args.target_kl:
                break
        update_time = time.time() - t_update

        var_y = b_ret.var()
        explained_var = (1 - (b_ret - b_val).var() / var_y).item() if var_y > 0 else float("nan")
        sps = int((global_step - step_start) / (time.time() - t_start))
        losses = {"policy_loss": pg_loss.item(), "value_loss": v_loss.item(), "entropy": entropy.item(),
                  "approx_kl": approx_kl, "clipfrac": clipfrac, "explained_variance": explained_var,
                  "sigma_mean": sigma.mean()}  # fmt: skip
        for k, v in losses.items():
            writer.add_scalar(f"losses/{k}", float(v), global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/update_time", update_time, global_step)
        eta = (args.num_iterations - iteration) * B * C / max(sps, 1) / 60
        line = f"step {global_step}/{args.num_iterations * B * C} | {sps} steps/s | ETA {eta:.0f}m"
        if recent_ret:
            writer.add_scalar("charts/episodic_return", np.mean(recent_ret), global_step)
            writer.add_scalar("charts/success_once", np.mean(recent_success), global_step)
            line += (f" | train episodes (end at success): return {np.mean(recent_ret):.3f} "
                     f"success {np.mean(recent_success):.3f}")  # fmt: skip
            recent_ret, recent_success = [], []
        print(line + f" | kl {approx_kl.item():.4f} sigma {sigma.mean().item():.3f}", flush=True)

        if iteration % eval_iters == 0 or iteration == args.num_iterations:
            log_eval(writer)
            checkpoint("ckpt.pt", iteration)
            obs = envs.reset(seed=args.seed + global_step)
            ep = new_episodes(N, device)
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

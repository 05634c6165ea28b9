"""ReinFlow: a flow-matching policy behaviour-cloned on demonstrations, then fine-tuned online by PPO
through a learnable noise network (Zhang et al. 2025, "ReinFlow: Fine-tuning Flow Matching Policy with
Online Reinforcement Learning", Sec. 4 and App. B; official code github.com/ReinFlow/ReinFlow).

A policy acts with chunks of Ta actions of dimension Da, flattened into a = x in R^D, D = Ta*Da, [-1, 1]^D.

Pretraining, 1-Rectified Flow (--flow reflow):
    x_0 ~ N(0, I),  x_1 = a (a demo chunk),  t ~ U(0, 1),  x_t = t x_1 + (1 - t) x_0
    L_RF = || v_theta(x_t, t, s) - (x_1 - x_0) ||^2
Pretraining, Shortcut model (--flow shortcut, Frans et al. 2024): v_theta(x, t, s, d) also sees the step
size d; besides L_RF at d = 0 it learns that one step of size 2d equals two steps of size d:
    x' = x_t + d v(x_t, t, s, d),   target(2d) = stopgrad[(v(x_t, t, s, d) + v(x', t + d, s, d)) / 2]
Weights are averaged by an EMA (decay 0.995); fine-tuning starts from the EMA weights.

Sampling with K steps on ONE time grid t_k = k/K, dt = 1/K (shortcut: d = 1/K), used for rollouts,
log-prob recomputation and evaluation alike:
    x_0 ~ N(0, I)
    mu_k      = clip(x_k + v_theta(x_k, t_k, s) dt, -1, 1)
    sigma_k   = sigma_theta'(s, t_k) = exp(l/2),
    l         = log sigma_min^2 + (log sigma_max^2 - log sigma_min^2)(tanh h + 1)/2,  h = noise-net output
    x_{k+1}   = mu_k + sigma_k eps,  eps ~ N(0, I) clipped to [-3, 3];  the action is clip(x_K, -1, 1)
Evaluation runs the deterministic ODE: same grid, x_{k+1} = mu_k (x_0 still drawn from N(0, I)).

Log-likelihood of the whole denoising chain (a Markov chain with Gaussian transitions), normalised by the
(K + 1) D Gaussian terms it sums, as the official code does; the entropy is that of the same Gaussians:
    log pi(x_0:K | s) = [ log N(x_0; 0, I) + sum_k log N(x_{k+1}; mu_k, sigma_k^2) ] / ((K + 1) D)
    H = [ D/2 log(2 pi e) + sum_k sum_i 1/2 log(2 pi e sigma_{k,i}^2) ] / ((K + 1) D)

PPO, one ratio per chunk decision: r = exp(log pi_new - log pi_old) (both clipped to [-c_lp, c_lp]),
    L_pi = E[ max(-A r, -A clip(r, 1 - eps, 1 + eps)) ] - c_H H + c_BC ||ODE_theta(s, 0) - ODE_ref(s, 0)||^2
    L_V  = 1/2 E[(V(s) - R)^2]
with A from GAE(gamma, lambda) over chunk steps whose reward is the chunk's summed reward, scaled by a
running std of discounted returns. sigma_max decays (hold, then cosine) as training goes on.
"""

import functools
import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = "reinflow"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and CUDA exists, use it (and ManiSkill's physx_cuda simulator)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to videos/{run_name}"""
    save_model: bool = True
    """if toggled, save checkpoints (pretrained.pt, then ckpt.pt every eval) to runs/{run_name}"""
    checkpoint: str | None = None
    """a checkpoint of this script: resume training (pretrained -> fine-tune, fine-tune -> continue)"""
    evaluate: bool = False
    """with --checkpoint: only evaluate the checkpoint's policy with the deterministic ODE"""
    collect_demos: int = 0
    """with --checkpoint: roll out the policy for this many episodes and write them to --demo-out (npz)"""
    demo_out: str = "demos/collected.npz"
    """where --collect-demos writes obs, actions, episode_ends, returns"""

    # Environment
    env_id: str = "PickCube-v1"
    """a ManiSkill3 task id (state observations) or a gymnasium MuJoCo id such as Hopper-v5"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller (must match the demos' control mode)"""
    ignore_terminations: bool = True
    """ManiSkill: success does not end an episode (it runs to the time limit, as in ManiSkill's baselines),
    so a dense reward cannot be gamed by delaying success; MuJoCo terminations always apply"""
    max_episode_steps: int | None = None
    """episode length limit; None = the env's default (use 100 on PickCube with motion-planned demos)"""
    num_envs: int = 2
    """parallel environments (CPU: processes; GPU ManiSkill: envs in one process)"""
    num_eval_envs: int = 2
    """parallel evaluation environments"""
    eval_episodes: int = 20
    """episodes per evaluation"""
    eval_freq: int = 10
    """evaluate (and checkpoint) every this many PPO iterations"""

    # Demonstrations and pretraining
    demo_path: str | None = None
    """ManiSkill h5 (+ json sidecar) or npz with obs (N, obs_dim), actions (N, act_dim), episode_ends (E,)"""
    num_demos: int | None = None
    """use only the first num_demos episodes of the demo file"""
    flow: Literal["reflow", "shortcut"] = "reflow"
    """pretraining objective: 1-Rectified Flow or Shortcut model"""
    pretrain_steps: int = 20000
    """gradient steps of behaviour cloning (0: start PPO from a randomly initialised flow policy)"""
    pretrain_batch_size: int = 256
    """minibatch size of behaviour cloning"""
    pretrain_lr: float = 1e-3
    """learning rate of behaviour cloning"""
    ema_decay: float = 0.995
    """EMA decay of the pretrained weights"""
    shortcut_fraction: float = 0.25
    """fraction of each shortcut batch trained on self-consistency targets"""

    # Policy
    horizon: int = 4
    """Ta, actions per chunk (all are executed)"""
    denoising_steps: int = 4
    """K, denoising (Euler) steps of the flow policy"""
    hidden_dim: int = 256
    """width of the 3-layer velocity and critic MLPs"""
    sigma_min: float = 0.10
    """lower bound of the exploration noise std (official MuJoCo value; keep it below the demos' action
    scale: PickCube motion-planned demos move xyz by ~0.05, use 0.02 there)"""
    sigma_max: float = 0.24
    """initial upper bound of the exploration noise std (PickCube: 0.05)"""
    sigma_max_decay_ratio: float = 0.7
    """sigma_max anneals to sigma_min + ratio (sigma_max - sigma_min)"""
    sigma_max_hold_ratio: float = 0.35
    """fraction of iterations at the initial sigma_max before the cosine anneal"""
    eps_clip: float = 3.0
    """the standard-normal noise of each step is clipped to [-eps_clip, eps_clip]"""

    # PPO fine-tuning
    total_timesteps: int = 200_000
    """environment steps of fine-tuning"""
    num_steps: int = 125
    """chunk decisions per env per PPO iteration (env steps = num_steps * horizon)"""
    actor_lr: float = 4.5e-5
    """learning rate of the velocity and noise networks"""
    critic_lr: float = 6.5e-4
    """learning rate of the critic"""
    gamma: float = 0.99
    """discount per chunk step"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    update_epochs: int = 10
    """epochs per PPO iteration"""
    clip_coef: float = 0.01
    """PPO ratio clip"""
    logprob_clip: float | None = None
    """clip normalised chain log-probs to [-c, c] against collapse (official: 1.0 with sigma in [0.1, 0.24]);
    with a small sigma every log-prob exceeds 1 and the clip zeroes the policy gradient, so None = off"""
    ent_coef: float = 0.03
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    bc_coef: float = 0.0
    """weight of the W2 regulariser towards the frozen pretrained ODE policy (0: off)"""
    max_grad_norm: float = 1.0
    """gradient norm clip"""
    target_kl: float = 1.0
    """stop the update epochs when approx KL exceeds this"""
    critic_warmup_iters: int = 2
    """PPO iterations that update only the critic"""
    reward_scale: bool = True
    """divide rewards by a running std of discounted returns"""

    # filled at runtime
    batch_size: int = 0
    minibatch_size: int = 0
    num_iterations: int = 0


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


# ---------------------------------------------------------------- environments
def is_maniskill(env_id: str) -> bool:
    if env_id not in gym.registry:  # importing ManiSkill (seconds) only when gymnasium lacks the id
        import mani_skill.envs  # noqa: F401  registers its ids with gymnasium
    entry = getattr(gym.registry.get(env_id), "entry_point", None)
    return getattr(getattr(entry, "func", entry), "__module__", "").startswith("mani_skill")


EPISODE_KEYS = ("episode_return", "episode_length", "success_once", "success_at_end")


class ChunkWrapper(gym.Wrapper):
    """Executes a chunk of Ta actions in [-1, 1] (stopping at episode end), returns the summed reward and,
    at the episode end, its return, length and success. self.executed holds the chunk's (obs, env action)."""

    def __init__(self, env, horizon: int):
        super().__init__(env)
        self.lo, self.hi = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (horizon, env.action_space.shape[0]), np.float32)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32)

    def reset(self, **kw):
        self.ret, self.len, self.succ = 0.0, 0, False
        self.obs = np.asarray(self.env.reset(**kw)[0], np.float32)
        return self.obs, {}

    def step(self, chunk):
        total, out, self.executed = 0.0, {}, []
        for a in chunk:
            a = self.lo + (np.clip(a, -1, 1) + 1) * (self.hi - self.lo) / 2
            self.executed.append((self.obs, a))
            obs, r, term, trunc, info = self.env.step(a)
            self.obs = np.asarray(obs, np.float32)
            total += float(r)
            self.ret, self.len = self.ret + float(r), self.len + 1
            self.succ |= bool(info.get("success", False))
            if term or trunc:
                end_succ = float(bool(info.get("success", False)))
                out = dict(zip(EPISODE_KEYS, (self.ret, self.len, float(self.succ), end_succ), strict=True))
                break
        return self.obs, total, bool(term), bool(trunc), out


def make_env(
    env_id, control_mode, max_episode_steps, ignore_terminations=False, horizon=0, video_dir=None, gpu_envs=0
):
    """One CPU env with numpy API, chunked when horizon > 0 (AsyncVectorEnv spawns thunks of it); with
    gpu_envs > 0 the raw ManiSkill physx_cuda env holding that many envs in one process."""
    render_mode = "rgb_array" if video_dir else None
    if is_maniskill(env_id):
        from mani_skill.utils.wrappers import RecordEpisode
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        kw = dict(obs_mode="state", control_mode=control_mode, reward_mode="normalized_dense")
        kw |= dict(enhanced_determinism=True)  # else unseeded resets use the worker's unseeded torch RNG
        kw |= dict(max_episode_steps=max_episode_steps) if max_episode_steps else {}
        if gpu_envs:
            kw |= dict(num_envs=gpu_envs, sim_backend="physx_cuda")
        else:
            kw |= dict(sim_backend="physx_cpu", render_backend="cpu")
        env = gym.make(env_id, render_mode=render_mode, **kw)
        if video_dir:
            env = RecordEpisode(env, video_dir, save_trajectory=False, max_steps_per_video=max_episode_steps)
        if gpu_envs:
            return env
        env = CPUGymWrapper(env, ignore_terminations=ignore_terminations)
    else:
        env = gym.make(env_id, max_episode_steps=max_episode_steps, render_mode=render_mode)
        if video_dir:
            env = gym.wrappers.RecordVideo(env, video_dir, episode_trigger=lambda e: True)
    return ChunkWrapper(env, horizon) if horizon else env


class ChunkVecEnv:
    """n chunked envs with same-step autoreset; step takes flat chunks (n, Ta*Da) and returns obs, reward,
    terminated, truncated, final_obs (the true next obs), episodes (list of dicts, with the env index "env").
    CPU: gymnasium vector env of ChunkWrapper envs (ManiSkill: AsyncVectorEnv with spawn, SAPIEN is not
    fork-safe). GPU (ManiSkill physx_cuda): all envs in one process; an env that ends inside a chunk is reset
    by ManiSkill at once and runs the chunk's remaining actions in its next episode; they are excluded from
    the reward."""

    def __init__(self, n, env_kw, gpu, video_dir=None):
        self.gpu, self.n = gpu, n
        if gpu:
            from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

            env = make_env(**env_kw, video_dir=video_dir, gpu_envs=n)
            self.envs = ManiSkillVectorEnv(
                env, n, ignore_terminations=env_kw["ignore_terminations"], record_metrics=True
            )
        else:
            videos = [video_dir] + [None] * (n - 1)  # the first env records
            thunks = [functools.partial(make_env, **env_kw, video_dir=v) for v in videos]
            same_step = gym.vector.AutoresetMode.SAME_STEP
            # one process per simulator; MuJoCo is fast enough in-process
            if n > 1 and is_maniskill(env_kw["env_id"]):
                self.envs = gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=same_step)
            else:
                self.envs = gym.vector.SyncVectorEnv(thunks, autoreset_mode=same_step)
        self.act_shape = (env_kw["horizon"], self.envs.single_action_space.shape[-1])

    def reset(self, seed):
        obs = self.envs.reset(seed=seed)[0]
        return obs.cpu().numpy() if self.gpu else obs

    def step(self, actions):
        if not self.gpu:
            obs, r, term, trunc, info = self.envs.step(actions.reshape(-1, *self.act_shape).cpu().numpy())
            final_obs, episodes = obs.copy(), []
            for i in np.flatnonzero(term | trunc):
                final_obs[i] = info["final_obs"][i]
                episodes.append({k: float(info["final_info"][k][i]) for k in EPISODE_KEYS} | {"env": int(i)})
            return obs, r.astype(np.float32), term, trunc, final_obs, episodes
        a = actions.reshape(-1, *self.act_shape).to(self.envs.device)
        done, term, trunc = (torch.zeros(len(a), dtype=torch.bool, device=a.device) for _ in range(3))
        reward = torch.zeros(len(a), device=a.device)
        final_obs, episodes = None, []
        for i in range(a.shape[1]):
            obs, r, te, tr, info = self.envs.step(a[:, i])
            reward += r * ~done
            new = (te | tr) & ~done
            if final_obs is None:
                final_obs = obs.clone()
            final_obs[~done] = (info["final_observation"] if new.any() else obs)[~done]
            if new.any():
                ep, succ = info["final_info"]["episode"], info["final_info"]["success"]
                cols = (ep["return"], ep["episode_len"], ep["success_once"], succ)
                for j in new.nonzero().flatten().tolist():
                    ep_j = {k: float(c[j]) for k, c in zip(EPISODE_KEYS, cols, strict=True)}
                    episodes.append(ep_j | {"env": j})
            term, trunc, done = term | (te & new), trunc | (tr & new), done | new
        return tuple(x.cpu().numpy() for x in (obs, reward, term, trunc, final_obs)) + (episodes,)

    def close(self):
        self.envs.close()


# ---------------------------------------------------------------- networks
def mlp(sizes, act=nn.Mish):
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), act()]
    return nn.Sequential(*layers[:-1])


class TimeEmbedding(nn.Module):
    """Sinusoidal features of 1000 t, t in [0, 1] (scaled so the fast frequencies separate grid points)."""

    def __init__(self, dim=16):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(10000) * torch.arange(dim // 2) / (dim // 2 - 1)))
        self.net = mlp([dim, 2 * dim, dim])

    def forward(self, t):
        phase = 1000 * t[:, None] * self.freqs
        return self.net(torch.cat([phase.sin(), phase.cos()], -1))


class VelocityNet(nn.Module):
    """v_theta(x, t, s[, d]) on flattened chunks; the shortcut variant also embeds the step size d."""

    def __init__(self, obs_dim, D, hidden, shortcut, time_dim=16):
        super().__init__()
        self.t_emb = TimeEmbedding(time_dim)
        self.d_emb = TimeEmbedding(time_dim) if shortcut else None
        self.net = mlp([D + obs_dim + time_dim * (2 if shortcut else 1), hidden, hidden, hidden, D])

    def forward(self, x, t, s, d):
        te = self.t_emb(t)
        feats = [x, s, te] + ([self.d_emb(d)] if self.d_emb is not None else [])
        return self.net(torch.cat(feats, -1)), te


def squash_sigma(h, sigma_min, sigma_max):
    """tanh squashes the noise net's output into [log sigma_min^2, log sigma_max^2], then sigma = exp(l/2)."""
    lo, hi = 2 * math.log(sigma_min), 2 * math.log(sigma_max)
    return torch.exp(0.5 * (lo + (hi - lo) * (torch.tanh(h) + 1) / 2))


class FlowPolicy(nn.Module):
    def __init__(self, obs_dim, horizon, act_dim, hidden=256, shortcut=False):
        super().__init__()
        self.D = horizon * act_dim
        self.v = VelocityNet(obs_dim, self.D, hidden, shortcut)
        # sigma_theta'(s, t_k) sees the velocity net's time features, detached as in the official code
        self.sigma_net = mlp([16 + obs_dim, 64, 64, self.D], act=nn.Tanh)

    def euler(self, x, k, K, s):
        """mu_k = clip(x_k + v_theta(x_k, t_k, s) dt, -1, 1) on the grid t_k = k/K, and the time features."""
        t = torch.full((x.shape[0],), k / K, dtype=x.dtype, device=x.device)
        v, te = self.v(x, t, s, torch.full_like(t, 1 / K))
        return (x + v / K).clamp(-1, 1), te

    def transition(self, x, k, K, s, sigma_min, sigma_max):
        """mu_k, sigma_k of p(x_{k+1} | x_k, s)."""
        mu, te = self.euler(x, k, K, s)
        return mu, squash_sigma(self.sigma_net(torch.cat([te.detach(), s], -1)), sigma_min, sigma_max)


class Critic(nn.Module):
    def __init__(self, obs_dim, hidden=256):
        super().__init__()
        self.net = mlp([obs_dim, hidden, hidden, hidden, 1])

    def forward(self, s):
        return self.net(s).squeeze(-1)


# ---------------------------------------------------------------- ALGO LOGIC: the math
def chain_log_prob(policy, s, chain, K, sigma_min, sigma_max):
    """Normalised log pi(x_0:K | s) and entropy of the chain (B, K+1, D); see the module docstring."""
    D = chain.shape[-1]
    logp = -0.5 * (chain[:, 0] ** 2).sum(-1) - 0.5 * D * math.log(2 * math.pi)
    entropy = torch.full_like(logp, 0.5 * D * math.log(2 * math.pi * math.e))
    for k in range(K):
        mu, sigma = policy.transition(chain[:, k], k, K, s, sigma_min, sigma_max)
        z = (chain[:, k + 1] - mu) / sigma
        logp = logp + (-0.5 * z**2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        entropy = entropy + (sigma.log() + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    return logp / ((K + 1) * D), entropy / ((K + 1) * D)


@torch.no_grad()
def sample_chain(policy, s, K, sigma_min, sigma_max, deterministic=False, eps_clip=3.0):
    """Runs the K-step chain; returns the chain (B, K+1, D), the action clip(x_K) is chain[:, -1]."""
    x = torch.randn(s.shape[0], policy.D, device=s.device, dtype=s.dtype)
    chain = [x]
    for k in range(K):
        mu, sigma = policy.transition(x, k, K, s, sigma_min, sigma_max)
        x = mu if deterministic else mu + sigma * torch.randn_like(mu).clamp(-eps_clip, eps_clip)
        chain.append(x.clamp(-1, 1) if k == K - 1 else x)
    return torch.stack(chain, 1)


def ode_action(policy, s, K, x0):
    """Deterministic Euler ODE (with gradients), used by the BC regulariser."""
    x = x0
    for k in range(K):
        x = policy.euler(x, k, K, s)[0]
    return x


def rectified_flow_loss(v, s, a):
    x0 = torch.randn_like(a)
    t = torch.rand(a.shape[0], device=a.device)
    xt = t[:, None] * a + (1 - t[:, None]) * x0
    return F.mse_loss(v(xt, t, s, torch.zeros_like(t))[0], a - x0)


def shortcut_loss(v, s, a, fraction=0.25, log2_max_steps=7):
    """L_RF at d = 0 on most of the batch; self-consistency v(x_t,t,2d) = mean of two d-steps on the rest."""
    n_sc = int(a.shape[0] * fraction)
    loss = rectified_flow_loss(v, s[n_sc:], a[n_sc:])
    if n_sc == 0:
        return loss
    s, a = s[:n_sc], a[:n_sc]
    d = 2.0 ** -torch.randint(1, log2_max_steps + 1, (n_sc,), device=a.device).float()  # 2d in {1, ..., 2^-6}
    t = torch.rand(n_sc, device=a.device) * (1 - 2 * d)
    x0 = torch.randn_like(a)
    xt = t[:, None] * a + (1 - t[:, None]) * x0
    with torch.no_grad():
        v1 = v(xt, t, s, d)[0]
        v2 = v(xt + d[:, None] * v1, t + d, s, d)[0]
    return loss + F.mse_loss(v(xt, t, s, 2 * d)[0], (v1 + v2) / 2) * fraction


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef, logprob_clip):
    """Clipped surrogate on normalised chain log-probs; returns loss, ratio, approx KL, clip fraction."""
    if logprob_clip is not None:
        c = logprob_clip
        new_logp, old_logp = new_logp.clamp(-c, c), old_logp.clamp(-c, c)
    logratio = new_logp - old_logp
    ratio = logratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    with torch.no_grad():
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1).abs() > clip_coef).float().mean()
    return loss, ratio, approx_kl, clipfrac


def gae(rewards, values, next_value, dones, gamma, lam):
    """GAE over (T, N) chunk steps; dones[t] = the episode ended at step t (truncations are bootstrapped
    into the reward beforehand)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        nv = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        delta = rewards[t] + gamma * nv * (1 - dones[t]) - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


def sigma_max_schedule(it, n_iters, sigma_min, sigma_max, hold_ratio, decay_ratio):
    """Hold sigma_max, then cosine-anneal it to sigma_min + decay_ratio (sigma_max - sigma_min)."""
    end = sigma_min + decay_ratio * (sigma_max - sigma_min)
    frac = min(max((it - hold_ratio * n_iters) / max((1 - hold_ratio) * n_iters, 1), 0.0), 1.0)
    return end + (sigma_max - end) * 0.5 * (1 + math.cos(math.pi * frac))


class RunningReturnStd:
    """Running variance of discounted returns (per env), for reward scaling."""

    def __init__(self, num_envs, gamma):
        self.ret, self.gamma = np.zeros(num_envs), gamma
        self.mean, self.var, self.count = 0.0, 1.0, 1e-4

    def __call__(self, r, done):
        self.ret = self.ret * self.gamma + r
        b_mean, b_var, b_n = self.ret.mean(), self.ret.var(), len(r)
        delta, tot = b_mean - self.mean, self.count + b_n
        self.mean += delta * b_n / tot
        self.var = (self.var * self.count + b_var * b_n + delta**2 * self.count * b_n / tot) / tot
        self.count = tot
        self.ret[done] = 0.0
        return r / np.sqrt(self.var + 1e-8)


# ---------------------------------------------------------------- demonstrations
def load_demos(path, obs_dim, act_low, act_high, env_id, control_mode, num_demos=None):
    """Returns a list of (obs (L, obs_dim), actions in [-1, 1] (L, act_dim)) episodes."""
    if not os.path.exists(path):
        fail(f"demo file {path} not found (make: bash make_demos.sh {env_id} 100 {control_mode})")
    episodes = []
    if path.endswith(".h5"):
        import h5py

        sidecar = path[:-3] + ".json"
        if not os.path.exists(sidecar):
            fail(f"{sidecar} is missing: ManiSkill demos come as h5 + json (made by make_demos.sh)")
        info = json.load(open(sidecar))["env_info"]
        mode = info["env_kwargs"].get("control_mode")
        if info["env_id"] != env_id or mode != control_mode:
            fail(
                f"demos are for {info['env_id']} with control mode {mode}, but this run is {env_id} with "
                f"{control_mode}: pass matching --env-id/--control-mode or remake the demos"
            )
        with h5py.File(path, "r") as f:
            keys = sorted((k for k in f if k.startswith("traj_")), key=lambda k: int(k.split("_")[1]))
            for k in keys:
                o, a = np.asarray(f[k]["obs"]), np.asarray(f[k]["actions"])
                if o.ndim != 2 or a.ndim != 2 or len(o) != len(a) + 1:
                    fail(
                        f"{path}/{k}: obs {o.shape}, actions {a.shape} must be (L+1, obs_dim), (L, act_dim)"
                        " (state obs: replay with -o state)"
                    )
                episodes.append((o[:-1], a))
    elif path.endswith(".npz"):
        d = np.load(path)
        if not {"obs", "actions", "episode_ends"} <= set(d.files):
            fail(f"{path} has keys {d.files}; need obs (N, obs_dim), actions (N, act_dim), episode_ends")
        o, a, ends = d["obs"], d["actions"], d["episode_ends"].astype(int)
        if o.ndim != 2 or a.ndim != 2 or len(o) != len(a) or len(ends) == 0 or ends[-1] != len(o):
            fail(f"{path}: obs {o.shape}, actions {a.shape} must have N rows and episode_ends must end at N")
        episodes = [(o[s:e], a[s:e]) for s, e in zip(np.r_[0, ends[:-1]], ends, strict=True) if e > s]
        episodes = [(eo, (ea - act_low) / (act_high - act_low) * 2 - 1) for eo, ea in episodes]
    else:
        fail(f"{path}: demos must be a ManiSkill .h5 (with .json) or an .npz")
    episodes = episodes[:num_demos]
    o, a = episodes[0]
    if o.shape[1] != obs_dim or a.shape[1] != len(act_low):
        fail(
            f"demos have obs dim {o.shape[1]} and action dim {a.shape[1]}, but {env_id} has {obs_dim} and "
            f"{len(act_low)}: wrong env id, control mode or observation mode?"
        )
    return [(eo.astype(np.float32), np.clip(ea, -1, 1).astype(np.float32)) for eo, ea in episodes]


def chunk_dataset(episodes, horizon):
    """(s_t, a_t:t+Ta) pairs; chunks running past the episode end repeat its last action."""
    S, A = [], []
    for o, a in episodes:
        padded = np.concatenate([a, np.repeat(a[-1:], horizon - 1, 0)])
        idx = np.arange(len(a))[:, None] + np.arange(horizon)[None]
        S.append(o)
        A.append(padded[idx].reshape(len(a), -1))
    return np.concatenate(S), np.concatenate(A)


# ---------------------------------------------------------------- evaluation and checkpoints
def evaluate(policy, envs, obs_norm, K, n_episodes, seed):
    """Mean over the first n_episodes // N (+1) episodes of each env: keeping the first n_episodes to end
    overall would favour short (e.g. fallen) episodes."""
    obs, episodes = envs.reset(seed=seed), []
    quota = [n_episodes // envs.n + (i < n_episodes % envs.n) for i in range(envs.n)]
    while any(quota):
        chain = sample_chain(policy, obs_norm(obs), K, 1.0, 1.0, deterministic=True)
        obs, _, _, _, _, eps = envs.step(chain[:, -1])
        for e in eps:
            if quota[e["env"]] > 0:
                quota[e["env"]] -= 1
                episodes.append(e)
    return {k: float(np.mean([e[k] for e in episodes])) for k in EPISODE_KEYS}


def collect_demos(env, policy, obs_norm, K, n_episodes, seed, out):
    """Rolls out the deterministic ODE policy in one chunked env, writes every executed step to an npz."""
    O, A, ends, rets = [], [], [], []
    for ep in range(n_episodes):
        obs, done = env.reset(seed=seed + ep)[0], False
        while not done:
            chain = sample_chain(policy, obs_norm(obs[None]), K, 1.0, 1.0, deterministic=True)
            obs, _, term, trunc, info = env.step(chain[0, -1].reshape(env.action_space.shape).cpu().numpy())
            O += [o for o, _ in env.executed]
            A += [a.astype(np.float32) for _, a in env.executed]
            done = term or trunc
        ends.append(len(O))
        rets.append(info["episode_return"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez_compressed(out, obs=np.stack(O), actions=np.stack(A), episode_ends=ends, returns=rets)
    print(f"wrote {len(ends)} episodes ({len(O)} steps, mean return {np.mean(rets):.1f}) to {out}")


def load_checkpoint(path, args, obs_dim):
    if not os.path.exists(path):
        fail(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        fail(f"{path} is not a readable torch checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "policy" not in ckpt or "args" not in ckpt:
        fail(f"{path} is not a checkpoint of reinflow.py")
    old = ckpt["args"]
    for key in ("env_id", "flow", "horizon", "hidden_dim"):
        if old[key] != getattr(args, key):
            fail(f"checkpoint was trained with {key}={old[key]} but this run has {getattr(args, key)}")
    if ckpt["obs_mean"].shape[0] != obs_dim:
        fail(f"checkpoint expects obs dim {ckpt['obs_mean'].shape[0]}, env gives {obs_dim} (control mode?)")
    return ckpt


# ---------------------------------------------------------------- main
def main(args: Args):
    if (args.evaluate or args.collect_demos) and not args.checkpoint:
        fail("--evaluate and --collect-demos need --checkpoint PATH")
    maniskill = is_maniskill(args.env_id)
    if args.env_id not in gym.registry:
        fail(f"unknown env id {args.env_id}: use a ManiSkill3 (PickCube-v1) or gymnasium (Hopper-v5) id")
    if args.denoising_steps < 1 or args.horizon < 1 or not 0 < args.sigma_min <= args.sigma_max:
        fail("need --denoising-steps >= 1, --horizon >= 1 and 0 < --sigma-min <= --sigma-max")
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = args.total_timesteps // (args.batch_size * args.horizon)
    if args.minibatch_size < 2:  # advantages are normalised per minibatch
        fail("--num-envs * --num-steps must be at least 2 * --num-minibatches")
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    K, Ta = args.denoising_steps, args.horizon

    # env setup
    env_kw = dict(env_id=args.env_id, control_mode=args.control_mode, horizon=Ta)
    # ignore_terminations is for ManiSkill only: MuJoCo terminations always apply
    env_kw |= dict(max_episode_steps=args.max_episode_steps, ignore_terminations=args.ignore_terminations)
    gpu = maniskill and device.type == "cuda"
    probe = make_env(**dict(env_kw, horizon=0))
    box, obs_shape = probe.action_space, probe.observation_space.shape
    if not isinstance(box, gym.spaces.Box) or len(obs_shape) != 1:
        fail(f"{args.env_id}: needs a flat state observation and a Box action space")
    if len(box.shape) != 1 or not np.isfinite(box.low).all():
        fail(f"{args.env_id} has action space {box}: only bounded 1-D Box is supported")
    obs_dim, act_low, act_high, Da = obs_shape[0], box.low, box.high, box.shape[0]
    probe.close()

    ckpt = load_checkpoint(args.checkpoint, args, obs_dim) if args.checkpoint else None
    policy = FlowPolicy(obs_dim, Ta, Da, args.hidden_dim, args.flow == "shortcut").to(device)
    critic = Critic(obs_dim, args.hidden_dim).to(device)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    finetune_state = dict(critic=critic, actor_opt=actor_opt, critic_opt=critic_opt)  # only in ckpt.pt
    obs_mean, obs_std = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
    phase, start_iter, global_step = "pretrain", 0, 0
    if ckpt is not None:
        policy.load_state_dict(ckpt["policy"])
        obs_mean, obs_std, phase = ckpt["obs_mean"].numpy(), ckpt["obs_std"].numpy(), ckpt["phase"]
        if phase == "finetune":
            for k, m in finetune_state.items():
                m.load_state_dict(ckpt[k])
            start_iter, global_step = ckpt["iteration"], ckpt["global_step"]

    def obs_norm(o):
        return torch.as_tensor(((o - obs_mean) / obs_std).astype(np.float32), device=device)

    if args.evaluate:
        envs = ChunkVecEnv(args.num_eval_envs, env_kw, gpu)
        m = evaluate(policy, envs, obs_norm, K, args.eval_episodes, args.seed)
        envs.close()
        print(json.dumps({"checkpoint": args.checkpoint, "episodes": args.eval_episodes, **m}))
        return m
    if args.collect_demos:  # one env in this process, ManiSkill episodes end at success
        env = make_env(**dict(env_kw, ignore_terminations=False))
        return collect_demos(env, policy, obs_norm, K, args.collect_demos, args.seed, args.demo_out)

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    ckpt_dir = f"runs/{run_name}"
    writer = SummaryWriter(ckpt_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )

    def checkpoint(name, **state):  # atomic: a run killed while saving keeps its previous checkpoint
        state |= dict(policy=policy.state_dict(), args=vars(args), obs_mean=torch.as_tensor(obs_mean))
        torch.save(dict(state, obs_std=torch.as_tensor(obs_std)), f"{ckpt_dir}/{name}.tmp")
        os.replace(f"{ckpt_dir}/{name}.tmp", f"{ckpt_dir}/{name}")

    # ALGO LOGIC: behaviour cloning of the flow policy (skipped when resuming from a checkpoint)
    if phase == "pretrain":
        if args.demo_path and args.pretrain_steps > 0:
            episodes = load_demos(
                args.demo_path, obs_dim, act_low, act_high, args.env_id, args.control_mode, args.num_demos
            )
            S, A = chunk_dataset(episodes, Ta)
            obs_mean, obs_std = S.mean(0), S.std(0) + 1e-3
            S, A = obs_norm(S), torch.as_tensor(A, device=device)
            print(f"pretraining on {len(episodes)} demos, {len(S)} chunks, flow={args.flow}")
            ema = [p.detach().clone() for p in policy.v.parameters()]
            opt = torch.optim.AdamW(policy.v.parameters(), lr=args.pretrain_lr, weight_decay=1e-6)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, args.pretrain_steps, args.pretrain_lr / 10
            )
            start = time.time()
            for step in range(args.pretrain_steps):
                idx = torch.randint(0, len(S), (args.pretrain_batch_size,), device=device)
                if args.flow == "reflow":
                    loss = rectified_flow_loss(policy.v, S[idx], A[idx])
                else:
                    loss = shortcut_loss(policy.v, S[idx], A[idx], args.shortcut_fraction)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    torch._foreach_lerp_(ema, list(policy.v.parameters()), 1 - args.ema_decay)
                if step % 1000 == 0 or step == args.pretrain_steps - 1:
                    writer.add_scalar("losses/bc_loss", loss.item(), step)
                    print(f"pretrain step {step} bc_loss {loss.item():.4f} ({time.time() - start:.0f} s)")
            with torch.no_grad():
                torch._foreach_copy_(list(policy.v.parameters()), ema)
        else:
            print(
                "no --demo-path (or --pretrain-steps 0): PPO starts from a randomly initialised flow policy"
            )
        phase = "pretrained"
        if args.save_model:
            checkpoint("pretrained.pt", phase=phase)
            print(f"saved {ckpt_dir}/pretrained.pt")
    ref_policy = FlowPolicy(obs_dim, Ta, Da, args.hidden_dim, args.flow == "shortcut").to(device)
    ref_policy.load_state_dict(ckpt["ref_policy"] if ckpt and "ref_policy" in ckpt else policy.state_dict())
    ref_policy.requires_grad_(False)

    # ALGO LOGIC: PPO fine-tuning
    video_dir = f"videos/{run_name}" if args.capture_video else None
    eval_envs = ChunkVecEnv(args.num_eval_envs, env_kw, gpu, video_dir)
    envs = ChunkVecEnv(args.num_envs, env_kw, gpu)
    T, N, D = args.num_steps, args.num_envs, Ta * Da
    obs_buf = torch.zeros(T, N, obs_dim, device=device)
    chain_buf = torch.zeros(T, N, K + 1, D, device=device)
    logp_buf, val_buf, rew_buf, done_buf = (torch.zeros(T, N, device=device) for _ in range(4))
    scaler = RunningReturnStd(N, args.gamma)
    if ckpt is not None and "reward_scaler" in ckpt:
        scaler.mean, scaler.var, scaler.count = ckpt["reward_scaler"]
    next_obs = envs.reset(seed=args.seed)
    train_eps, start_time, start_step = [], time.time(), global_step
    curve_csv = f"{ckpt_dir}/eval_curve.csv"
    if not os.path.exists(curve_csv):
        with open(curve_csv, "w") as f:
            f.write("iteration,env_steps,wall_time_s,eval_return,eval_success_once,eval_success_at_end\n")

    def log_eval(it):
        m = evaluate(policy, eval_envs, obs_norm, K, args.eval_episodes, args.seed + 10_000 + it)
        for k, v in m.items():
            writer.add_scalar(f"eval/{k.replace('episode_', '')}", v, global_step)
        print(
            f"eval iter {it} step {global_step}: return {m['episode_return']:.2f} "
            f"success_once {m['success_once']:.2f} success_at_end {m['success_at_end']:.2f}"
        )
        row = [time.time() - start_time, m["episode_return"], m["success_once"], m["success_at_end"]]
        with open(curve_csv, "a") as f:
            f.write(f"{it},{global_step}," + ",".join(f"{x:.4g}" for x in row) + "\n")
        if args.save_model:
            state = {k: m.state_dict() for k, m in (finetune_state | dict(ref_policy=ref_policy)).items()}
            state |= dict(phase="finetune", iteration=it, global_step=global_step)
            checkpoint("ckpt.pt", reward_scaler=(scaler.mean, scaler.var, scaler.count), **state)

    if start_iter == 0:
        log_eval(0)
    for it in range(start_iter, args.num_iterations):
        sig_min, hold, decay = args.sigma_min, args.sigma_max_hold_ratio, args.sigma_max_decay_ratio
        sig_max = sigma_max_schedule(it, args.num_iterations, sig_min, args.sigma_max, hold, decay)
        t_sim, t_iter = 0.0, time.time()
        for t in range(T):
            s = obs_norm(next_obs)
            with torch.no_grad():
                chain = sample_chain(policy, s, K, sig_min, sig_max, eps_clip=args.eps_clip)
                logp_buf[t] = chain_log_prob(policy, s, chain, K, sig_min, sig_max)[0]
                val_buf[t] = critic(s)
            obs_buf[t], chain_buf[t] = s, chain
            t0 = time.time()
            next_obs, r, term, trunc, final_obs, eps = envs.step(chain[:, -1])
            t_sim += time.time() - t0
            global_step += N * Ta  # a chunk cut short by an episode end still counts Ta
            train_eps += eps
            if args.reward_scale:
                r = scaler(r, term | trunc)
            if trunc.any():  # bootstrap time-limit ends with V(true next obs)
                with torch.no_grad():
                    r = r + args.gamma * critic(obs_norm(final_obs)).cpu().numpy() * trunc
            rew_buf[t] = torch.as_tensor(r, device=device)
            done_buf[t] = torch.as_tensor(term | trunc, device=device, dtype=torch.float32)
        with torch.no_grad():
            next_v = critic(obs_norm(next_obs))
        adv_buf, ret_buf = gae(rew_buf, val_buf, next_v, done_buf, args.gamma, args.gae_lambda)

        b_obs, b_chain = obs_buf.reshape(T * N, -1), chain_buf.reshape(T * N, K + 1, D)
        b_logp, b_adv, b_ret, b_val = (x.flatten() for x in (logp_buf, adv_buf, ret_buf, val_buf))
        epochs = itertools.product(range(args.update_epochs), range(0, T * N, args.minibatch_size))
        for epoch, start in epochs:  # stopped early when approx KL exceeds target_kl
            if start == 0:
                perm = torch.randperm(T * N, device=device)
            mb = perm[start : start + args.minibatch_size]
            new_logp, entropy = chain_log_prob(policy, b_obs[mb], b_chain[mb], K, sig_min, sig_max)
            adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
            pg_loss, ratio, approx_kl, clipfrac = ppo_policy_loss(
                new_logp, b_logp[mb], adv, args.clip_coef, args.logprob_clip
            )
            if epoch == 0 and start == 0:  # the mean as in the official code; float32 GEMMs of other
                # batch sizes round differently, so single ratios get a looser bound
                err, worst = (ratio.mean() - 1).abs().item(), (ratio - 1).abs().max().item()
                assert err < 1e-6 and worst < 1e-4, f"first-minibatch ratio off by {err} (max {worst})"
            v_loss = 0.5 * ((critic(b_obs[mb]) - b_ret[mb]) ** 2).mean()
            bc_loss = torch.zeros((), device=device)
            if args.bc_coef > 0:
                z = torch.zeros(len(mb), D, device=device)
                with torch.no_grad():
                    a_ref = ode_action(ref_policy, b_obs[mb], K, z)
                bc_loss = F.mse_loss(ode_action(policy, b_obs[mb], K, z), a_ref)
            loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss + args.bc_coef * bc_loss
            actor_opt.zero_grad()
            critic_opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            critic_opt.step()
            if it >= args.critic_warmup_iters:
                nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                actor_opt.step()
            if approx_kl > args.target_kl:
                break

        y_pred, y_true = b_val.cpu().numpy(), b_ret.cpu().numpy()
        explained_var = 1 - np.var(y_true - y_pred) / (np.var(y_true) + 1e-8)
        sps = int((global_step - start_step) / (time.time() - start_time))
        losses = dict(policy_loss=pg_loss, value_loss=v_loss, entropy=entropy.mean(), approx_kl=approx_kl)
        for k, v in (losses | dict(clipfrac=clipfrac, bc_loss=bc_loss)).items():
            writer.add_scalar(f"losses/{k}", v.item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        for k, v in dict(sigma_max=sig_max, SPS=sps, sim_fraction=t_sim / (time.time() - t_iter)).items():
            writer.add_scalar(f"charts/{k}", v, global_step)
        if train_eps:
            ret = np.mean([e["episode_return"] for e in train_eps])
            succ = np.mean([e["success_once"] for e in train_eps])
            writer.add_scalar("charts/episodic_return", ret, global_step)
            writer.add_scalar("charts/success_once", succ, global_step)
            print(
                f"iter {it + 1}/{args.num_iterations} step {global_step} SPS {sps} return {ret:.2f} "
                f"success {succ:.2f} kl {approx_kl.item():.2e} iter {time.time() - t_iter:.1f}s "
                f"sim {t_sim:.1f}s"
            )
            train_eps = []
        if (it + 1) % args.eval_freq == 0 or it + 1 == args.num_iterations:
            log_eval(it + 1)

    envs.close()
    eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

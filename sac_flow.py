"""SAC Flow: soft actor-critic with a flow-matching policy, trained end to end (CleanRL style, one file).

Paper: Zhang, Yu, Zhang et al. 2025, "SAC Flow: Sample-Efficient Reinforcement Learning of Flow-Based
Policies via Velocity-Reparameterized Sequential Modeling" (Sec. 4: flow rollout as a recurrent network,
Flow-G / Flow-T; Sec. 5: noise-augmented rollout and SAC losses; offline-to-online with a BC term).
Official code: github.com/Elessar123/SAC-FLOW (checked for the forms below; differences are noted).

Policy: K Euler steps, t_k = k/K, Δt = 1/K, from x_0 ~ N(0, I), with Gaussian noise added at each step
(the noise-augmented rollout, which makes every transition Gaussian):
    μ_k     = x_k + Δt · v_θ(t_k, x_k, s)
    x_{k+1} = μ_k + σ_θ(s) ⊙ ε_k,     ε_k ~ N(0, I)
    a       = c ⊙ tanh(x_K) + b         (c, b: half range and centre of the action box)
with σ_θ(s) = exp(log σ_min + (log σ_max − log σ_min)(tanh(·) + 1)/2), learned and shared by the K steps
(as the official Flow-G code). The velocity v_θ comes in three forms (--velocity):
    naive: v_θ = h_k                                               plain flow policy (unstable baseline)
    g:     v_θ = g_k ⊙ (ĉ_k − x_k),  [g_k logit, ĉ_k] = h_k        Flow-G, gated like a GRU cell; the gate
           starts open (zero kernel, bias 5, as the official code)
    where h_k = W_o SiLU(e_s + W_x [x_k, t_k]) is one hidden layer per step (the official gate and candidate
    nets have one) and e_s = W_s SiLU(W_f s) is computed once per rollout, so a step costs little more than
    its small matmuls: a K = 4 SAC update is ~1.3x a Gaussian one (bench/sac_flow_speed.py).
    t:     v_θ = W_o LN(z_k), z_k = W_x [x_k, t_k] passed once per step through a pre-norm decoder block
           z += SelfAttn(LN z); z += CrossAttn(LN z, e_s); z += FFN(LN z), e_s an encoding of s (Flow-T)
Log-likelihood of the sampled action (exact, because each step is Gaussian):
    log π(a|s) = log N(x_0; 0, I) + Σ_k log N(x_{k+1}; μ_k, σ² I) − Σ_i log(c_i (1 − tanh²(x_K,i)))
(the official Flow-T code scores the velocity noise ε_k, which leaves out −log(Δt σ); we use the form above
for all three velocities.)
SAC (Haarnoja et al. 2018, with the twin-Q and α-tuning of CleanRL's sac_continuous_action.py):
    y       = r + γ (1 − d) (min_j Q̄_j(s', a') − α log π(a'|s')),   a' ~ π(·|s')   (d = 0 on ManiSkill, where
              a termination is a success: ManiSkill's SAC baseline bootstraps through it too)
    L_Q     = Σ_j E[(Q_j(s, a) − y)²]
    L_π     = E[α log π(ã|s) − min_j Q_j(s, ã)] + β E_demo[‖ã(s_d) − a_d‖²]   (β > 0 only with demos)
    L_α     = E[−α (log π(ã|s) + H̄)],   H̄ = −|A| by default
Offline-to-online (--demo-path): first pretrain on demos with the flow-matching loss
    L_FM    = E_{t~U[0,1], x_0~N(0,I)} ‖v_θ(t, (1 − t) x_0 + t x_1, s) − (x_1 − x_0)‖²,
    x_1     = atanh((a − b)/c)
(while the critic learns TD on the demos), then run SAC with the demos in the replay buffer and the BC term
β above (the official code's action regulariser, weight 100 there).
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = "sac_flow"
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU exists, use it (ManiSkill then simulates on the GPU, physx_cuda)"""
    track: bool = False
    """if toggled, log to Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to videos/{run_name}"""
    save_model: bool = True
    """if toggled, write runs/{run_name}/ckpt.pt at every evaluation and at the end"""
    checkpoint: str | None = None
    """path of a ckpt.pt to resume training from (with the buffer.pt beside it) or to evaluate (--evaluate)"""
    evaluate: bool = False
    """only evaluate --checkpoint, no training"""
    save_demos: int = 0
    """with --checkpoint: write this many episodes of the noise-free policy to --demo-out"""
    demo_out: str = "demos/sac_flow_demos.npz"
    """npz of obs (N, obs_dim), actions (N, act_dim), episode_ends (E,), returns (E,): reinflow.py reads it"""

    # Environment
    env_id: str = "PickCube-v1"
    """gymnasium MuJoCo id (e.g. Hopper-v5) or ManiSkill3 id (PickCube-v1, PushCube-v1, StackCube-v1, ...)"""
    num_envs: int | None = None
    """parallel envs (default: 2 on CPU for ManiSkill, 512 on GPU, 1 for gymnasium envs)"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller"""
    max_episode_steps: int | None = None
    """episode length (default: the env's own; use 100 on PickCube with motion-planned demos)"""
    total_timesteps: int = 200_000
    """total environment steps"""
    eval_freq: int = 5_000
    """evaluate every this many environment steps"""
    num_eval_episodes: int = 20
    """episodes per evaluation"""

    # SAC
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    gamma: float | None = None
    """discount (default: 0.8 for ManiSkill like its SAC baseline, 0.99 otherwise)"""
    bootstrap_at_done: bool | None = None
    """bootstrap through terminations too (default: on for ManiSkill, as its SAC baseline's "always": there a
    termination is a success, and cutting the return there values success below hovering near the goal; off
    for gymnasium, where a termination is a fall)"""
    tau: float = 0.01
    """target network smoothing"""
    batch_size: int = 256
    """minibatch size"""
    learning_starts: int = 4_000
    """random actions before this many env steps (skipped when resuming or with demos)"""
    utd: float = 0.5
    """gradient updates per environment step"""
    policy_lr: float = 3e-4
    """actor learning rate"""
    q_lr: float = 1e-3
    """critic and α learning rate"""
    alpha_init: float = 1.0
    """initial entropy coefficient α (then tuned)"""
    target_entropy: float | None = None
    """H̄ (default −|A|)"""

    # Flow policy
    velocity: Literal["g", "t", "naive"] = "g"
    """velocity parameterisation: g = Flow-G (gated), t = Flow-T (decoder block), naive = plain MLP"""
    denoising_steps: int = 4
    """K, Euler steps of the flow"""
    hidden: int = 256
    """width of the actor and critic MLPs"""
    transformer_dim: int = 64
    """token width of Flow-T"""
    log_sigma_min: float = -5.0
    """lower bound of log σ"""
    log_sigma_max: float = 2.0
    """upper bound of log σ"""

    # Offline-to-online
    demo_path: str | None = None
    """ManiSkill demo .h5 (with its .json): pretrain with flow matching, then SAC with a BC term"""
    pretrain_steps: int = 5_000
    """flow-matching (actor) + TD (critic) updates on the demos before going online"""
    bc_coef: float = 1.0
    """β, weight of the BC regulariser during online SAC"""


# ---------------------------------------------------------------------------------------------------------
# Environments
def is_maniskill(env_id: str) -> bool:
    entry = getattr(gym.registry.get(env_id), "entry_point", "")
    entry = getattr(entry, "func", entry)  # ManiSkill registers functools.partial(mani_skill...make)
    return "mani_skill" in (entry if isinstance(entry, str) else entry.__module__)


def make_env(args: Args, evaluation: bool, run_name: str, video: bool = False):
    maniskill = is_maniskill(args.env_id)  # decided here: a spawned worker has not imported mani_skill yet

    def thunk():
        if maniskill:
            import mani_skill.envs  # noqa: F401  (registers the ids in a spawned worker)
            from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

            kw = dict(obs_mode="state", sim_backend="physx_cpu", render_backend="cpu")
            kw |= dict(enhanced_determinism=True)  # else unseeded resets use the worker's unseeded torch RNG
            env = gym.make(
                args.env_id,
                control_mode=args.control_mode,
                reward_mode="normalized_dense",
                render_mode="rgb_array" if video else None,
                **kw,
                **({"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}),
            )
            if video:
                from mani_skill.utils.wrappers import RecordEpisode

                env = RecordEpisode(env, f"videos/{run_name}", save_trajectory=False)
            # eval episodes run to the time limit (no reset on success), as ManiSkill's baselines
            return CPUGymWrapper(env, ignore_terminations=evaluation)
        env = gym.make(
            args.env_id,
            render_mode="rgb_array" if video else None,
            **({"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}),
        )
        if video:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}")
        return env

    return thunk


def make_envs(args: Args, n: int, evaluation: bool, run_name: str, gpu: bool):
    if gpu and is_maniskill(args.env_id):
        import mani_skill.envs  # noqa: F401
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = gym.make(
            args.env_id,
            num_envs=n,
            obs_mode="state",
            sim_backend="physx_cuda",
            control_mode=args.control_mode,
            reward_mode="normalized_dense",
            enhanced_determinism=True,
            **({"max_episode_steps": args.max_episode_steps} if args.max_episode_steps else {}),
        )
        return ManiSkillVectorEnv(env, n, ignore_terminations=evaluation, record_metrics=True)
    thunks = [
        make_env(args, evaluation, run_name, video=evaluation and args.capture_video and i == 0)
        for i in range(n)
    ]
    mode = gym.vector.AutoresetMode.NEXT_STEP if evaluation else gym.vector.AutoresetMode.SAME_STEP
    if is_maniskill(args.env_id) and n > 1:  # physx_cpu: one sim per process; fork hangs after SAPIEN init
        return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(thunks, autoreset_mode=mode)


def np_(x) -> np.ndarray:
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


# ---------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the math, as pure functions of tensors
def normal_log_prob(x: torch.Tensor, mean, std) -> torch.Tensor:
    """log N(x; mean, std² I), summed over the last (action) dimension."""
    std = torch.as_tensor(std, dtype=x.dtype)
    return (-0.5 * ((x - mean) / std) ** 2 - torch.log(std) - 0.5 * np.log(2 * np.pi)).sum(-1)


def chain_log_prob(xs: torch.Tensor, mus: torch.Tensor, sigma) -> torch.Tensor:
    """log N(x_0; 0, I) + Σ_k log N(x_{k+1}; μ_k, σ² I).  xs: (K+1, B, d), mus: (K, B, d)."""
    return normal_log_prob(xs[0], 0.0, 1.0) + normal_log_prob(xs[1:], mus, sigma).sum(0)


def squash(x_K: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = c tanh(x_K) + b and log|det da/dx_K| = Σ_i log(c_i (1 − tanh²(x_K,i)))."""
    # log(1 − tanh² x) = 2 (log 2 − x − softplus(−2x)), stable for large |x|
    log_det = (torch.log(c) + 2 * (np.log(2) - x_K - F.softplus(-2 * x_K))).sum(-1)
    return c * torch.tanh(x_K) + b, log_det


def policy_log_prob(xs, mus, sigma, c) -> torch.Tensor:
    """log π(a|s) of the noise-augmented rollout, a = c tanh(x_K) + b."""
    return chain_log_prob(xs, mus, sigma) - squash(xs[-1], c, torch.zeros_like(c))[1]


def soft_q_target(r, term, gamma, q1_next, q2_next, log_pi_next, alpha):
    """y = r + γ (1 − d) (min_j Q̄_j(s', a') − α log π(a'|s'))."""
    return r + gamma * (1.0 - term) * (torch.min(q1_next, q2_next) - alpha * log_pi_next)


def critic_loss(q1, q2, y):
    return F.mse_loss(q1, y) + F.mse_loss(q2, y)


def actor_loss(log_pi, q1, q2, alpha):
    return (alpha * log_pi - torch.min(q1, q2)).mean()


def alpha_loss(log_alpha, log_pi, target_entropy):
    return (-log_alpha.exp() * (log_pi.detach() + target_entropy)).mean()


def flow_matching_loss(policy: "FlowPolicy", s, a, x_0, t):
    """E ‖v_θ(t, (1 − t) x_0 + t x_1, s) − (x_1 − x_0)‖², with x_1 = atanh((a − b)/c) the pre-tanh action."""
    x_1 = torch.atanh(((a - policy.b) / policy.c).clamp(-0.99, 0.99))
    v = policy.velocity(t, (1 - t) * x_0 + t * x_1, policy.encode(s)[0])
    return ((v - (x_1 - x_0)) ** 2).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------
# Networks
class FlowPolicy(nn.Module):
    def __init__(
        self, obs_dim, act_dim, velocity, K, hidden, t_dim, c, b, log_sigma_min=-5.0, log_sigma_max=2.0
    ):
        super().__init__()
        self.kind, self.K, self.log_sigma_min, self.log_sigma_max = velocity, K, log_sigma_min, log_sigma_max
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float32))
        self.register_buffer("b", torch.as_tensor(b, dtype=torch.float32))
        width = t_dim if velocity == "t" else hidden
        self.f_s = nn.Sequential(nn.Linear(obs_dim, hidden), nn.SiLU())
        self.sigma_head = nn.Linear(hidden, act_dim)
        # the state's contribution to the per-step input: computed once per rollout, not K times
        self.W_s = nn.Linear(hidden, width)
        self.W_x = nn.Linear(act_dim + 1, width, bias=False)  # [x_k, t_k]
        if velocity == "t":
            self.ln = nn.ModuleList(nn.LayerNorm(width) for _ in range(4))
            self.self_attn = nn.MultiheadAttention(width, 4, batch_first=True)
            self.cross_attn = nn.MultiheadAttention(width, 4, batch_first=True)
            self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            self.W_o = nn.Linear(width, act_dim)
        else:
            out = 2 * act_dim if velocity == "g" else act_dim
            self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(width, out))  # SiLU then W_o
            if velocity == "g":  # gate starts open, g_k ≈ 1 (official code: zero kernel, bias 5)
                nn.init.zeros_(self.mlp[-1].weight[:act_dim])
                nn.init.constant_(self.mlp[-1].bias[:act_dim], 5.0)

    def encode(self, s):
        """State features used by all K steps: e_s = W_s SiLU(W_f s) and σ(s)."""
        f = self.f_s(s)
        u = torch.tanh(self.sigma_head(f))
        log_sigma = self.log_sigma_min + 0.5 * (self.log_sigma_max - self.log_sigma_min) * (u + 1)
        return self.W_s(f), log_sigma.exp()

    def velocity(self, t, x, e_s):
        """v_θ(t, x, s) for the chosen parameterisation; t: (B, 1) or a float."""
        t = torch.as_tensor(t, dtype=x.dtype).expand(*x.shape[:-1], 1)
        h = self.W_x(torch.cat([x, t], -1))
        if self.kind == "t":
            z, mem = h.unsqueeze(1), e_s.unsqueeze(1)  # one action-time token attending to one state token
            q = self.ln[0](z)
            z = z + self.self_attn(q, q, q, need_weights=False)[0]
            z = z + self.cross_attn(self.ln[1](z), mem, mem, need_weights=False)[0]
            z = z + self.ffn(self.ln[2](z))
            return self.W_o(self.ln[3](z.squeeze(1)))
        out = self.mlp(e_s + h)
        if self.kind == "naive":
            return out
        gate_logit, c_hat = out.chunk(2, -1)
        return torch.sigmoid(gate_logit) * (c_hat - x)

    def rollout(self, s, eps, deterministic=False):
        """Noise-augmented rollout; eps: (K+1, B, d) standard normal (eps[0] = x_0). Returns xs, mus, σ."""
        e_s, sigma = self.encode(s)
        xs, mus, dt = [eps[0]], [], 1.0 / self.K
        for k in range(self.K):
            mu = xs[-1] + dt * self.velocity(k * dt, xs[-1], e_s)
            mus.append(mu)
            xs.append(mu if deterministic else mu + sigma * eps[k + 1])
        return torch.stack(xs), torch.stack(mus), sigma

    def forward(self, s, eps=None, deterministic=False):
        """Samples a ~ π(·|s) and returns (a, log π(a|s))."""
        if eps is None:
            eps = torch.randn(self.K + 1, s.shape[0], self.c.shape[0], device=s.device, dtype=s.dtype)
        xs, mus, sigma = self.rollout(s, eps, deterministic)
        a, _ = squash(xs[-1], self.c, self.b)
        return a, policy_log_prob(xs, mus, sigma, self.c)


class SoftQ(nn.Module):
    """Twin Q_1, Q_2: CleanRL's SoftQNetwork with LayerNorm after each hidden layer (ManiSkill's SAC baseline
    uses q_layer_norm=True by default)."""

    def __init__(self, obs_dim, act_dim, hidden):
        super().__init__()
        self.qs = nn.ModuleList(
            nn.Sequential(
                nn.Linear(obs_dim + act_dim, hidden),
                nn.LayerNorm(hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.LayerNorm(hidden),
                nn.ReLU(),
                nn.Linear(hidden, 1),
            )
            for _ in range(2)
        )

    def forward(self, s, a):
        sa = torch.cat([s, a], -1)
        return self.qs[0](sa).squeeze(-1), self.qs[1](sa).squeeze(-1)


class ReplayBuffer:
    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity, self.size, self.pos, self.device = capacity, 0, 0, device
        z = lambda *shape: torch.zeros(capacity, *shape, device=device)  # noqa: E731
        self.s, self.a, self.r, self.s2, self.d = z(obs_dim), z(act_dim), z(), z(obs_dim), z()

    def add(self, s, a, r, s2, d):
        idx = (self.pos + torch.arange(len(s))) % self.capacity
        for buf, x in ((self.s, s), (self.a, a), (self.r, r), (self.s2, s2), (self.d, d)):
            buf[idx.to(self.device)] = torch.as_tensor(
                np.asarray(x) if not torch.is_tensor(x) else x, dtype=torch.float32, device=self.device
            )
        self.pos, self.size = (self.pos + len(s)) % self.capacity, min(self.size + len(s), self.capacity)

    def sample(self, n):
        i = torch.randint(0, self.size, (n,), device=self.device)
        return self.s[i], self.a[i], self.r[i], self.s2[i], self.d[i]

    def state_dict(self):
        """The stored transitions, oldest first (pos is the oldest once the buffer has wrapped)."""
        i = (torch.arange(self.size) + self.pos) % max(self.size, 1)
        return {k: getattr(self, k)[i.to(self.device)].cpu() for k in ("s", "a", "r", "s2", "d")}

    def load_state_dict(self, d):
        self.add(*(d[k][-self.capacity :] for k in ("s", "a", "r", "s2", "d")))


# ---------------------------------------------------------------------------------------------------------
# Demos, checkpoints, evaluation
def load_demos(path: str, env_id: str, control_mode: str, obs_dim: int, act_dim: int):
    """ManiSkill trajectory h5 + json sidecar -> (s, a, r, s', d) arrays; checks they fit the env."""
    import h5py

    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(path) or not os.path.exists(sidecar):
        raise SystemExit(
            f"error: demo file {path} or its sidecar {sidecar} not found; make demos with make_demos.sh"
        )
    info = json.load(open(sidecar))["env_info"]
    if info["env_id"] != env_id or info["env_kwargs"].get("control_mode") != control_mode:
        raise SystemExit(
            f"error: demos are for {info['env_id']} / {info['env_kwargs'].get('control_mode')}, "
            f"not {env_id} / {control_mode}; pass matching --env-id and --control-mode"
        )
    out = {k: [] for k in ("s", "a", "r", "s2", "d")}
    with h5py.File(path, "r") as f:
        for name in f:
            tr = f[name]
            obs, act = np.asarray(tr["obs"]), np.asarray(tr["actions"])
            if (
                obs.ndim != 2
                or act.ndim != 2
                or obs.shape[1] != obs_dim
                or act.shape[1] != act_dim
                or len(obs) != len(act) + 1
            ):
                raise SystemExit(
                    f"error: {path}/{name} has obs {obs.shape} and actions {act.shape}, but the "
                    f"env needs obs (L+1, {obs_dim}) and actions (L, {act_dim}); use state demos"
                )
            out["s"].append(obs[:-1]), out["s2"].append(obs[1:]), out["a"].append(act)
            (
                out["r"].append(np.asarray(tr["rewards"])),
                out["d"].append(np.asarray(tr["terminated"], np.float32)),
            )
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a broken file


def save_checkpoint(path, step, policy, qf, qf_target, log_alpha, opts, args):
    state = dict(
        step=step,
        args=asdict(args),
        policy=policy.state_dict(),
        qf=qf.state_dict(),
        qf_target=qf_target.state_dict(),
        log_alpha=log_alpha.detach().cpu(),
        opts={k: o.state_dict() for k, o in opts.items()},
    )
    atomic_save(state, path)


def load_checkpoint(path, args: Args):
    if not os.path.exists(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        saved = ckpt["args"]
    except Exception as e:
        raise SystemExit(f"error: {path} is not a sac_flow.py checkpoint ({type(e).__name__})") from None
    for key in ("env_id", "velocity", "denoising_steps", "hidden", "transformer_dim", "control_mode"):
        if saved.get(key) != getattr(args, key):
            raise SystemExit(
                f"error: checkpoint {path} has {key}={saved.get(key)!r} but this run has "
                f"{getattr(args, key)!r}; pass --{key.replace('_', '-')} {saved.get(key)}"
            )
    return ckpt


@torch.no_grad()
def evaluate(policy, envs, n_episodes, device, seed, episodes=None):
    """Runs n_episodes with the noise-free flow (x_{k+1} = μ_k); returns mean return, success_once/at_end.
    If `episodes` is a list, each episode's (obs, actions, return) is appended to it."""
    returns, once, at_end, trajs = [], [], [], []
    while len(returns) < n_episodes:
        obs, _ = envs.reset(seed=seed + len(returns))
        n = len(np_(obs))
        ret, done, s_once, s_end = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        steps = [([], []) for _ in range(n)]
        while not done.all():
            a, _ = policy(torch.as_tensor(np_(obs), dtype=torch.float32, device=device), deterministic=True)
            if episodes is not None:
                o_np, a_np = np_(obs), np_(a)
                for i in np.flatnonzero(~done):
                    steps[i][0].append(o_np[i]), steps[i][1].append(a_np[i])
            obs, r, term, trunc, info = envs.step(
                a if envs.__class__.__name__ == "ManiSkillVectorEnv" else np_(a)
            )
            ret += np_(r) * ~done
            if "success" in info:
                s = np_(info["success"]).astype(bool)
                s_once |= s & ~done
                s_end = np.where(done, s_end, s)
            done |= np_(term).astype(bool) | np_(trunc).astype(bool)
        returns, once, at_end = returns + list(ret), once + list(s_once), at_end + list(s_end)
        if episodes is not None:
            trajs += [(np.stack(o), np.stack(a), g) for (o, a), g in zip(steps, ret, strict=True)]
    if episodes is not None:
        episodes += trajs[:n_episodes]
    return np.mean(returns[:n_episodes]), np.mean(once[:n_episodes]), np.mean(at_end[:n_episodes])


# ---------------------------------------------------------------------------------------------------------
def main(args: Args):
    t_launch = time.time()
    if args.env_id not in gym.registry:
        import mani_skill.envs  # noqa: F401  (registers ManiSkill ids)
    if args.env_id not in gym.registry:
        raise SystemExit(
            f"error: unknown env id {args.env_id!r}; try Hopper-v5 (gymnasium) or PickCube-v1 (ManiSkill)"
        )
    maniskill = is_maniskill(args.env_id)
    gpu = args.cuda and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    num_envs = args.num_envs or (512 if gpu and maniskill else 2 if maniskill else 1)
    gamma = args.gamma if args.gamma is not None else (0.8 if maniskill else 0.99)
    bootstrap_at_done = maniskill if args.bootstrap_at_done is None else args.bootstrap_at_done
    stop = 0.0 if bootstrap_at_done else 1.0  # d is multiplied by this in the TD targets
    ckpt = load_checkpoint(args.checkpoint, args) if args.checkpoint else None
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    eval_envs = make_envs(args, args.num_eval_episodes if gpu and maniskill else 1, True, run_name, gpu)
    act_space, obs_space = eval_envs.single_action_space, eval_envs.single_observation_space
    if not isinstance(act_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        raise SystemExit(
            f"error: {args.env_id} has {act_space} actions and {obs_space.shape} observations; "
            "sac_flow.py needs Box actions and flat state observations"
        )
    obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
    lo, hi = np.asarray(act_space.low, np.float32), np.asarray(act_space.high, np.float32)
    demos = (
        load_demos(args.demo_path, args.env_id, args.control_mode, obs_dim, act_dim)
        if args.demo_path
        else None
    )

    policy = FlowPolicy(
        obs_dim,
        act_dim,
        args.velocity,
        args.denoising_steps,
        args.hidden,
        args.transformer_dim,
        (hi - lo) / 2,
        (hi + lo) / 2,
        args.log_sigma_min,
        args.log_sigma_max,
    ).to(device)
    qf = SoftQ(obs_dim, act_dim, args.hidden).to(device)
    qf_target = SoftQ(obs_dim, act_dim, args.hidden).to(device)
    qf_target.load_state_dict(qf.state_dict())
    log_alpha = torch.tensor(np.log(args.alpha_init), device=device, requires_grad=True)
    target_entropy = args.target_entropy if args.target_entropy is not None else -float(act_dim)
    opts = {
        "actor": torch.optim.Adam(policy.parameters(), lr=args.policy_lr),
        "q": torch.optim.Adam(qf.parameters(), lr=args.q_lr),
        "alpha": torch.optim.Adam([log_alpha], lr=args.q_lr),
    }
    start_step = 0
    if ckpt is not None:
        (
            policy.load_state_dict(ckpt["policy"]),
            qf.load_state_dict(ckpt["qf"]),
            qf_target.load_state_dict(ckpt["qf_target"]),
        )
        log_alpha.data.copy_(ckpt["log_alpha"])
        for k, o in opts.items():
            o.load_state_dict(ckpt["opts"][k])
        start_step = ckpt["step"]

    if args.evaluate:
        if ckpt is None:
            raise SystemExit("error: --evaluate needs --checkpoint PATH")
        ret, once, end = evaluate(policy, eval_envs, args.num_eval_episodes, device, args.seed + 10_000)
        print(
            f"eval {args.checkpoint} (step {start_step}): return {ret:.3f} "
            f"success_once {once:.3f} success_at_end {end:.3f}"
        )
        return
    if args.save_demos:
        if ckpt is None:
            raise SystemExit("error: --save-demos needs --checkpoint PATH (a trained policy to roll out)")
        eps = []
        evaluate(policy, eval_envs, args.save_demos, device, args.seed + 20_000, episodes=eps)
        os.makedirs(os.path.dirname(os.path.abspath(args.demo_out)), exist_ok=True)
        np.savez_compressed(
            args.demo_out,
            obs=np.concatenate([o for o, _, _ in eps]).astype(np.float32),
            actions=np.concatenate([a for _, a, _ in eps]).astype(np.float32),
            episode_ends=np.cumsum([len(o) for o, _, _ in eps]),
            returns=np.array([g for _, _, g in eps]),
        )
        print(f"wrote {len(eps)} episodes, mean return {np.mean([g for *_, g in eps]):.1f}: {args.demo_out}")
        return

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    ckpt_path, csv_path, buffer_path = (f"runs/{run_name}/{f}" for f in ("ckpt.pt", "eval.csv", "buffer.pt"))
    n_demo = 0 if demos is None else len(demos["s"])
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps + n_demo), obs_dim, act_dim, device)
    demo_t = None if demos is None else {k: torch.as_tensor(v, device=device) for k, v in demos.items()}
    old_buffer = os.path.join(os.path.dirname(args.checkpoint or ""), "buffer.pt")
    if ckpt is not None and os.path.exists(old_buffer):  # the demos, if any, are in it already
        rb.load_state_dict(torch.load(old_buffer))
        print(f"resumed {rb.size} transitions from {old_buffer}", flush=True)
    else:
        if ckpt is not None:
            print(f"no {old_buffer}: the replay buffer starts empty", flush=True)
        if demos is not None:
            rb.add(demos["s"], demos["a"], demos["r"], demos["s2"], demos["d"])

    def sac_update(s, a, r, s2, d, bc_batch=None):
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = policy(s2)
            y = soft_q_target(r, stop * d, gamma, *qf_target(s2, a2), logp2, alpha)
        q_loss = critic_loss(*qf(s, a), y)
        opts["q"].zero_grad(), q_loss.backward(), opts["q"].step()
        qf.requires_grad_(False)  # the actor loss needs dQ/da, not dQ/dθ_Q
        n = len(s)  # one rollout for the SAC states and the demo states of the BC term
        a_pi, logp = policy(s if bc_batch is None else torch.cat([s, bc_batch[0]]))
        a_pi, logp, a_bc = a_pi[:n], logp[:n], a_pi[n:]
        pi_loss = actor_loss(logp, *qf(s, a_pi), alpha)
        if bc_batch is not None:
            pi_loss = pi_loss + args.bc_coef * ((a_bc - bc_batch[1]) ** 2).sum(-1).mean()
        opts["actor"].zero_grad(), pi_loss.backward(), opts["actor"].step()
        qf.requires_grad_(True)
        a_loss = alpha_loss(log_alpha, logp, target_entropy)
        opts["alpha"].zero_grad(), a_loss.backward(), opts["alpha"].step()
        with torch.no_grad():
            for p, p_t in zip(qf.parameters(), qf_target.parameters(), strict=True):
                p_t.lerp_(p, args.tau)
        return {
            "qf_loss": q_loss,
            "actor_loss": pi_loss,
            "alpha_loss": a_loss,
            "alpha": alpha,
            "log_pi": logp.mean(),
        }

    if demo_t is not None and ckpt is None:  # offline phase: flow matching for the actor, TD for the critic
        for i in range(args.pretrain_steps):
            idx = torch.randint(0, n_demo, (args.batch_size,), device=device)
            s, a, r, s2, d = (demo_t[k][idx] for k in ("s", "a", "r", "s2", "d"))
            fm = flow_matching_loss(policy, s, a, torch.randn_like(a), torch.rand(len(a), 1, device=device))
            opts["actor"].zero_grad(), fm.backward(), opts["actor"].step()
            with torch.no_grad():
                a2, _ = policy(s2, deterministic=True)
                y = soft_q_target(r, stop * d, gamma, *qf_target(s2, a2), torch.zeros_like(r), 0.0)
            q_loss = critic_loss(*qf(s, a), y)
            opts["q"].zero_grad(), q_loss.backward(), opts["q"].step()
            with torch.no_grad():
                for p, p_t in zip(qf.parameters(), qf_target.parameters(), strict=True):
                    p_t.lerp_(p, args.tau)
            if i % 1000 == 0 or i == args.pretrain_steps - 1:
                print(
                    f"pretrain {i}: flow-matching loss {fm.item():.4f}, qf_loss {q_loss.item():.4f}",
                    flush=True,
                )
                writer.add_scalar("losses/fm_loss", fm.item(), i)

    envs = make_envs(args, num_envs, False, run_name, gpu)
    torch_envs = envs.__class__.__name__ == "ManiSkillVectorEnv"
    obs, _ = envs.reset(seed=args.seed)
    ep_ret, recent, t0, step, pending, last_print = np.zeros(num_envs), [], time.time(), start_step, 0.0, 0
    random_phase = ckpt is None and demo_t is None
    with open(csv_path, "a") as f:
        f.write("step,wall_s,return,success_once,success_at_end\n")

    def eval_and_save(step):
        ret, once, end = evaluate(policy, eval_envs, args.num_eval_episodes, device, args.seed + 10_000)
        writer.add_scalar("eval/return", ret, step)
        if maniskill:
            (
                writer.add_scalar("eval/success_once", once, step),
                writer.add_scalar("eval/success_at_end", end, step),
            )
        with open(csv_path, "a") as f:  # wall time counts from the start of the process (incl. pretraining)
            f.write(f"{step},{time.time() - t_launch:.1f},{ret:.4f},{once:.4f},{end:.4f}\n")
        print(
            f"eval step {step}: return {ret:.3f} success_once {once:.3f} success_at_end {end:.3f}", flush=True
        )
        if args.save_model:
            save_checkpoint(ckpt_path, step, policy, qf, qf_target, log_alpha, opts, args)
            atomic_save(rb.state_dict(), buffer_path)
            print(f"checkpoint {ckpt_path}", flush=True)

    next_eval = start_step
    while step < args.total_timesteps:
        if step >= next_eval:
            eval_and_save(step)
            next_eval += args.eval_freq
        s_t = torch.as_tensor(np_(obs), dtype=torch.float32, device=device)
        if random_phase and step < args.learning_starts:
            a_t = torch.as_tensor(np.stack([act_space.sample() for _ in range(num_envs)]), device=device)
        else:
            with torch.no_grad():
                a_t = policy(s_t)[0]
        next_obs, r, term, trunc, info = envs.step(a_t if torch_envs else np_(a_t))
        r, term, trunc = np_(r).astype(np.float64), np_(term).astype(bool), np_(trunc).astype(bool)
        real_next = np_(next_obs).copy()
        mask = np_(info.get("_final_obs", info.get("_final_observation", np.zeros(num_envs, bool)))).astype(
            bool
        )
        if mask.any():
            final = info.get("final_obs", info.get("final_observation"))
            real_next[mask] = np.stack([np_(final[i]) for i in np.flatnonzero(mask)])
        rb.add(s_t, a_t, r, real_next, term)  # truncation is not a terminal: bootstrap through the time limit
        ep_ret += r
        for i in np.flatnonzero(term | trunc):
            succ = info.get("final_info", {}).get("success")
            recent.append((ep_ret[i], float(np_(succ)[i]) if succ is not None else np.nan))
            writer.add_scalar("charts/episodic_return", ep_ret[i], step)
            ep_ret[i] = 0.0
        obs, step = next_obs, step + num_envs

        if rb.size >= args.batch_size and not (random_phase and step < args.learning_starts):
            pending += args.utd * num_envs
            while pending >= 1:
                pending -= 1
                bc = None
                if demo_t is not None and args.bc_coef > 0:
                    idx = torch.randint(0, n_demo, (args.batch_size,), device=device)
                    bc = (demo_t["s"][idx], demo_t["a"][idx])
                logs = sac_update(*rb.sample(args.batch_size), bc_batch=bc)

        if step - last_print >= 1000 or step >= args.total_timesteps:
            last_print = step
            sps = int((step - start_step) / (time.time() - t0))
            rets, succs = [x[0] for x in recent[-20:]], [x[1] for x in recent[-20:]]
            writer.add_scalar("charts/SPS", sps, step)
            line = f"step {step} | {sps} steps/s | return {np.mean(rets) if rets else float('nan'):.2f}"
            if maniskill:
                line += f" | success {np.mean(succs) if succs else float('nan'):.2f}"
                writer.add_scalar("charts/success", np.mean(succs) if succs else 0.0, step)
            if "logs" in locals():
                for k, v in logs.items():
                    writer.add_scalar(f"losses/{k}", v.item(), step)
                line += f" | alpha {logs['alpha'].item():.3g} | log_pi {logs['log_pi'].item():.2f}"
            print(line, flush=True)

    eval_and_save(step)
    envs.close(), eval_envs.close(), writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

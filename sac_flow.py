"""SAC Flow: soft actor-critic with a flow-matching policy, trained end to end (CleanRL style, one file).

Paper: Zhang, Yu, Zhang et al. 2025, "SAC Flow: Sample-Efficient Reinforcement Learning of Flow-Based
Policies via Velocity-Reparameterized Sequential Modeling" (Sec. 4: flow rollout as a recurrent network,
Flow-G / Flow-T; Sec. 5: noise-augmented rollout and SAC losses; offline-to-online with a BC term).
Official code: github.com/Elessar123/SAC-FLOW (checked for the forms below; differences are noted).

Policy: K Euler steps, t_k = k/K, Δt = 1/K, from x_0 ~ N(0, I), with Gaussian noise added at each step
(the noise-augmented rollout, which makes every transition Gaussian):
    μ_k     = x_k + Δt · v_θ(t_k, x_k, s)
    x_{k+1} = μ_k + σ_θ(s) ⊙ ε_k,     ε_k ~ N(0, I)
    a       = c ⊙ tanh(x_K) + b         (c, b: half range and centre of the demos' actions, per dimension,
                                         with --demo-path; of the action box without demos)
with σ_θ(s) = exp(log σ_min + (log σ_max − log σ_min)(tanh(·) + 1)/2), learned and shared by the K steps
(as the official Flow-G code). The velocity v_θ comes in three forms (--velocity):
    naive: v_θ = h_k                                               plain flow policy (unstable baseline)
    g:     v_θ = g_k ⊙ (ĉ_k − x_k),  [g_k logit, ĉ_k] = h_k        Flow-G, gated like a GRU cell; the gate
           starts open (zero kernel, bias 5, as the official code)
    where h_k = W_o SiLU(e_s + W_x [x_k, t_k]) is one hidden layer per step (the official gate and candidate
    nets have one) and e_s = W_s SiLU(W_f s) is computed once per rollout, so a step costs little more than
    its small matmuls: a K = 4 SAC update is ~1.3x a Gaussian one (bench/sac_flow_speed.py).
    t:     v_θ = W_o LN(z_k), z_k = W_x [x_k, t_k] passed once per step through a pre-norm decoder block
           z += SelfAttn(LN z); z += CrossAttn(LN z, e_s); z += FFN(LN z)   (Flow-T). The block sees one
           action-time token and one state token e_s, so each attention weight is a softmax over one key,
           = 1: SelfAttn(q) = W_sa q and CrossAttn(·, e_s) = e_s, with W_s absorbing the cross-attention's
           value and output maps. The code writes the block as these linear maps: the same function at
           about half nn.MultiheadAttention's cost (tests/test_sac_flow.py checks the equivalence).
Log-likelihood of the sampled action (exact, because each step is Gaussian):
    log π(a|s) = log N(x_0; 0, I) + Σ_k log N(x_{k+1}; μ_k, σ² I) − Σ_i log(c_i (1 − tanh²(x_K,i)))
(the official Flow-T code scores the velocity noise ε_k, which leaves out −log(Δt σ); we use the form above
for all three velocities.)
SAC (Haarnoja et al. 2018, with the twin-Q and α-tuning of CleanRL's sac_continuous_action.py):
    y       = r + γ (1 − d) (min_j Q̄_j(s', a') − α log π(a'|s')),   a' ~ π(·|s')   (d = 0 on ManiSkill, where
              a termination is a success: ManiSkill's SAC baseline bootstraps through it too)
    L_Q     = Σ_j E[(Q_j(s, a) − y)²]
              (--crossq, CrossQ as in the official from-scratch code: batch-normalised Q_j, no target
              network: Q̄_j(s', a') = Q_j(s', a') without gradient, from Q_j(s, a)'s training-mode pass)
    L_π     = E[α log π(ã|s) − min_j Q_j(s, ã)] + β E_demo[‖ã(s_d) − a_d‖²]   (β > 0 only with demos)
    L_α     = E[−α (log π(ã|s) + H̄)],   H̄ = −|A| by default
Offline-to-online (--demo-path): first pretrain on demos with the flow-matching loss
    L_FM    = E_{t~U[0,1], x_0~N(0,I)} ‖v_θ(t, (1 − t) x_0 + t x_1, s) − (x_1 − x_0)‖²,
    x_1     = atanh((a − b)/c)
(while the critic learns TD on the demos), then run SAC with the demos in the replay buffer and the BC term
β above (the official code's action regulariser, weight 100 there).
Why the defaults are what they are: γ = 0.8, bootstrapping through terminations, utd 0.5, batch 256, τ = 0.01,
α_0 = 1 and H̄ = −|A| are the settings that reached 0.96 on PickCube-v1 offline-to-online (README). On MuJoCo
(γ = 0.99, terminations are falls) they are kept because nothing measured better in 40–50k-step Hopper-v5
probes (H̄ = 0 with α_0 = 0.2 as the official from-scratch code; CleanRL's schedule of one critic update per
env step, the actor at every 2nd (--policy-frequency 2), τ = 0.005), although they are not stable there: log π
of the chain starts near −22 (σ near its upper bound while α is large), so α falls at Adam's full rate to
~0.005 (a Gaussian actor in the same loop settles at ~0.05), and Flow-G falls back now and then (briefly on
Hopper-v5, whose early peak near 1000 is the noise-free policy standing still; an unstable gait on
Walker2d-v5: bench/sac_flow_mujoco.py, README); at 100k steps neither --utd 1 nor --crossq measured better
on both Hopper-v5 and Walker2d-v5, nor at 60k CleanRL's settings (--no-q-layer-norm --utd 1 --tau 0.005
--learning-starts 5000: Flow-G 514 → 575 on Hopper-v5, 383 → 346 on Walker2d-v5, mean of 3 seeds over 40k–60k;
results/sac_flow/mujoco_probes/COMMANDS.md). With demos, c and b come from
the demos' range, as in every script: on PickCube-v1 offline-to-online it rose earlier than with the env's
bounds in both seeds (0.45 / 0.55 at 50k against 0.30 / 0.35) and ended at 0.79 / 0.96 against 0.96 / 0.92
(results/benchmark/demo_scaling.md).
"""

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal, NoReturn

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
    seed: int | None = None
    """1 for a new run; with --checkpoint, the checkpoint's seed"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled and a GPU exists, use it"""
    track: bool = False
    """if toggled, log to Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb project name"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to videos/{run_name}"""
    save_model: bool = True
    """if toggled, write runs/{run_name}/ckpt.pt (and buffer.pt) at every evaluation and at the end"""
    checkpoint: str | None = None
    """path of a ckpt.pt to resume training from (with the buffer.pt beside it) or to evaluate (--evaluate)"""
    evaluate: bool = False
    """only evaluate --checkpoint (writes <checkpoint>.eval.json), no training"""
    save_demos: int = 0
    """with --checkpoint: write this many episodes of the noise-free policy to --demo-out"""
    demo_out: str = "demos/sac_flow_demos.npz"
    """npz of obs (N, obs_dim), actions (N, act_dim), episode_ends (E,), returns (E,): reinflow.py reads it"""

    # Environment
    env_id: str = "PickCube-v1"
    """gymnasium MuJoCo id (e.g. Hopper-v5) or ManiSkill3 id (PickCube-v1, PushCube-v1, StackCube-v1, ...)"""
    control_mode: str = "pd_ee_delta_pos"
    """ManiSkill controller"""
    max_episode_steps: int | None = None
    """episode length (default: the env's own; use 100 on PickCube with motion-planned demos)"""
    num_envs: int | None = None
    """parallel training envs (default: 512 on physx_cuda, 2 on physx_cpu, 1 for gymnasium ids)"""
    num_eval_envs: int | None = None
    """parallel evaluation envs (default: --eval-episodes on physx_cuda, else 1)"""
    sim_backend: Literal["auto", "physx_cpu", "physx_cuda"] = "auto"
    """auto: physx_cuda when --cuda and a GPU exist, else physx_cpu; ignored for gymnasium/MuJoCo ids"""
    vector_env: Literal["auto", "gymnasium", "maniskill"] = "auto"
    """gymnasium: one simulator per process in gymnasium's AsyncVectorEnv (CPU); maniskill: ManiSkill's
    batched env in ManiSkillVectorEnv, the GPU path (on physx_cpu it needs --num-envs 1 and is how the tests
    run the GPU code); auto: maniskill on physx_cuda, gymnasium otherwise"""
    total_timesteps: int = 200_000
    """total environment steps"""
    eval_freq: int = 5_000
    """evaluate (and checkpoint) every this many environment steps (all envs together)"""
    eval_episodes: int = 20
    """episodes per evaluation"""

    # SAC
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    gamma: float | None = None
    """discount (default: 0.8 for ManiSkill like its SAC baseline, 0.99 otherwise)"""
    bootstrap_at_done: bool | None = None
    """bootstrap through terminations too (default: on for ManiSkill, where a termination is a success and a
    cut return values it below hovering near the goal, as its SAC baseline; off for gymnasium: a fall)"""
    tau: float = 0.01
    """target network smoothing"""
    batch_size: int = 256
    """minibatch size (also of the flow-matching pretraining)"""
    learning_starts: int = 4_000
    """random actions before this many env steps (none with demos)"""
    utd: float = 0.5
    """gradient updates per environment step"""
    policy_frequency: int = 1
    """update the actor and α at every this-many-th critic update (TD3's delayed policy update)"""
    learning_rate: float = 3e-4
    """actor learning rate (also of the flow-matching pretraining)"""
    critic_learning_rate: float = 1e-3
    """critic and α learning rate"""
    alpha_init: float = 1.0
    """initial entropy coefficient α (then tuned)"""
    target_entropy: float | None = None
    """H̄ (default −|A|)"""
    q_layer_norm: bool = True
    """LayerNorm after each hidden layer of Q (ManiSkill's SAC baseline's q_layer_norm); CleanRL's SAC has
    none (--no-q-layer-norm)"""
    crossq: bool = False
    """CrossQ's critic (the official from-scratch SAC Flow code's): batch norm instead of LayerNorm, no target
    network; Q(s', a') comes from the same training-mode pass as Q(s, a)"""

    # Flow policy
    velocity: Literal["g", "t", "naive"] = "g"
    """velocity parameterisation: g = Flow-G (gated), t = Flow-T (decoder block), naive = plain MLP"""
    denoising_steps: int = 4
    """K, Euler steps of the flow"""
    hidden_dim: int = 256
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
    sft_steps: int = 5_000
    """flow-matching (actor) + TD (critic) updates on the demos before going online"""
    bc_coef: float = 1.0
    """β, weight of the BC regulariser during online SAC"""

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


def q_and_next_q(qf, qf_target, s, a, s2, a2, crossq: bool):
    """(Q_1, Q_2)(s, a) and the TD target's (Q̄_1, Q̄_2)(s', a'), the latter without gradient: from the target
    network, or (CrossQ) from one training-mode pass of qf over [(s, a); (s', a')], whose halves share the
    batch-norm statistics."""
    if crossq:
        q1, q2 = (q.chunk(2) for q in qf(torch.cat([s, s2]), torch.cat([a, a2])))
        return (q1[0], q2[0]), (q1[1].detach(), q2[1].detach())
    with torch.no_grad():
        q_next = qf_target(s2, a2)
    return qf(s, a), q_next


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
    def __init__(self, obs_dim, act_dim, velocity, K, hidden, t_dim, c, b, log_sigma_min=-5.0,
                 log_sigma_max=2.0):  # fmt: skip
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
            self.ln = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
            self.W_sa = nn.Linear(width, width)  # self-attention over one token: W_o^sa W_v^sa
            self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
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
        if self.kind == "t":  # one token each side: attention is linear (see the docstring)
            z = h + self.W_sa(self.ln[0](h))
            z = z + e_s
            z = z + self.ffn(self.ln[1](z))
            return self.W_o(self.ln[2](z))
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
    """Twin Q_1, Q_2: CleanRL's SoftQNetwork, with LayerNorm after each hidden layer if layer_norm
    (ManiSkill's SAC baseline uses q_layer_norm=True by default); batch_norm: CrossQ's, batch norm on the
    input and after each hidden layer (ε and running-average rate of the official code's)."""

    def __init__(self, obs_dim, act_dim, hidden, batch_norm=False, layer_norm=True):
        super().__init__()
        i, h = obs_dim + act_dim, hidden

        def q_net():
            if batch_norm:  # CrossQ's order: the input of every linear layer is normalised
                bn = lambda n: nn.BatchNorm1d(n, eps=1e-3, momentum=0.01)  # noqa: E731
                layers = [bn(i), nn.Linear(i, h), nn.ReLU(), bn(h), nn.Linear(h, h), nn.ReLU(), bn(h)]
            else:
                ln = nn.LayerNorm if layer_norm else lambda n: nn.Identity()
                layers = [nn.Linear(i, h), ln(h), nn.ReLU(), nn.Linear(h, h), ln(h), nn.ReLU()]
            return nn.Sequential(*layers, nn.Linear(h, 1))

        self.qs = nn.ModuleList(q_net() for _ in range(2))

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
            buf[idx.to(self.device)] = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        self.pos, self.size = (self.pos + len(s)) % self.capacity, min(self.size + len(s), self.capacity)

    def sample(self, n):
        i = torch.randint(0, self.size, (n,), device=self.device)
        return self.s[i], self.a[i], self.r[i], self.s2[i], self.d[i]

    def state_dict(self):
        """The stored transitions, oldest first (pos is the oldest once the buffer has wrapped), and pos."""
        i = (torch.arange(self.size) + self.pos) % max(self.size, 1)
        i = i.to(self.device)
        return {"pos": self.pos} | {k: getattr(self, k)[i].cpu() for k in ("s", "a", "r", "s2", "d")}

    def load_state_dict(self, d):
        self.add(*(d[k][-self.capacity :] for k in ("s", "a", "r", "s2", "d")))
        if self.size == self.capacity == len(d["r"]):  # full and as large as saved: the same slots as saved
            for k in "s a r s2 d".split():
                setattr(self, k, torch.roll(getattr(self, k), d["pos"], 0))
            self.pos = d["pos"]


# ---------------------------------------------------------------------------------------------------------
# Plumbing: validation, environments, demos, evaluation, checkpoints
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


def validate(args: Args) -> bool:
    """Every flag check, before anything slow; resolves in args the defaults that depend on the env and the
    GPU. Returns whether env_id is a ManiSkill one."""
    checks = [
        (args.num_envs is None or args.num_envs >= 1, "--num-envs must be >= 1"),
        (args.num_eval_envs is None or args.num_eval_envs >= 1, "--num-eval-envs must be >= 1"),
        (args.denoising_steps >= 1, "--denoising-steps must be >= 1"),
        (args.total_timesteps >= 0 and args.sft_steps >= 0, "--total-timesteps and --sft-steps must be >= 0"),
        (args.gamma is None or 0 < args.gamma <= 1, "need 0 < --gamma <= 1"),
        (0 <= args.tau <= 1, "need 0 <= --tau <= 1"),
        (min(args.utd, args.bc_coef) >= 0, "--utd and --bc-coef must be >= 0"),
        (args.policy_frequency >= 1, "--policy-frequency must be >= 1"),
        (args.log_sigma_min <= args.log_sigma_max, "need --log-sigma-min <= --log-sigma-max"),
        (min(args.batch_size, args.buffer_size, args.hidden_dim, args.transformer_dim) >= 1,
         "--batch-size, --buffer-size, --hidden-dim and --transformer-dim must be >= 1"),
        (args.eval_freq >= 1 and args.eval_episodes >= 1, "--eval-freq and --eval-episodes must be >= 1"),
        (args.checkpoint is not None or not (args.evaluate or args.save_demos),
         "--evaluate and --save-demos need --checkpoint PATH (a trained policy)"),
        (args.save_demos >= 0, "--save-demos must be >= 0"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            fail(msg)
    maniskill = is_maniskill(args.env_id)
    gpu = args.cuda and torch.cuda.is_available()
    if args.sim_backend == "physx_cuda" and not gpu:
        fail("--sim-backend physx_cuda needs a CUDA GPU (and --cuda); pass --sim-backend physx_cpu")
    if args.sim_backend == "auto":
        args.sim_backend = "physx_cuda" if gpu and maniskill else "physx_cpu"
    if args.vector_env == "auto":
        args.vector_env = "maniskill" if args.sim_backend == "physx_cuda" else "gymnasium"
    batched = args.vector_env == "maniskill"
    if batched and not maniskill:
        fail(f"--vector-env maniskill needs a ManiSkill --env-id, not {args.env_id}")
    if args.sim_backend == "physx_cuda" and not batched:
        fail("--sim-backend physx_cuda runs in ManiSkill's batched env: pass --vector-env maniskill")
    on_gpu = args.sim_backend == "physx_cuda" and maniskill
    args.num_envs = args.num_envs or (512 if on_gpu else 1 if batched or not maniskill else 2)
    args.num_eval_envs = args.num_eval_envs or (args.eval_episodes if on_gpu else 1)
    if batched and args.sim_backend == "physx_cpu" and max(args.num_envs, args.num_eval_envs) > 1:
        fail("--vector-env maniskill on physx_cpu simulates one env: pass --num-envs 1 --num-eval-envs 1")
    args.gamma = args.gamma if args.gamma is not None else (0.8 if maniskill else 0.99)
    args.bootstrap_at_done = maniskill if args.bootstrap_at_done is None else args.bootstrap_at_done
    return maniskill


def make_maniskill(args: Args, num_envs: int, video_dir: str | None = None):
    """The one ManiSkill gym.make: one env of a CPU worker, or num_envs in one batch (ManiSkillVectorEnv)."""
    import mani_skill.envs  # noqa: F401  (registers the ids, in a spawned worker too)

    env = gym.make(
        args.env_id, num_envs=num_envs, obs_mode="state", control_mode=args.control_mode,
        reward_mode="normalized_dense", max_episode_steps=args.max_episode_steps,
        sim_backend=args.sim_backend, render_backend="cpu" if args.sim_backend == "physx_cpu" else "gpu",
        render_mode="rgb_array" if video_dir else None,
        enhanced_determinism=True,  # else unseeded resets use the process's unseeded torch RNG
    )  # fmt: skip
    if video_dir:
        from mani_skill.utils.wrappers import RecordEpisode

        env = RecordEpisode(env, video_dir, save_trajectory=False)
    return env


def make_envs(args: Args, n: int, evaluation: bool, video_dir: str | None = None):
    """n envs; training envs autoreset in the step that ends an episode (its last obs in info), evaluation
    envs run to the time limit (no reset at success, as ManiSkill's baselines); video_dir records the 1st."""
    if args.vector_env == "maniskill":
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        return ManiSkillVectorEnv(make_maniskill(args, n, video_dir), n, ignore_terminations=evaluation)
    maniskill = is_maniskill(args.env_id)  # decided here: a spawned worker has not imported mani_skill yet

    def thunk(video_dir):
        if maniskill:
            from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

            return CPUGymWrapper(make_maniskill(args, 1, video_dir), ignore_terminations=evaluation)
        render_mode = "rgb_array" if video_dir else None
        env = gym.make(args.env_id, max_episode_steps=args.max_episode_steps, render_mode=render_mode)
        return gym.wrappers.RecordVideo(env, video_dir) if video_dir else env

    thunks = [lambda i=i: thunk(video_dir if i == 0 else None) for i in range(n)]
    mode = gym.vector.AutoresetMode.NEXT_STEP if evaluation else gym.vector.AutoresetMode.SAME_STEP
    if maniskill and n > 1:  # physx_cpu: one sim per process; fork hangs after SAPIEN init
        return gym.vector.AsyncVectorEnv(thunks, context="spawn", autoreset_mode=mode)
    return gym.vector.SyncVectorEnv(thunks, autoreset_mode=mode)


def np_(x) -> np.ndarray:
    """ManiSkillVectorEnv returns (and takes) torch tensors, gymnasium's vector envs numpy arrays."""
    return x.cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def load_demos(args: Args) -> dict[str, np.ndarray]:
    """ManiSkill trajectory h5 + json sidecar -> (s, a, r, s', d) arrays; checks the file, not yet the env."""
    import h5py

    path = args.demo_path
    sidecar = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(path) or not os.path.exists(sidecar):
        fail(f"--demo-path {path} or its sidecar {sidecar} not found; make demos with make_demos.sh")
    try:
        info = json.load(open(sidecar))["env_info"]
        made_for = (info["env_id"], info["env_kwargs"].get("control_mode"))
    except (ValueError, KeyError, TypeError):
        fail(f"{sidecar} is not a ManiSkill trajectory sidecar (no env_info); make demos with make_demos.sh")
    if made_for != (args.env_id, args.control_mode):
        fail(f"demos are for {made_for[0]} / {made_for[1]}, not {args.env_id} / {args.control_mode}; "
             "pass matching --env-id and --control-mode")  # fmt: skip
    trajs = []  # (s, a, r, s', d) of each trajectory
    try:
        with h5py.File(path, "r") as f:
            for name in f:
                obs, act = np.asarray(f[name]["obs"]), np.asarray(f[name]["actions"])
                if obs.ndim != 2 or act.ndim != 2 or len(obs) != len(act) + 1:
                    fail(f"{path}/{name} has obs {obs.shape} and actions {act.shape}; need (L+1, n) and "
                         "(L, m): use state demos")  # fmt: skip
                trajs.append((obs[:-1], act, f[name]["rewards"][()], obs[1:], f[name]["terminated"][()]))
    except KeyError as e:
        fail(f"--demo-path {path}: a trajectory lacks obs, actions, rewards or terminated ({e}); "
             "use make_demos.sh")  # fmt: skip
    except OSError as e:
        fail(f"--demo-path {path} is not a readable h5 file ({str(e).splitlines()[0]})")
    if len({(s.shape[1], a.shape[1]) for s, a, *_ in trajs}) != 1:
        fail(f"--demo-path {path} holds no trajectories, or trajectories of different shapes")
    columns = (np.concatenate(c).astype(np.float32) for c in zip(*trajs, strict=True))
    return dict(zip(("s", "a", "r", "s2", "d"), columns, strict=True))


def atomic_save(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a broken file


def rng_state(act_space) -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return dict(torch=torch.get_rng_state(), cuda=cuda, numpy=np.random.get_state(), python=random.getstate(),
                action_space=act_space.np_random.bit_generator.state)  # fmt: skip


def set_rng_state(state: dict, act_space):
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    act_space.np_random.bit_generator.state = state["action_space"]


def load_checkpoint(args: Args, training: bool) -> tuple[dict, dict | None]:
    """--checkpoint, checked to come from this script with this network, and to resume training the replay
    buffer beside it (None at step 0: the buffer then holds the demos only)."""
    path = args.checkpoint
    if not os.path.isfile(path):
        fail(f"--checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"--checkpoint {path} is not a torch file ({type(e).__name__})")
    script = ckpt.get("script") if isinstance(ckpt, dict) else None
    if script != "sac_flow":
        by = f"by {script}.py" if script else "no script key: another script or an older version"
        fail(f"--checkpoint {path} was not written by this sac_flow.py ({by}); retrain")
    keys = ["env_id", "control_mode", "velocity", "denoising_steps", "hidden_dim", "transformer_dim",
            "log_sigma_min", "log_sigma_max", "q_layer_norm",
            *(["demo_path"] if training else [])]  # fmt: skip
    for key in keys:
        saved = ckpt["args"].get(key, True)  # only q_layer_norm can be missing: before it, Q had LayerNorm
        if saved != getattr(args, key):
            flag = key.replace("_", "-")
            flag = (f"--{'' if saved else 'no-'}{flag}") if isinstance(saved, bool) else f"--{flag} {saved}"
            fail(f"checkpoint {path} has {key}={saved!r} but this run has {getattr(args, key)!r}; "
                 f"pass {flag}")  # fmt: skip
    if not training or ckpt["global_step"] == 0:
        return ckpt, None
    path = os.path.join(os.path.dirname(path), "buffer.pt")
    try:
        buffer = torch.load(path, map_location="cpu")
    except Exception as e:
        fail(f"resuming needs the replay buffer {path} beside --checkpoint: unreadable ({type(e).__name__})")
    if len(buffer["r"]) != ckpt["buffer_transitions"]:
        fail(f"{path} holds {len(buffer['r'])} transitions, the checkpoint {ckpt['buffer_transitions']}")
    return ckpt, buffer


@torch.no_grad()
def evaluate(policy, envs, n_episodes, device, seed, episodes=None):
    """Runs n_episodes with the noise-free flow (x_{k+1} = μ_k); returns mean return, success_once/at_end.
    If `episodes` is a list, each episode's (obs, actions, return) is appended to it."""
    results, trajs = [], []  # (return, success_once, success_at_end) and (obs, actions, return) per episode
    gen = torch.Generator().manual_seed(seed)  # x_0 from its own stream: --evaluate repeats the logged number
    while len(results) < n_episodes:
        # one seed per env: episode i starts from reset(seed + i) on either vector env (ManiSkill's batched
        # reset derives envs 1..n-1 from an integer seed otherwise)
        obs, _ = envs.reset(seed=[seed + len(results) + j for j in range(envs.num_envs)])
        n = len(np_(obs))
        ret, done, s_once, s_end = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        steps = [([], []) for _ in range(n)]
        while not done.all():
            s = torch.as_tensor(np_(obs), dtype=torch.float32, device=device)
            eps = torch.randn(policy.K + 1, n, policy.c.shape[0], generator=gen).to(device)  # x_0 only
            a, _ = policy(s, eps, deterministic=True)
            if episodes is not None:
                for i in np.flatnonzero(~done):
                    steps[i][0].append(np_(obs)[i])
                    steps[i][1].append(np_(a)[i])
            obs, r, term, trunc, info = envs.step(a if torch.is_tensor(obs) else np_(a))
            info = info.get("final_info", info)  # ManiSkillVectorEnv: info of the reset that followed the end
            ret += np_(r) * ~done
            if "success" in info:
                s = np_(info["success"]).astype(bool)
                s_once |= s & ~done
                s_end = np.where(done, s_end, s)
            done |= np_(term).astype(bool) | np_(trunc).astype(bool)
        results += zip(ret, s_once, s_end, strict=True)
        if episodes is not None:
            trajs += [(np.stack(o), np.stack(a), g) for (o, a), g in zip(steps, ret, strict=True)]
    if episodes is not None:
        episodes += trajs[:n_episodes]
    return tuple(np.mean(column) for column in zip(*results[:n_episodes], strict=True))


def descend(opt, loss):
    opt.zero_grad()
    loss.backward()
    opt.step()


def check_finite(losses: dict, step, ckpt_path: str):
    """NaN guard: stop before a broken state is written; the last checkpoint stays the good one."""
    for name, value in losses.items():
        if not torch.isfinite(value):
            last = ckpt_path if os.path.exists(ckpt_path) else "none yet"
            fail(f"non-finite {name} at step {step}; last good checkpoint: {last}")


# ---------------------------------------------------------------------------------------------------------
def main(args: Args):
    t_launch = time.time()
    maniskill = validate(args)
    training = not (args.evaluate or args.save_demos)
    ckpt, saved_buffer = load_checkpoint(args, training) if args.checkpoint else (None, None)
    if args.seed is None:
        args.seed = ckpt["args"]["seed"] if ckpt else 1
    demos = load_demos(args) if training and args.demo_path else None
    n_demo = 0 if demos is None else len(demos["s"])
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/{run_name}"
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    if training:
        backend = f"{args.sim_backend}, {args.vector_env}" if maniskill else "gymnasium"
        print(f"run {run_dir} | env {args.env_id} ({backend}) | device {device}"
              + (f" | demos {n_demo} transitions" if demos else ""), flush=True)  # fmt: skip
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    video_dir = f"videos/{run_name}" if args.capture_video else None
    eval_envs = make_envs(args, args.num_eval_envs, True, video_dir)
    act_space, obs_space = eval_envs.single_action_space, eval_envs.single_observation_space
    if not isinstance(act_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{args.env_id} has {act_space} actions and {obs_space.shape} observations; "
             "sac_flow.py needs Box actions and flat state observations")  # fmt: skip
    act_space.seed(args.seed)  # the warm-up's random actions
    obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
    if demos is not None and (demos["s"].shape[1], demos["a"].shape[1]) != (obs_dim, act_dim):
        fail(f"--demo-path {args.demo_path} has obs of dim {demos['s'].shape[1]} and actions of dim "
             f"{demos['a'].shape[1]}; {args.env_id} needs {obs_dim} and {act_dim}")  # fmt: skip
    lo, hi = np.asarray(act_space.low, np.float32), np.asarray(act_space.high, np.float32)
    if demos is not None:  # the demos' range (every script): PickCube's planned moves span ±0.4 of the box
        lo = demos["a"].min(0)
        hi = np.maximum(demos["a"].max(0), lo + 1e-3)
    policy = FlowPolicy(obs_dim, act_dim, args.velocity, args.denoising_steps, args.hidden_dim,
                        args.transformer_dim, (hi - lo) / 2, (hi + lo) / 2, args.log_sigma_min,
                        args.log_sigma_max).to(device)  # fmt: skip
    qf, qf_target = (SoftQ(obs_dim, act_dim, args.hidden_dim, args.crossq, args.q_layer_norm).to(device)
                     for _ in range(2))  # qf_target is unused with --crossq
    qf_target.load_state_dict(qf.state_dict())
    log_alpha = torch.tensor(np.log(args.alpha_init), device=device, requires_grad=True)
    target_entropy = args.target_entropy if args.target_entropy is not None else -float(act_dim)
    opts = {  # fused: one kernel for all tensors instead of a Python loop over them
        "actor": torch.optim.Adam(policy.parameters(), lr=args.learning_rate, fused=True),
        "q": torch.optim.Adam(qf.parameters(), lr=args.critic_learning_rate, fused=True),
        "alpha": torch.optim.Adam([log_alpha], lr=args.critic_learning_rate, fused=True),
    }
    if ckpt is not None:
        for name, net in (("policy", policy), ("qf", qf), ("qf_target", qf_target)):
            net.load_state_dict(ckpt[name])
        log_alpha.data.copy_(ckpt["log_alpha"])
        for k, o in opts.items():
            o.load_state_dict(ckpt["opts"][k])

    if args.evaluate:
        ret, once, end = evaluate(policy, eval_envs, args.eval_episodes, device, args.seed + 10_000)
        out = os.path.splitext(args.checkpoint)[0] + ".eval.json"
        with open(out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "global_step": ckpt["global_step"], "seed": args.seed,
                       "eval_episodes": args.eval_episodes, "success_once": once, "success_at_end": end,
                       "return": ret}, f, indent=1)  # fmt: skip
        print(f"eval step {ckpt['global_step']}: return {ret:.3f} success_once {once:.3f} success_at_end "
              f"{end:.3f} ({args.eval_episodes} episodes, seed {args.seed}; {out})")  # fmt: skip
        return
    if args.save_demos:
        eps = []
        evaluate(policy, eval_envs, args.save_demos, device, args.seed + 20_000, episodes=eps)
        obs, actions, returns = zip(*eps, strict=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.demo_out)), exist_ok=True)
        np.savez_compressed(args.demo_out, obs=np.concatenate(obs).astype(np.float32),
                            actions=np.concatenate(actions).astype(np.float32), returns=np.array(returns),
                            episode_ends=np.cumsum([len(o) for o in obs]))  # fmt: skip
        print(f"wrote {len(eps)} episodes, mean return {np.mean(returns):.1f}: {args.demo_out}")
        return

    from torch.utils.tensorboard import SummaryWriter

    try:  # a run started the same second under the same name would overwrite this one's checkpoints
        os.makedirs(run_dir)
    except FileExistsError:
        fail(f"{run_dir} exists: a run with this --exp-name and --seed began the same second; rename it")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    ckpt_path, csv_path, buffer_path = (f"{run_dir}/{f}" for f in ("ckpt.pt", "eval.csv", "buffer.pt"))
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps + n_demo), obs_dim, act_dim, device)
    demo_t = None if demos is None else {k: torch.as_tensor(v, device=device) for k, v in demos.items()}
    if saved_buffer is not None:  # the demos, if any, are in it already
        rb.load_state_dict(saved_buffer)
    elif demos is not None:
        rb.add(demos["s"], demos["a"], demos["r"], demos["s2"], demos["d"])
    stop = 0.0 if args.bootstrap_at_done else 1.0  # d is multiplied by this in the TD targets
    step = ckpt["global_step"] if ckpt else 0
    next_eval = ckpt["next_eval"] if ckpt else 0
    pending = ckpt["pending"] if ckpt else 0.0  # fractional gradient updates owed (--utd)
    updates = ckpt["updates"] if ckpt else 0  # critic updates so far (--policy-frequency)
    recent = ckpt["recent"] if ckpt else []  # (return, success) of the last 20 training episodes

    def save(path):
        """Everything a resume needs; the buffer goes first, so a ckpt.pt never outlives its buffer.pt."""
        if path == ckpt_path:
            atomic_save(rb.state_dict(), buffer_path)
        atomic_save(dict(
            script="sac_flow", args=asdict(args), global_step=step, next_eval=next_eval, pending=pending,
            updates=updates, recent=recent, buffer_transitions=rb.size, policy=policy.state_dict(),
            qf=qf.state_dict(), qf_target=qf_target.state_dict(), log_alpha=log_alpha.detach().cpu(),
            opts={k: o.state_dict() for k, o in opts.items()}, rng=rng_state(act_space),
        ), path)  # fmt: skip
        print(f"checkpoint {path}", flush=True)

    def target_update():
        if args.crossq:
            return
        with torch.no_grad():
            for p, p_t in zip(qf.parameters(), qf_target.parameters(), strict=True):
                p_t.lerp_(p, args.tau)

    def sac_update(s, a, r, s2, d, bc_batch=None, actor=True):
        alpha = log_alpha.exp().detach()
        with torch.no_grad():
            a2, logp2 = policy(s2)
        q, q_next = q_and_next_q(qf, qf_target, s, a, s2, a2, args.crossq)
        q_loss = critic_loss(*q, soft_q_target(r, stop * d, args.gamma, *q_next, logp2, alpha))
        descend(opts["q"], q_loss)
        logs = dict(qf_loss=q_loss, alpha=alpha)
        if actor:
            qf.requires_grad_(False).eval()  # dQ/da, not dQ/dθ_Q; batch norm on its running statistics
            n = len(s)  # one rollout for the SAC states and the demo states of the BC term
            a_pi, logp = policy(s if bc_batch is None else torch.cat([s, bc_batch[0]]))
            a_pi, logp, a_bc = a_pi[:n], logp[:n], a_pi[n:]
            pi_loss = actor_loss(logp, *qf(s, a_pi), alpha)
            if bc_batch is not None:
                pi_loss = pi_loss + args.bc_coef * ((a_bc - bc_batch[1]) ** 2).sum(-1).mean()
            descend(opts["actor"], pi_loss)
            qf.requires_grad_(True).train()
            a_loss = alpha_loss(log_alpha, logp, target_entropy)
            descend(opts["alpha"], a_loss)
            logs |= dict(actor_loss=pi_loss, alpha_loss=a_loss, log_pi=logp.mean())
        target_update()
        return logs

    if demo_t is not None and ckpt is None:  # offline phase: flow matching for the actor, TD for the critic
        for i in range(args.sft_steps):
            idx = torch.randint(0, n_demo, (args.batch_size,), device=device)
            s, a, r, s2, d = (demo_t[k][idx] for k in ("s", "a", "r", "s2", "d"))
            fm = flow_matching_loss(policy, s, a, torch.randn_like(a), torch.rand(len(a), 1, device=device))
            descend(opts["actor"], fm)
            with torch.no_grad():
                a2, _ = policy(s2, deterministic=True)
            q, q_next = q_and_next_q(qf, qf_target, s, a, s2, a2, args.crossq)
            y = soft_q_target(r, stop * d, args.gamma, *q_next, torch.zeros_like(r), 0.0)
            q_loss = critic_loss(*q, y)
            descend(opts["q"], q_loss)
            target_update()
            check_finite({"fm_loss": fm, "qf_loss": q_loss}, f"0 (sft update {i})", ckpt_path)
            if i % 1000 == 0 or i == args.sft_steps - 1:
                print(f"sft {i + 1}/{args.sft_steps}: flow-matching loss {fm.item():.4f}, "
                      f"qf_loss {q_loss.item():.4f}", flush=True)  # fmt: skip
                writer.add_scalar("losses/fm_loss", fm.item(), i)
        if args.save_model:
            save(f"{run_dir}/sft.pt")
    if ckpt is not None:
        set_rng_state(ckpt["rng"], act_space)
        print(f"resumed {args.checkpoint} at step {step} ({rb.size} transitions in the buffer)", flush=True)

    envs = make_envs(args, args.num_envs, False)
    obs, _ = envs.reset(seed=args.seed + step)
    ep_ret = np.zeros(args.num_envs)
    logs = None  # the last update's losses
    t_last, step_last = time.time(), step  # for steps/s over the last interval
    with open(csv_path, "a") as f:
        f.write("step,wall_s,return,success_once,success_at_end\n")
    while True:
        final = step >= args.total_timesteps
        if step >= next_eval or final:
            next_eval = (step // args.eval_freq + 1) * args.eval_freq
            ret, once, end = evaluate(policy, eval_envs, args.eval_episodes, device, args.seed + 10_000)
            writer.add_scalar("eval/return", ret, step)
            if maniskill:
                writer.add_scalar("eval/success_once", once, step)
                writer.add_scalar("eval/success_at_end", end, step)
            with open(csv_path, "a") as f:  # wall time from the start of the process (incl. pretraining)
                f.write(f"{step},{time.time() - t_launch:.1f},{ret:.4f},{once:.4f},{end:.4f}\n")
            print(f"eval step {step}: return {ret:.3f} success_once {once:.3f} success_at_end {end:.3f}",
                  flush=True)  # fmt: skip
            if args.save_model:
                save(ckpt_path)
            if final:
                break
            obs, _ = envs.reset(seed=args.seed + step)  # a run resumed from here starts with this same reset
            ep_ret[:] = 0.0

        s_t = torch.as_tensor(np_(obs), dtype=torch.float32, device=device)
        if demos is None and step < args.learning_starts:
            a_t = torch.as_tensor(np.stack([act_space.sample() for _ in range(args.num_envs)]), device=device)
        else:
            with torch.no_grad():
                a_t = policy(s_t)[0]
        next_obs, r, term, trunc, info = envs.step(a_t if torch.is_tensor(obs) else np_(a_t))
        r, term, trunc = np_(r).astype(np.float64), np_(term).astype(bool), np_(trunc).astype(bool)
        real_next = np_(next_obs).copy()
        ended = np_(info.get("_final_obs", info.get("_final_observation", np.zeros(args.num_envs, bool))))
        if ended.any():
            final_obs = info.get("final_obs", info.get("final_observation"))
            real_next[ended.astype(bool)] = np.stack([np_(final_obs[i]) for i in np.flatnonzero(ended)])
        rb.add(s_t, a_t, r, real_next, term)  # truncation is not a terminal: bootstrap through the time limit
        ep_ret += r
        success = info.get("final_info", {}).get("success")
        for i in np.flatnonzero(term | trunc):
            recent = (recent + [(ep_ret[i], np.nan if success is None else float(np_(success)[i]))])[-20:]
            writer.add_scalar("charts/episodic_return", ep_ret[i], step)
            ep_ret[i] = 0.0
        obs, step = next_obs, step + args.num_envs

        if rb.size >= args.batch_size and (demos is not None or step >= args.learning_starts):
            pending += args.utd * args.num_envs
            while pending >= 1:
                pending, actor = pending - 1, updates % args.policy_frequency == 0
                bc = None
                if actor and demo_t is not None and args.bc_coef > 0:
                    idx = torch.randint(0, n_demo, (args.batch_size,), device=device)
                    bc = (demo_t["s"][idx], demo_t["a"][idx])
                logs = (logs or {}) | sac_update(*rb.sample(args.batch_size), bc_batch=bc, actor=actor)
                updates += 1
                check_finite(logs, step, ckpt_path)

        if step // 1000 > (step - args.num_envs) // 1000 or step >= args.total_timesteps:
            sps = (step - step_last) / max(time.time() - t_last, 1e-9)
            t_last, step_last = time.time(), step
            rets, succs = [g for g, _ in recent], [s for _, s in recent]
            writer.add_scalar("charts/SPS", sps, step)
            line = (f"step {step}/{args.total_timesteps} | {sps:.0f} steps/s | "
                    f"ETA {(args.total_timesteps - step) / max(sps, 1e-9) / 60:.0f}m | train episodes"
                    + (" (end at success)" if maniskill else "")
                    + f": return {np.mean(rets) if rets else float('nan'):.2f}")  # fmt: skip
            if maniskill:
                line += f" success {np.mean(succs) if succs else float('nan'):.2f}"
                writer.add_scalar("charts/success", np.mean(succs) if succs else 0.0, step)
            if logs is not None:
                for k, v in logs.items():
                    writer.add_scalar(f"losses/{k}", v.item(), step)
                line += f" | alpha {logs['alpha'].item():.3g} | log_pi {logs['log_pi'].item():.2f}"
            print(line, flush=True)

    envs.close()
    eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

"""RL-Co: RL-based sim-real co-training of a flow-matching policy, at reference scale.

Paper: L. Shi, S. Chen, F. Gao et al., "Beyond Imitation: Reinforcement Learning-Based Sim-Real Co-Training
for VLA Models" (RLinf-Co), arXiv:2602.12628, 2026, Sec. III (two-stage framework). Official code: the RLinf
framework (github.com/RLinf/RLinf, example "co_training"), which runs PPO on pi0.5 with
`sft_loss_weight: 0.2` (= beta) and a Stage-I mixture of 50 real + 1499 sim trajectories. The paper's exact
Stage-I ratio alpha and any beta schedule were not readable in the indexed material; we use a constant beta
(default 0.2, as in RLinf's config) and a sample-level mixing weight --sim-ratio.

There is no real robot: "real" is the nominal ManiSkill task with shifted dynamics (--real-shift, e.g.
controller gain 0.6, one step of action delay, lower cube friction), from which only --real-demos
demonstrations are used and in which no RL happens. "Sim" is the nominal task (motion-planner demos from
make_demos.sh, unlimited interaction). Real demos come from a short closed-loop scripted expert
(scripted_pick_expert, scripted_push_expert, scripted_stack_expert) run in the shifted env: it works under the
shift, and, like real teleoperation vs sim planning, its style differs from the sim demos. Only PickCube-v1,
PushCube-v1 and StackCube-v1 have such an expert here.

Policy pi_theta(a | o): a K-step flow with a learnable noise network (Flow-Noise, as in pi_RL / RLinf),
    a^0 ~ N(0, I),  tau_k = k / K,  dt = 1 / K,
    a^{k+1} = a^k + v_theta(o, a^k, tau_k) dt + sigma_phi(o, a^k, tau_k) eps_k,   eps_k ~ N(0, I),
    action = clip(a^K, -1, 1).  Deterministic evaluation uses sigma = 0 (the plain flow ODE).
Chain log-likelihood (a^0's density does not depend on theta, so it cancels in PPO ratios):
    log pi(a^{0:K} | o) = sum_k log N(a^{k+1}; a^k + v_theta(o, a^k, tau_k) dt, sigma_phi(o, a^k, tau_k)^2)
Supervised flow-matching loss on demos (a, o), with tau ~ U(0, 1), eps ~ N(0, I):
    a_tau = (1 - tau) eps + tau a,    L_SFT = E || v_theta(o, a_tau, tau) - (a - eps) ||^2
Stage I (all modes):  min_theta  L_SFT on D_mix, D_mix = sim-ratio * D_sim + (1 - sim-ratio) * D_real
    (real-only: sim-ratio = 0).
Stage II (rl-co, rl-sim-only), PPO in sim with r = exp(log pi_new(chain) - log pi_old(chain)):
    L_RL = -E min(r A, clip(r, 1 - eps_c, 1 + eps_c) A) + c_v E (V(o) - R)^2,   A by GAE(gamma, lambda)
    L    = L_RL(sim) + beta * L_SFT(real)          (rl-sim-only: beta = 0)

Modes: real-only (Stage I on real), sft-cotrain (Stage I on the mixture), rl-co (Stage I + II),
rl-sim-only (Stage I + II without the real anchor).
"""

import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

MODES = ("real-only", "sft-cotrain", "rl-co", "rl-sim-only")
# shift key -> nominal value; "real" and --eval-shift override some of them
NOMINAL_SHIFT = {
    "action_scale": 1.0,
    "action_delay": 0,
    "action_noise": 0.0,
    "cube_mass": 1.0,
    "cube_friction": 1.0,
}


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda (physx_cuda simulation) is used when available"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanflow"
    """the wandb's project name"""
    save_model: bool = True
    """whether to save the model checkpoint (runs/{run_name}/final_ckpt.pt)"""
    checkpoint: str | None = None
    """checkpoint to resume training from (or to evaluate with --evaluate)"""
    evaluate: bool = False
    """only evaluate --checkpoint in sim, real and --eval-shift, then exit"""

    # co-training arguments
    env_id: str = "PickCube-v1"
    """the ManiSkill task id (PickCube-v1, PushCube-v1 or StackCube-v1: the tasks with a scripted expert)"""
    mode: str = "rl-co"
    """one of real-only, sft-cotrain, rl-co, rl-sim-only"""
    sim_demo_path: str = "demos/PickCube-v1/motionplanning/mp100.state.pd_ee_delta_pos.physx_cpu.h5"
    """h5 of sim (nominal) demos made by make_demos.sh (state obs, pd_ee_delta_pos)"""
    real_shift: str = "action_scale=0.6,action_delay=1,cube_friction=0.3"
    """the "real" domain: comma-separated key=value over action_scale, action_delay, action_noise, cube_mass,
    cube_friction (mass and friction are multipliers of the nominal values)"""
    eval_shift: str = "action_scale=0.45,action_delay=2,cube_mass=3.0,cube_friction=0.3"
    """an unseen variation, evaluated besides sim and real ("" to skip)"""
    real_demos: int = 20
    """number of demos from the "real" domain (scripted closed-loop expert; the only real data used)"""
    sim_ratio: float = 0.5
    """Stage I: fraction of each SFT batch drawn from sim demos (the rest from real demos)"""
    aux_coef: float = 0.2
    """beta: weight of the real-data SFT loss during Stage II (RLinf default 0.2)"""
    sft_steps: int = 4000
    """Stage I gradient steps"""
    sft_batch_size: int = 256
    """batch size of the flow-matching loss (Stage I and the Stage II anchor)"""
    sft_lr: float = 1e-3
    """Stage I learning rate"""
    denoise_steps: int = 4
    """K, flow integration steps"""
    sigma_min: float = 0.02
    """lower bound of the learned per-step noise std"""
    sigma_max: float = 0.2
    """upper bound of the learned per-step noise std"""
    max_episode_steps: int = 100
    """episode length (motion-planned PickCube demos are 49-99 steps)"""

    # PPO (Stage II) arguments
    total_timesteps: int = 40_000
    """Stage II environment steps in sim"""
    num_envs: int = 2
    """parallel sim environments (AsyncVectorEnv on CPU, one process on GPU)"""
    num_steps: int = 200
    """steps per environment per rollout"""
    learning_rate: float = 3e-5
    """Stage II actor (velocity + noise network) learning rate"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    critic_warmup_iters: int = 2
    """first Stage II iterations update only the critic (the BC policy's value is unknown)"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    num_minibatches: int = 4
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

    # evaluation
    eval_freq: int = 10
    """evaluate every eval_freq Stage II iterations (and after each stage)"""
    num_eval_episodes: int = 20
    """episodes per domain per evaluation (fixed layouts, the same for every mode)"""

    # filled at runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of Stage II iterations (computed in runtime)"""


def parse_shift(spec: str) -> dict:
    """'action_scale=0.6,action_delay=1' -> full shift dict (unlisted keys nominal)."""
    shift = dict(NOMINAL_SHIFT)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in NOMINAL_SHIFT or not value:
            raise SystemExit(
                f"error: bad shift item '{item}': use key=value with key in {list(NOMINAL_SHIFT)}"
            )
        try:
            shift[key] = type(NOMINAL_SHIFT[key])(float(value))
        except ValueError:
            raise SystemExit(f"error: shift value '{value}' for {key} is not a number") from None
    if shift["action_delay"] < 0 or shift["cube_mass"] <= 0 or shift["cube_friction"] < 0:
        raise SystemExit(f"error: shift {spec!r} has a negative delay or a non-positive mass/friction")
    return shift


class ShiftWrapper(gym.Wrapper):
    """Turns the nominal task into a shifted domain: actions are scaled (controller gain), delayed and
    noised, and the manipulated objects' mass / friction are changed after reset. The reset distribution is
    untouched, so the same seed gives the same initial layout in every domain."""

    OBJECTS = ("cube", "obj", "cubeA", "cubeB")

    def __init__(self, env, shift: dict):
        super().__init__(env)
        self.nominal = None
        self.set_shift(shift)

    def set_shift(self, shift: dict):
        self.shift = dict(shift)

    def _bodies(self):
        base = self.env.unwrapped
        return [b for name in self.OBJECTS if hasattr(base, name) for b in getattr(base, name)._bodies]

    def _apply_physics(self):
        bodies = self._bodies()
        if self.nominal is None:  # remember nominal values once; shifts are multipliers of them
            self.nominal = [
                (b.mass, [(m.static_friction, m.dynamic_friction) for m in self._materials(b)])
                for b in bodies
            ]
        for b, (mass, frictions) in zip(bodies, self.nominal, strict=True):
            b.mass = mass * self.shift["cube_mass"]
            for m, (fs, fd) in zip(self._materials(b), frictions, strict=True):
                m.static_friction, m.dynamic_friction = (
                    fs * self.shift["cube_friction"],
                    fd * self.shift["cube_friction"],
                )

    @staticmethod
    def _materials(body):
        return [s.physical_material for s in body.collision_shapes]

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._apply_physics()
        self.queue = deque([np.zeros(self.action_space.shape, np.float32)] * self.shift["action_delay"])
        self.rng = np.random.default_rng(seed)
        return obs, info

    def step(self, action):
        self.queue.append(np.asarray(action, np.float32))
        a = self.queue.popleft()
        a = a * self.shift["action_scale"] + self.shift["action_noise"] * self.rng.standard_normal(a.shape)
        return self.env.step(np.clip(a, -1.0, 1.0).astype(np.float32))


def make_env(env_id: str, shift: dict, max_episode_steps: int, evaluation: bool):
    def thunk():
        import mani_skill.envs  # noqa: F401  (registers the ids in the worker process)
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        env = gym.make(env_id, obs_mode="state", sim_backend="physx_cpu", render_backend="cpu",
                       control_mode="pd_ee_delta_pos", reward_mode="normalized_dense",
                       max_episode_steps=max_episode_steps, enhanced_determinism=True)  # fmt: skip
        env = CPUGymWrapper(env, ignore_terminations=evaluation, record_metrics=True)
        return ShiftWrapper(env, shift)

    return thunk


class GPUShiftVecEnv:
    """physx_cuda path (not run here: no GPU): num_envs scenes in one process (ManiSkillVectorEnv), the same
    action shifts on the batch, outputs in gymnasium's SAME_STEP format so the rest of the file is unchanged.
    Mass / friction shifts are physx_cpu only; the delay queue is reset only on full resets."""

    def __init__(self, args: Args, shift: dict, evaluation: bool):
        from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

        env = gym.make(args.env_id, num_envs=args.num_envs, obs_mode="state", sim_backend="physx_cuda",
                       control_mode="pd_ee_delta_pos", reward_mode="normalized_dense",
                       max_episode_steps=args.max_episode_steps, enhanced_determinism=True)  # fmt: skip
        self.env = ManiSkillVectorEnv(env, args.num_envs, ignore_terminations=evaluation, record_metrics=True)
        self.num_envs = args.num_envs
        self.single_observation_space = self.env.single_observation_space
        self.single_action_space = self.env.single_action_space
        self.set_shift(shift)

    def call(self, name, *args):
        return getattr(self, name)(*args)

    def set_shift(self, shift: dict):
        if shift["cube_mass"] != 1.0 or shift["cube_friction"] != 1.0:
            raise SystemExit("error: cube_mass / cube_friction shifts are physx_cpu only: run with --no-cuda")
        self.shift = shift

    def reset(self, seed=None):
        obs, info = self.env.reset(seed=seed)
        a0 = torch.zeros(self.num_envs, self.single_action_space.shape[0], device=obs.device)
        self.queue = deque([a0] * self.shift["action_delay"])
        return obs.cpu().numpy(), info

    def step(self, action):
        self.queue.append(torch.as_tensor(action, device=self.env.device))
        a = self.queue.popleft() * self.shift["action_scale"]
        a = (a + self.shift["action_noise"] * torch.randn_like(a)).clamp(-1, 1)
        obs, r, term, trunc, info = self.env.step(a)
        info = {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in info.items()}
        if "final_info" in info:
            fi = info["final_info"]
            info["final_info"] = {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in fi.items()}
            info["final_info"]["episode"] = {k: v.cpu().numpy() for k, v in fi["episode"].items()}
            info["final_obs"], info["_final_obs"] = (
                info.pop("final_observation").cpu().numpy(),
                info["_final_info"],
            )
        obs, r, term, trunc = (x.cpu().numpy() for x in (obs, r, term, trunc))
        return obs, r, term, trunc, info

    def close(self):
        self.env.close()


def make_vec_env(args: Args, shift: dict, evaluation: bool):
    if args.cuda and torch.cuda.is_available():
        return GPUShiftVecEnv(args, shift, evaluation)
    thunks = [make_env(args.env_id, shift, args.max_episode_steps, evaluation) for _ in range(args.num_envs)]
    if args.num_envs == 1:  # no worker process to start
        return gym.vector.SyncVectorEnv(thunks, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    return gym.vector.AsyncVectorEnv(
        thunks, context="spawn", autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


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


EXPERTS = {
    "PickCube-v1": scripted_pick_expert,
    "PushCube-v1": scripted_push_expert,
    "StackCube-v1": scripted_stack_expert,
}


def load_sim_demos(path: str, obs_dim: int, act_dim: int):
    import h5py

    if not os.path.exists(path):
        raise SystemExit(f"error: sim demo file {path} not found: make it with `bash make_demos.sh`")
    meta_path = path[: -len(".h5")] + ".json"
    if os.path.exists(meta_path):
        mode = json.load(open(meta_path))["env_info"]["env_kwargs"].get("control_mode")
        if mode != "pd_ee_delta_pos":
            raise SystemExit(
                f"error: {path} has control_mode {mode}, need pd_ee_delta_pos (make_demos.sh arg 3)"
            )
    obs, act = [], []
    with h5py.File(path, "r") as f:
        for key in f:
            o, a = f[key]["obs"][()], f[key]["actions"][()]
            if o.ndim != 2 or o.shape[1] != obs_dim or a.shape != (len(o) - 1, act_dim):
                raise SystemExit(
                    f"error: {path}:{key} has obs {o.shape} / actions {a.shape}, "
                    f"need (L+1, {obs_dim}) / (L, {act_dim})"
                )
            obs.append(o[:-1])
            act.append(a)
    if not obs:
        raise SystemExit(f"error: {path} holds no trajectories")
    return np.concatenate(obs).astype(np.float32), np.concatenate(act).astype(np.float32)


def collect_real_demos(envs, n: int, seed: int, max_steps: int, act_fn=scripted_pick_expert):
    """Runs the expert in the (shifted) eval envs; keeps each successful episode up to its first success."""
    obs_buf, act_buf, tried = [], [], 0
    while len(obs_buf) < n and tried < 4 * n + 8:
        o, _ = envs.reset(seed=[seed + tried + i for i in range(envs.num_envs)])
        tried += envs.num_envs
        traj = [([], []) for _ in range(envs.num_envs)]
        done = np.zeros(envs.num_envs, bool)
        for _ in range(max_steps):
            a = act_fn(o)
            for i in np.where(~done)[0]:
                traj[i][0].append(o[i])
                traj[i][1].append(a[i])
            o, _, term, trunc, info = envs.step(a)
            success = info["final_info"]["success"] if "final_info" in info else info["success"]
            for i in np.where(~done & success)[0]:
                if len(obs_buf) < n:
                    obs_buf.append(np.array(traj[i][0]))
                    act_buf.append(np.array(traj[i][1]))
            done |= success | term | trunc
            if done.all():
                break
    if len(obs_buf) < n:
        raise SystemExit(f"error: the scripted expert solved only {len(obs_buf)} of {tried} real episodes")
    return np.concatenate(obs_buf).astype(np.float32), np.concatenate(act_buf).astype(np.float32)


def mlp(i: int, o: int, h: int = 256, n: int = 3) -> nn.Sequential:
    layers, d = [], i
    for _ in range(n):
        layers += [nn.Linear(d, h), nn.SiLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, o))


class FlowNoisePolicy(nn.Module):
    """v_theta(o, a, tau) and sigma_phi(o, a, tau); observations normalised with fixed demo statistics."""

    def __init__(self, obs_dim, act_dim, K, sigma_min, sigma_max):
        super().__init__()
        self.K, self.act_dim, self.sigma_min, self.sigma_max = K, act_dim, sigma_min, sigma_max
        self.v = mlp(obs_dim + act_dim + 1, act_dim)
        self.noise = mlp(obs_dim + act_dim + 1, act_dim, h=64, n=2)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def norm(self, o):
        return (o - self.obs_mean) / self.obs_std

    def velocity(self, o_n, a, tau):
        return self.v(torch.cat([o_n, a, tau], -1))

    def sigma(self, o_n, a, tau):
        s = torch.sigmoid(self.noise(torch.cat([o_n, a, tau], -1)))
        return self.sigma_min + (self.sigma_max - self.sigma_min) * s

    @torch.no_grad()
    def sample(self, o, deterministic=False):
        """Returns the chain a^{0:K}, shape (B, K+1, A); the action is chain[:, -1]."""
        o_n, dt = self.norm(o), 1.0 / self.K
        a = torch.randn(o.shape[0], self.act_dim, device=o.device)
        chain = [a]
        for k in range(self.K):
            tau = torch.full((o.shape[0], 1), k * dt, device=o.device)
            a = a + self.velocity(o_n, a, tau) * dt
            if not deterministic:
                a = a + self.sigma(o_n, chain[-1], tau) * torch.randn_like(a)
            chain.append(a)
        return torch.stack(chain, 1)


def chain_log_prob(policy: FlowNoisePolicy, o: torch.Tensor, chain: torch.Tensor) -> torch.Tensor:
    """log pi(a^{0:K} | o) = sum_k log N(a^{k+1}; a^k + v dt, sigma^2), all K steps in one batched call."""
    B, K1, A = chain.shape
    K, dt = K1 - 1, 1.0 / (K1 - 1)
    o_n = policy.norm(o).unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
    a_k = chain[:, :-1].reshape(B * K, A)
    tau = (torch.arange(K, device=o.device, dtype=o.dtype) * dt).repeat(B).unsqueeze(-1)
    mu = a_k + policy.velocity(o_n, a_k, tau) * dt
    dist = torch.distributions.Normal(mu, policy.sigma(o_n, a_k, tau))
    return dist.log_prob(chain[:, 1:].reshape(B * K, A)).sum(-1).view(B, K).sum(-1)


def flow_matching_loss(policy: FlowNoisePolicy, o, a, tau=None, eps=None) -> torch.Tensor:
    """L_SFT = E || v(o, (1 - tau) eps + tau a, tau) - (a - eps) ||^2."""
    tau = torch.rand(a.shape[0], 1, device=a.device) if tau is None else tau
    eps = torch.randn_like(a) if eps is None else eps
    a_tau = (1 - tau) * eps + tau * a
    return ((policy.velocity(policy.norm(o), a_tau, tau) - (a - eps)) ** 2).sum(-1).mean()


def ppo_policy_loss(new_logp, old_logp, adv, clip_coef) -> tuple[torch.Tensor, torch.Tensor]:
    log_ratio = new_logp - old_logp
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
    approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, approx_kl


def rl_co_loss(l_rl: torch.Tensor, l_sft_real: torch.Tensor, beta: float) -> torch.Tensor:
    """L = L_RL(sim) + beta * L_SFT(real)."""
    return l_rl + beta * l_sft_real


def gae(rewards, values, next_value, dones, gamma, lam):
    """dones[t] = 1 when the episode ended at step t (its bootstrap is already folded into rewards[t])."""
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        nv = next_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + gamma * nv * (1 - dones[t]) - values[t]
        last = delta + gamma * lam * (1 - dones[t]) * last
        adv[t] = last
    return adv, adv + values


@torch.no_grad()
def evaluate(policy, envs, shift: dict, n: int, device) -> dict:
    """Deterministic (sigma = 0) rollouts on fixed layouts (seeds 10^5 + i), full episodes, no early reset."""
    envs.call("set_shift", shift)
    stats = {"success_once": [], "success_at_end": [], "return": []}
    for start in range(0, n, envs.num_envs):
        o, _ = envs.reset(seed=[100_000 + start + i for i in range(envs.num_envs)])
        while True:
            a = policy.sample(torch.as_tensor(o, device=device), deterministic=True)[:, -1].clamp(-1, 1)
            o, _, _, trunc, info = envs.step(a.cpu().numpy())
            if trunc.any():
                for key in stats:
                    stats[key] += list(info["final_info"]["episode"][key][: n - start])
                break
    return {k: float(np.mean(v)) for k, v in stats.items()}


def save_checkpoint(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def main(args: Args):
    if args.mode not in MODES:
        raise SystemExit(f"error: unknown --mode {args.mode}: use one of {', '.join(MODES)}")
    if not 0.0 <= args.sim_ratio <= 1.0 or args.aux_coef < 0:
        raise SystemExit("error: --sim-ratio must be in [0, 1] and --aux-coef >= 0")
    real_shift, nominal = parse_shift(args.real_shift), dict(NOMINAL_SHIFT)
    eval_shift = parse_shift(args.eval_shift) if args.eval_shift else None
    if args.evaluate and not args.checkpoint:
        raise SystemExit("error: --evaluate needs --checkpoint PATH")
    ckpt = None
    if args.checkpoint:
        if not os.path.exists(args.checkpoint):
            raise SystemExit(
                f"error: checkpoint {args.checkpoint} not found: pass a final_ckpt.pt of this script"
            )
        try:
            ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        except Exception:
            ckpt = None
        if not isinstance(ckpt, dict) or "policy" not in ckpt or ckpt.get("env_id") != args.env_id:
            raise SystemExit(f"error: {args.checkpoint} is not an rl_cotrain.py checkpoint for {args.env_id}")
    import mani_skill.envs  # noqa: F401

    if args.env_id not in gym.registry:
        raise SystemExit(f"error: unknown env id {args.env_id}: use a ManiSkill3 id such as PickCube-v1")
    if args.env_id not in EXPERTS and not args.evaluate:
        raise SystemExit(
            f"error: no scripted real-domain expert for {args.env_id}: use one of {', '.join(EXPERTS)}"
        )
    sft_only = args.mode in ("real-only", "sft-cotrain")
    sim_ratio = 0.0 if args.mode == "real-only" else args.sim_ratio
    beta = args.aux_coef if args.mode == "rl-co" else 0.0
    args.batch_size = args.num_envs * args.num_steps
    args.minibatch_size = args.batch_size // args.num_minibatches
    args.num_iterations = 0 if sft_only else args.total_timesteps // args.batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.mode}__{args.seed}__{int(time.time())}"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")

    eval_envs = make_vec_env(args, real_shift, evaluation=True)
    obs_dim, act_dim = eval_envs.single_observation_space.shape[0], eval_envs.single_action_space.shape[0]
    policy = FlowNoisePolicy(obs_dim, act_dim, args.denoise_steps, args.sigma_min, args.sigma_max).to(device)
    critic = mlp(obs_dim, 1).to(device)
    actor_opt = torch.optim.Adam(policy.parameters(), lr=args.learning_rate)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    start_iter, global_step = 0, 0
    if ckpt is not None:
        try:
            policy.load_state_dict(ckpt["policy"])
            critic.load_state_dict(ckpt["critic"])
        except RuntimeError:
            raise SystemExit(
                f"error: {args.checkpoint} does not match these network sizes / --env-id"
            ) from None
        actor_opt.load_state_dict(ckpt["actor_opt"])
        critic_opt.load_state_dict(ckpt["critic_opt"])
        start_iter, global_step = ckpt["iteration"], ckpt["global_step"]

    def run_eval():
        out = {"sim": evaluate(policy, eval_envs, nominal, args.num_eval_episodes, device),
               "real": evaluate(policy, eval_envs, real_shift, args.num_eval_episodes, device)}  # fmt: skip
        if eval_shift is not None:
            out["eval_shift"] = evaluate(policy, eval_envs, eval_shift, args.num_eval_episodes, device)
        return out

    if args.evaluate:
        print(json.dumps({"checkpoint": args.checkpoint, "global_step": global_step, **run_eval()}))
        eval_envs.close()
        return

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, sync_tensorboard=True, config=vars(args), name=run_name)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )

    def log_eval(results, step):
        for domain, res in results.items():
            for k, v in res.items():
                writer.add_scalar(f"eval/{k}" if domain == "sim" else f"eval_{domain}/{k}", v, step)
        print(
            f"eval step={step} " + " ".join(f"{d}={r['success_once']:.2f}" for d, r in results.items()),
            flush=True,
        )

    # ---- data: real demos from the shifted env (scripted expert), sim demos from the motion planner ----
    sim_o = sim_a = None
    if sim_ratio > 0 and ckpt is None:  # sim demos serve Stage I only
        sim_o, sim_a = (
            torch.as_tensor(x, device=device) for x in load_sim_demos(args.sim_demo_path, obs_dim, act_dim)
        )
    eval_envs.call("set_shift", real_shift)
    real_o, real_a = collect_real_demos(
        eval_envs, args.real_demos, 10_000 + 1000 * args.seed, args.max_episode_steps, EXPERTS[args.env_id]
    )
    real_o, real_a = torch.as_tensor(real_o, device=device), torch.as_tensor(real_a, device=device)
    print(
        f"real demos: {args.real_demos} ({len(real_o)} steps), "
        f"sim demo steps: {0 if sim_o is None else len(sim_o)}"
    )

    def demo_batch(n, ratio):
        """n samples: a ratio fraction from sim demos, the rest from real demos."""
        n_sim = int(round(n * ratio))
        i_r = torch.randint(len(real_o), (n - n_sim,), device=device)
        if n_sim == 0:
            return real_o[i_r], real_a[i_r]
        i_s = torch.randint(len(sim_o), (n_sim,), device=device)
        return torch.cat([sim_o[i_s], real_o[i_r]]), torch.cat([sim_a[i_s], real_a[i_r]])

    def checkpoint(iteration):
        if args.save_model:
            path = f"runs/{run_name}/final_ckpt.pt"
            save_checkpoint(path, policy=policy.state_dict(), critic=critic.state_dict(),
                            actor_opt=actor_opt.state_dict(), critic_opt=critic_opt.state_dict(),
                            args=vars(args), env_id=args.env_id, iteration=iteration,
                            global_step=global_step)  # fmt: skip
            return path

    # ---- ALGO LOGIC: Stage I, SFT warm start on the real/sim mixture ----
    if ckpt is None:
        all_o = real_o if sim_o is None else torch.cat([sim_o, real_o])
        policy.obs_mean.copy_(all_o.mean(0))
        policy.obs_std.copy_(all_o.std(0).clamp_min(1e-3))  # constant features (e.g. zero qvel) stay finite
        sft_opt = torch.optim.Adam(policy.v.parameters(), lr=args.sft_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(sft_opt, args.sft_steps)
        t0 = time.time()
        for step in range(args.sft_steps):
            loss = flow_matching_loss(policy, *demo_batch(args.sft_batch_size, sim_ratio))
            sft_opt.zero_grad()
            loss.backward()
            sft_opt.step()
            sched.step()
            if step % 500 == 0 or step == args.sft_steps - 1:
                writer.add_scalar("losses/sft_loss", loss.item(), step)
                print(f"stage I step={step} sft_loss={loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
        log_eval(run_eval(), 0)
        print(f"checkpoint: {checkpoint(0)}")
    if args.num_iterations <= start_iter:
        eval_envs.close()
        writer.close()
        return

    # ---- ALGO LOGIC: Stage II, PPO in sim + beta * SFT on real demos ----
    envs = make_vec_env(args, nominal, evaluation=False)
    N, T, K = args.num_envs, args.num_steps, args.denoise_steps
    obs_b = torch.zeros(T, N, obs_dim, device=device)
    chain_b = torch.zeros(T, N, K + 1, act_dim, device=device)
    logp_b, rew_b, done_b, val_b = (torch.zeros(T, N, device=device) for _ in range(4))
    next_obs, _ = envs.reset(seed=[args.seed * 1000 + i for i in range(N)])
    next_obs = torch.as_tensor(next_obs, device=device)
    t_start, steps_start = time.time(), global_step
    for iteration in range(start_iter + 1, args.num_iterations + 1):
        for t in range(T):
            global_step += N
            obs_b[t] = next_obs
            with torch.no_grad():
                chain = policy.sample(next_obs)
                logp_b[t] = chain_log_prob(policy, next_obs, chain)
                val_b[t] = critic(next_obs).squeeze(-1)
            chain_b[t] = chain
            o, r, term, trunc, info = envs.step(chain[:, -1].clamp(-1, 1).cpu().numpy())
            r = torch.as_tensor(r, device=device, dtype=torch.float32)
            if "final_obs" in info:  # bootstrap truncated episodes with V(final obs)
                for i in np.where(info["_final_obs"] & trunc & ~term)[0]:
                    with torch.no_grad():
                        r[i] += (
                            args.gamma
                            * critic(torch.as_tensor(info["final_obs"][i], device=device)).squeeze()
                        )
                ep = info["final_info"]["episode"]
                for i in np.where(info["_final_info"])[0]:
                    writer.add_scalar("charts/episodic_return", ep["return"][i], global_step)
                    writer.add_scalar("charts/success_once", ep["success_once"][i], global_step)
            rew_b[t], done_b[t] = r, torch.as_tensor(term | trunc, device=device, dtype=torch.float32)
            next_obs = torch.as_tensor(o, device=device)
        with torch.no_grad():
            adv_b, ret_b = gae(
                rew_b, val_b, critic(next_obs).squeeze(-1), done_b, args.gamma, args.gae_lambda
            )

        b_obs, b_chain = obs_b.reshape(-1, obs_dim), chain_b.reshape(-1, K + 1, act_dim)
        b_logp, b_adv, b_ret = logp_b.reshape(-1), adv_b.reshape(-1), ret_b.reshape(-1)
        actor_on = iteration > args.critic_warmup_iters
        for _epoch in range(args.update_epochs):
            perm = torch.randperm(args.batch_size, device=device)
            for mb in perm.split(args.minibatch_size):
                v_loss = 0.5 * ((critic(b_obs[mb]).squeeze(-1) - b_ret[mb]) ** 2).mean()
                critic_opt.zero_grad()
                (args.vf_coef * v_loss).backward()
                nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
                critic_opt.step()
                if not actor_on:
                    continue
                adv = (b_adv[mb] - b_adv[mb].mean()) / (b_adv[mb].std() + 1e-8)
                pg_loss, approx_kl = ppo_policy_loss(
                    chain_log_prob(policy, b_obs[mb], b_chain[mb]), b_logp[mb], adv, args.clip_coef
                )
                sft_loss = (
                    flow_matching_loss(policy, *demo_batch(args.sft_batch_size, 0.0))
                    if beta > 0
                    else torch.zeros(())
                )
                actor_opt.zero_grad()
                rl_co_loss(pg_loss, sft_loss, beta).backward()
                nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
                actor_opt.step()
            if actor_on and approx_kl.item() > args.target_kl:
                break

        sps = int((global_step - steps_start) / (time.time() - t_start))
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        if actor_on:
            writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
            writer.add_scalar("losses/sft_real_loss", sft_loss.item(), global_step)
            writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        print(f"iter={iteration}/{args.num_iterations} step={global_step} SPS={sps} "
              f"rollout_reward={rew_b.mean().item():.3f} value_loss={v_loss.item():.4f}",
              flush=True)  # fmt: skip
        if iteration % args.eval_freq == 0 or iteration == args.num_iterations:
            log_eval(run_eval(), global_step)
            print(f"checkpoint: {checkpoint(iteration)}")
    envs.close()
    eval_envs.close()
    writer.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

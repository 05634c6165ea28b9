"""Where a flow_noise_ppo PickCube-v1 checkpoint fails: per episode, ever grasped / ever placed / success,
with the noiseless ODE or the stochastic chain of --sigma-min/--sigma-max (one in-process env, seeds 20000+i).

python bench/flow_noise_ppo_failure_modes.py --checkpoint runs/<run>/ckpt.pt --stochastic
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_noise_ppo as fnp  # noqa: E402


@dataclass
class Diag:
    checkpoint: str
    """ckpt.pt or sft.pt of a PickCube-v1 run (MLP backbone)"""
    episodes: int = 100
    """episodes to run"""
    stochastic: bool = False
    """sample the K-step chain with the learned noise (as in PPO rollouts) instead of the noiseless ODE"""
    sigma_min: float = 0.02
    """σ bounds of the noise head (the checkpoint's args hold those of the run that saved it, e.g. an SFT
    run's defaults: pass the bounds whose rollouts you want to see)"""
    sigma_max: float = 0.04


def main(d: Diag):
    import mani_skill.envs  # noqa: F401
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    ckpt = torch.load(d.checkpoint, map_location="cpu", weights_only=False)
    a = ckpt["args"]
    env_args = fnp.Args(
        control_mode=a["control_mode"], reward_mode="sparse", max_episode_steps=a["max_episode_steps"]
    )
    env = CPUGymWrapper(fnp.make_maniskill(env_args, 1, "PickCube-v1"))
    D, A = env.observation_space.shape[0], env.action_space.shape[0]
    policy = fnp.FlowNoisePolicy(D, A, a["action_horizon"], a["denoising_steps"], d.sigma_min, d.sigma_max)
    policy.load_state_dict(ckpt["policy"])
    torch.manual_seed(0)
    rows = []  # ever grasped, ever placed, success, episode length
    for ep in range(d.episodes):
        obs, _ = env.reset(seed=20000 + ep)
        grasped = placed = success = done = False
        steps = 0
        while not done:
            x = policy.sample(torch.as_tensor(obs)[None], stochastic=d.stochastic)[0][0, -1]
            for j in range(a["num_action_chunks"]):
                obs, _, term, trunc, info = env.step(policy.to_env(x[j]).numpy())
                steps += 1
                grasped |= bool(info["is_grasped"])
                placed |= bool(info["is_obj_placed"])
                success |= bool(info["success"])
                if term or trunc:
                    done = True
                    break
        rows.append((grasped, placed, success, steps))
    r = np.array(rows, float)
    mode = f"stochastic sigma in [{d.sigma_min}, {d.sigma_max}]" if d.stochastic else "noiseless ODE"
    print(
        f"{d.checkpoint} {mode} episodes={d.episodes}: ever_grasped={r[:, 0].mean():.2f} "
        f"ever_placed={r[:, 1].mean():.2f} success={r[:, 2].mean():.2f} mean_length={r[:, 3].mean():.1f}"
    )


if __name__ == "__main__":
    main(tyro.cli(Diag))

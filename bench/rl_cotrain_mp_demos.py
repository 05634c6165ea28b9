"""Motion-planner demos in any rl_cotrain domain, for rl_cotrain.py's --demo-path (sim) and --real-demo-path.

ManiSkill's motion planner plans each layout in the nominal scene (joint positions, pd_joint_pos); ManiSkill's
own converter (the one make_demos.sh runs through replay_trajectory) then tracks that plan closed-loop with
pd_ee_delta_pos actions in the chosen domain, where rl_cotrain's ShiftWrapper delays, scales and clips the
actions and changes the cube's mass and friction. The same planner in both domains gives demos of one style
that differ where the dynamics differ (a^real ~ a^sim / action_scale, one step later with action_delay=1).
Kept: the trajectories that end in success, whole (as make_demos.sh keeps them), on the layouts of seeds
first_seed, first_seed + 1, ... (apart from rl_cotrain's evaluation layouts, seed + 10_000, ..., and
make_demos.sh's, 0, 1, ...). Writes ManiSkill's h5 layout (traj_i/obs (L+1, d), traj_i/actions (L, A)) and a
json beside it that records the shift.

usage: OMP_NUM_THREADS=1 python bench/rl_cotrain_mp_demos.py --num 20 [--shift "action_scale=0.6,..."]
       [--out F.h5]   (--shift "" gives the nominal "sim" domain; default: rl_cotrain's --real-shift)
"""

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_cotrain as rc  # noqa: E402


@dataclass
class Args:
    env_id: str = "PickCube-v1"
    shift: str = rc.Args.real_shift
    """the domain, as rl_cotrain's --real-shift ("" : nominal)"""
    num: int = 20
    """successful demos to write"""
    first_seed: int = 100_000
    """layout seed of the first try"""
    out: str | None = None
    """default demos/{env_id}/mp{num}.{shift}.h5"""


class ActionLog(gym.Wrapper):
    """Keeps each action an env is stepped with, and the observation before it."""

    def reset(self, **kwargs):
        self.obs, info = self.env.reset(**kwargs)
        self.log = []
        return self.obs, info

    def step(self, action):
        self.log.append((self.obs, np.asarray(action, np.float32).reshape(-1)))
        self.obs, *rest = self.env.step(action)
        return self.obs, *rest


def main(a: Args):
    import mani_skill.envs  # noqa: F401
    from mani_skill.examples.motionplanning.panda.run import MP_SOLUTIONS
    from mani_skill.trajectory.utils.actions.conversion import from_pd_joint_pos_to_ee

    if a.env_id not in MP_SOLUTIONS:
        rc.fail(f"ManiSkill has no motion planner for {a.env_id}: use one of {', '.join(MP_SOLUTIONS)}")
    shift = rc.parse_shift(a.shift)
    if a.out and not a.out.endswith(".h5"):
        rc.fail(f"--out {a.out}: name an .h5 file (its .json goes beside it)")
    out = a.out or f"demos/{a.env_id}/mp{a.num}.{a.shift.replace(',', '.') or 'nominal'}.h5"
    args = rc.Args(env_id=a.env_id, max_episode_steps=10_000)  # the plan, not a time limit, ends an episode
    cpu = dict(sim_backend="physx_cpu", render_backend="cpu")
    plan_env = ActionLog(gym.make(a.env_id, obs_mode="none", control_mode="pd_joint_pos", **cpu))
    env = ActionLog(rc.make_maniskill(args, 1, shift, **cpu))
    trajs, tried = [], 0
    while len(trajs) < a.num and tried < 2 * a.num + 8:
        seed = a.first_seed + tried
        tried += 1
        try:
            res = MP_SOLUTIONS[a.env_id](plan_env, seed=seed)
        except Exception as e:  # the planner raises when it finds no path
            print(f"seed {seed}: no plan ({e})")
            continue
        if res == -1 or not res[-1]["success"].item():
            continue
        plan = np.stack([act for _, act in plan_env.log])
        plan_env.reset(seed=seed)
        env.reset(seed=seed)
        info = from_pd_joint_pos_to_ee("pd_ee_delta_pos", plan, plan_env.env, env)
        if not info["success"].item():
            print(f"seed {seed}: the plan's tracking under {a.shift or 'nominal'} failed")
            continue
        obs = [o.cpu().numpy()[0] for o, _ in env.log] + [env.obs.cpu().numpy()[0]]
        trajs.append((seed, np.stack(obs), np.stack([act for _, act in env.log])))
        print(f"seed {seed}: {len(plan)} steps planned, {len(obs) - 1} tracked ({len(trajs)}/{a.num})")
    plan_env.close()
    env.close()
    if len(trajs) < a.num:
        rc.fail(f"only {len(trajs)} of {tried} layouts planned and tracked under {a.shift!r}: ask fewer")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with h5py.File(out + ".tmp", "w") as f:
        for i, (_, o, act) in enumerate(trajs):
            f.create_dataset(f"traj_{i}/obs", data=o.astype(np.float32))
            f.create_dataset(f"traj_{i}/actions", data=act)
    episodes = [{"episode_id": i, "episode_seed": s} for i, (s, _, _) in enumerate(trajs)]
    env_info = {"env_id": a.env_id, "env_kwargs": {"control_mode": "pd_ee_delta_pos"}}
    meta = {"env_info": env_info, "shift": shift, "episodes": episodes}
    with open(out[: -len(".h5")] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(out + ".tmp", out)
    print(out)


if __name__ == "__main__":
    main(tyro.cli(Args))

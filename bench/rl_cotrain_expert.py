"""Success rate and episode length of rl_cotrain.py's scripted expert in each domain (sim, real, unseen
shift), on the fixed layouts of seeds 0..episodes-1 (the same in every domain), full 100-step episodes.

usage: OMP_NUM_THREADS=1 python bench/rl_cotrain_expert.py [--env-id PickCube-v1] [--episodes 50]
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rl_cotrain as rc  # noqa: E402


@dataclass
class Args:
    env_id: str = "PickCube-v1"
    episodes: int = 50
    num_envs: int = 2


def main(a: Args):
    args = rc.Args(env_id=a.env_id, sim_backend="physx_cpu", vector_env="gymnasium")
    domains = {"sim": "", "real": args.real_shift, "eval_shift": args.eval_shift}
    envs = rc.VecEnv(args, a.num_envs, rc.NOMINAL_SHIFT, torch.device("cpu"), evaluation=True)
    expert = rc.EXPERTS[a.env_id]
    try:
        for domain, spec in domains.items():
            envs.set_shift(rc.parse_shift(spec))
            first_success = []  # step of the first success, or None
            for start in range(0, a.episodes, a.num_envs):
                o = envs.reset([start + i for i in range(a.num_envs)], rebuild=start == 0)
                steps = np.full(a.num_envs, -1)
                for t in range(1, args.max_episode_steps + 1):
                    o, _, _, trunc, success = envs.step(torch.as_tensor(expert(o.numpy())))
                    steps[(steps < 0) & success.numpy()] = t
                    if trunc.any():
                        break
                first_success += steps[: a.episodes - start].tolist()
            solved = [s for s in first_success if s > 0]
            n, rate = len(first_success), len(solved) / len(first_success)
            print(f"{a.env_id} {domain} ({spec or 'nominal'}): success {len(solved)}/{n} = {rate:.2f}, "
                  f"steps to first success: mean {np.mean(solved):.1f}, min {min(solved)}, max {max(solved)}")
    finally:
        envs.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

"""How much does chance change an rl_cotrain policy's outcome? PPO learns from episodes of one initial state
that end differently; a layout the policy always solves or always fails teaches it nothing. Per layout (sim
domain, seeds seed + 10000 + j: the evaluation's list) this plays the noise-free policy once, then --repeats
episodes of the stochastic chain (sigma_phi bounded by --sigma-min/--sigma-max), of the noise-free chain from
fresh a^0 ~ N(0, I) (--ode), or of either from a^0 = 0 (--a0-zero), each in a rebuilt scene (where a seeded
episode replays exactly); it prints each layout's success rate and how many layouts are mixed (0 < p < 1).

python bench/rl_cotrain_outcome_spread.py --checkpoint runs/<run>/sft.pt --layouts 20 --repeats 10 [--ode]
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
class Spread:
    checkpoint: str
    """a ckpt.pt or sft.pt of rl_cotrain.py"""
    layouts: int = 20
    """initial states: the first N of the checkpoint's evaluation list"""
    repeats: int = 10
    """stochastic episodes per layout (an even number: the 2 envs play the same layout)"""
    sigma_min: float | None = None
    """noise bounds of the stochastic chain (default: the checkpoint's)"""
    sigma_max: float | None = None
    ode: bool = False
    """repeat the noise-free chain instead: only a^0 ~ N(0, I) differs between repeats"""
    a0_zero: bool = False
    """start every chain at a^0 = 0 instead of a^0 ~ N(0, I): only sigma_phi's noise is left"""


@torch.no_grad()
def episode_pair(policy, envs, seed: int, deterministic: bool, generator, C: int) -> list[float]:
    """Both envs reset to the layout of seed in a rebuilt scene, one episode each; -> their success_once."""
    o = envs.reset([seed] * envs.num_envs, rebuild=True)
    ep = rc.new_episodes(envs.num_envs, envs.device)
    alive = torch.ones(envs.num_envs, dtype=torch.bool)
    while alive.any():
        chain = rc.sample_chain(policy, o, deterministic=deterministic, generator=generator)
        o = rc.step_chunk(envs, rc.chunk_actions(policy, chain, C), alive, ep)[0]
    return ep["success_once"].float().tolist()


def main(s: Spread):
    if s.layouts < 1 or s.repeats < 2 or s.repeats % 2:
        raise SystemExit(f"error: need --layouts >= 1, an even --repeats >= 2; not {s.layouts}, {s.repeats}")
    ckpt = rc.load_checkpoint(s.checkpoint, "PickCube-v1")
    args = rc.Args(**{k: v for k, v in ckpt["args"].items() if k in rc.Args.__dataclass_fields__})
    lo, hi = s.sigma_min or args.sigma_min, s.sigma_max or args.sigma_max
    envs = rc.VecEnv(args, 2, dict(rc.NOMINAL_SHIFT), torch.device("cpu"), evaluation=True)
    H, C, A = args.action_horizon, args.num_action_chunks, envs.act_dim
    policy = rc.FlowNoisePolicy(envs.obs_dim, A, H, args.denoising_steps, lo, hi, args.hidden_dim, s.a0_zero)
    policy.load_state_dict(ckpt["policy"])
    rates, first = [], []
    for j in range(s.layouts):
        seed = args.seed + 10_000 + j
        generator = torch.Generator().manual_seed(seed)
        first.append(episode_pair(policy, envs, seed, True, generator, C)[0])
        pairs = (episode_pair(policy, envs, seed, s.ode, generator, C) for _ in range(s.repeats // 2))
        runs = [x for pair in pairs for x in pair]
        rates.append(np.mean(runs))
        print(f"layout {seed}: noise-free {first[-1]:.0f}, repeats {rates[-1]:.2f} ({len(runs)})", flush=True)
    envs.close()
    rates = np.array(rates)
    mixed = ((rates > 0) & (rates < 1)).sum()
    noise = ("a^0 only" if s.ode else f"sigma [{lo}, {hi}]") + (", a^0 = 0" if s.a0_zero else "")
    print(f"{s.checkpoint} {noise}: noise-free {np.mean(first):.2f}, repeats {rates.mean():.2f}; "
          f"layouts always solved {(rates == 1).sum()}, never {(rates == 0).sum()}, mixed {mixed} of "
          f"{len(rates)}; mean p(1 - p) {np.mean(rates * (1 - rates)):.3f}")  # fmt: skip


if __name__ == "__main__":
    main(tyro.cli(Spread))

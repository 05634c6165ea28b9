"""How much of the noise injected at denoising step k reaches the executed actions x_K, for a checkpoint
on its demo states: std of the change in x_K[:C] when N(0, s²) is added after step k only (rest noiseless).

python bench/flow_noise_ppo_contraction.py --checkpoint runs/<sft run>/sft.pt --demo-path <h5>
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_noise_ppo as fnp  # noqa: E402


@dataclass
class Contraction:
    checkpoint: str
    """ckpt.pt or sft.pt of flow_noise_ppo.py (MLP backbone)"""
    demo_path: str
    """h5 whose observations are used (every 10th step of the first 30 trajectories)"""
    s: float = 0.1
    """std of the injected noise"""


@torch.no_grad()
def main(c: Contraction):
    ckpt = torch.load(c.checkpoint, map_location="cpu", weights_only=False)
    a = ckpt["args"]
    with h5py.File(c.demo_path, "r") as f:
        obs = np.concatenate([f[f"traj_{i}"]["obs"][:-1:10] for i in range(30)])
    obs = torch.as_tensor(obs, dtype=torch.float32)
    H, K, C = a["action_horizon"], a["denoising_steps"], a["num_action_chunks"]
    A = ckpt["policy"]["act_low"].numel()
    policy = fnp.FlowNoisePolicy(obs.shape[1], A, H, K, a["sigma_min"], a["sigma_max"])
    policy.load_state_dict(ckpt["policy"])
    o, t = policy.normalize(obs), fnp.time_grid(K)
    x0 = torch.randn(len(obs), H, A, generator=torch.Generator().manual_seed(0))

    def chain(noise_at=None):
        x, g = x0, torch.Generator().manual_seed(1)
        for k in range(K):
            x = policy.step_gaussian(x, t[k].expand(len(x)), o)[0]
            if k == noise_at:
                x = x + c.s * torch.randn(x.shape, generator=g)
        return x[:, :C]

    base = chain()
    for k in range(K):
        d = chain(k) - base
        print(f"noise {c.s} after step k={k} (t {t[k]:.2f} -> {t[k + 1]:.2f}): x_K std {d.std():.4f}")


if __name__ == "__main__":
    main(tyro.cli(Contraction))

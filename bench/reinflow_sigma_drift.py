"""What a reinflow run's checkpoints did to the noise and the mean: for each mark_<step>.pt of a benchmark run
(bench/pickcube_benchmark.py --row reinflow), the noise net's mean sigma_k per denoising step and the mean
|a_mark - a_0| of the noise-free first action against mark 0's (per action dim, [-1, 1] units, the same x_0),
on the observations of the first 20 demos.

    python bench/reinflow_sigma_drift.py results/benchmark/runs/reinflow_s3 [--demo-path <h5>]
"""

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reinflow as R  # noqa: E402

DEMO = "demos/PickCube-v1/motionplanning/mp100.state.pd_ee_delta_pos.physx_cpu.h5"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a benchmark run directory holding mark_<step>.pt")
    p.add_argument("--demo-path", default=DEMO)
    args = p.parse_args()
    marks = sorted(args.run.glob("mark_*.pt"), key=lambda f: int(f.stem.split("_")[1]))
    if not marks:
        raise SystemExit(f"error: no mark_<step>.pt in {args.run}: pass a reinflow benchmark run directory")
    if not Path(args.demo_path).is_file():
        raise SystemExit(f"error: no demo file {args.demo_path}: run `bash make_demos.sh PickCube-v1 100` "
                         "or pass --demo-path")
    with h5py.File(args.demo_path) as f:
        obs = np.concatenate([f[k]["obs"][:-1] for k in list(f)[:20]])
    first = None
    for path in marks:
        ckpt = torch.load(path, weights_only=False, map_location="cpu")
        a = ckpt["args"]
        s = torch.as_tensor((obs - ckpt["obs_mean"].numpy()) / ckpt["obs_std"].numpy(), dtype=torch.float32)
        Da = ckpt["act_low"].numel()
        policy = R.FlowPolicy(s.shape[1], a["action_horizon"], Da, a["hidden_dim"], a["flow"] == "shortcut")
        policy.load_state_dict(ckpt["policy"])
        K, it = a["denoising_steps"], ckpt.get("iteration") or 0
        sigma_max = R.sigma_max_schedule(it, a["num_iterations"], a["sigma_min"], a["sigma_max"])
        with torch.no_grad():
            zeros = torch.zeros(len(s), policy.D)
            lo = a["sigma_min"]
            sigma = [policy.transition(zeros, k / K, K, s, lo, sigma_max)[1].mean() for k in range(K)]
            x0 = torch.randn(len(s), policy.D, generator=torch.Generator().manual_seed(0))
            action = R.ode_action(policy, s, K, x0).clamp(-1, 1)[:, :Da].numpy()
        first = action if first is None else first
        drift = np.abs(action - first).mean(0)
        sigma, drift = " ".join(f"{x.item():.4f}" for x in sigma), " ".join(f"{x:.3f}" for x in drift)
        print(f"{path.stem}: sigma_max(t) {sigma_max:.4f} | mean sigma_k {sigma} | mean |a - a_0| {drift}")


if __name__ == "__main__":
    main()

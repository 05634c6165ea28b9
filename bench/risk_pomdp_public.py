"""risk_pomdp.py on the instance shipped with the authors' code (github.com/Tonghe-Zhang/BVVI,
config/naive.yaml: S=3, O=3, A=2, H=4, K=1000, delta=0.2, gamma=1; model from manual_initialization).

    OMP_NUM_THREADS=1 python bench/risk_pomdp_public.py

Prints and writes results/risk_pomdp/public.md: the exact optimum J*, the values that repository plots
regret against (H * 0.98 and H * 0.986, set by hand there), the exact J of the myopic policy that its planner
reduces to (its beta vectors are clamped to one value, see the README), and both learners' regret here.
"""

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import risk_pomdp as rp  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "results" / "risk_pomdp"
H, K, DELTA, GAMMA, SEEDS = 4, 1000, 0.2, 1.0, [1, 2, 3, 4, 5]


def myopic_policy(m: rp.Pomdp, gamma: float) -> list[np.ndarray]:
    """argmax_a <sigma_h(f), e^{gamma r_h(., a)}>, with sigma_1 = mu (the first observation ignored)."""
    blind = m._replace(O=np.concatenate([np.full_like(m.O[:1], 1 / m.O.shape[-1]), m.O[1:]]))
    sigma = rp.risk_beliefs(blind, gamma)
    return [np.argmax(sigma[h] @ np.exp(gamma * m.r[h]), axis=-1) for h in range(H)]


def main():
    m = rp.make_public(H)
    J_star = float(rp.plan(m, GAMMA)[1])
    J_myopic = float(rp.evaluate(m, myopic_policy(m, GAMMA), GAMMA))
    J_neutral = float(rp.evaluate(m, rp.plan(m, 0.0)[0], GAMMA))
    lines = [
        f"J*_gamma=1 = {J_star:.4f}; hand-set optimum in the public code: H*0.98 = {H * 0.98:.3f}, "
        f"H*0.986 = {H * 0.986:.3f}; J of the myopic policy = {J_myopic:.4f}; "
        f"J of the risk-neutral optimum = {J_neutral:.4f}\n",
        "| learner | c | R(K=1000) | R(100) | slope | regret/ep (last 100) | episodes/s (×5 seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scale in (1.0, 0.3):
        for learner in ("bvvi", "neutral"):
            args = dataclasses.replace(
                rp.Args(),
                env="public",
                horizon=H,
                episodes=K,
                delta=DELTA,
                gamma=GAMMA,
                learner=learner,
                bonus_scale=scale,
                print_every=0,
            )
            assert rp.check_args(args) is None
            t = time.time()
            cum = rp.run(args, SEEDS)[0].cumsum(1)
            eps = K / (time.time() - t)
            slope = np.nanmean([rp.loglog_slope(c) for c in cum])
            last = (cum[:, -1] - cum[:, -101]).mean() / 100
            lines.append(
                f"| {learner} | {scale:g} | {cum[:, -1].mean():.1f} ± {cum[:, -1].std():.1f} | "
                f"{cum[:, 99].mean():.1f} | {slope:.2f} | {last:.4f} | {eps:.0f} |"
            )
            print(lines[-1], flush=True)
    (OUT / "public.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Success of scripted_stack_expert in sim / real / eval-shift on layouts 0..N-1, from the repo root:
python results/rl_cotrain/stackcube/expert_probe.py N MAX_STEPS"""

import sys
import time

sys.path.insert(0, ".")
import rl_cotrain as rc  # noqa: E402

n, T = int(sys.argv[1]), int(sys.argv[2])
args = rc.Args(env_id="StackCube-v1", num_envs=1, max_episode_steps=T)
envs = rc.make_vec_env(args, dict(rc.NOMINAL_SHIFT), evaluation=True)
t0 = time.time()
for name, spec in [("sim", ""), ("real", args.real_shift), ("eval_shift", args.eval_shift)]:
    envs.call("set_shift", rc.parse_shift(spec))
    wins, steps = 0, []
    for seed in range(n):
        o, _ = envs.reset(seed=[seed])
        for t in range(T):  # noqa: B007  (t is read after the loop)
            o, _, _, trunc, info = envs.step(rc.scripted_stack_expert(o))
            if info["success"].any() or trunc.any():
                break
        wins += int(info["success"].all())
        steps.append(t + 1 if info["success"].all() else -1)
    print(name, f"success={wins}/{n}", "steps", steps, flush=True)
print(f"{time.time() - t0:.1f}s")

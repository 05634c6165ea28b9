"""Where the RL scripts' wall time goes: env-only, rollout and full-loop steps/s side by side (issue 16).

For each script x env, with the README's flags for that script (plus the bench's budget flags below):
  (a) env-only: random actions through the script's own vector env (its make_envs / VecEnv, same num_envs);
  (b) rollout: the script's policy (freshly initialised) and its chunk-stepping routine, no update;
      b_env: env steps per second of the time (b) spends inside the vector env's step and reset, i.e. the
      simulator under the policy's own actions; b / b_env is the share of (b) that is not the main process's
      own work (inference, conversions, bookkeeping), 1 when the rollout waits only on the simulator;
  (c) full loop: the script's CLI for a short budget; steps/s as it prints them, the first progress line
      dropped when there are several (it holds the evaluation at step 0 or the warm-up);
  (d) ms per update = (1/c - 1/b) x env steps per update: the loop's time beyond the rollout, per update
      (GAE, minibatches, optimiser, logging), and updates per env step.
Then one cProfile of main() in-process for one rollout + one update (PPO: one iteration; sac_flow: 1000
steps, 500 of them past learning_starts), top entries by cumulative time.

  OMP_NUM_THREADS=1 python bench/throughput.py                       # all rows, ~15 min on 2 cores
  OMP_NUM_THREADS=1 python bench/throughput.py --scripts flow_noise_ppo --envs PickCube-v1 --seconds 5

Writes results/throughput.csv and results/throughput_profile.txt (rows of a subset replace only those rows).
"""

import argparse
import cProfile
import csv
import datetime
import importlib
import io
import os
import pstats
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ["sac_flow", "reinflow", "flow_noise_ppo", "flow_sde_ppo", "rl_cotrain"]
ENVS = ["PickCube-v1", "Hopper-v5"]
DEMOS = "/tmp/demos/PickCube-v1/motionplanning/mp10.state.pd_ee_delta_pos.physx_cpu.h5"

# The README's flags per script and env (pretraining replaced by a few SFT steps on --demo-path: speed does
# not depend on the weights); None: not measured (rl_cotrain's domain shift is PickCube-only).
README = {
    ("sac_flow", "PickCube-v1"): "",  # python sac_flow.py (from scratch)
    ("sac_flow", "Hopper-v5"): "--env-id Hopper-v5",
    (
        "reinflow",
        "PickCube-v1",
    ): "--env-id PickCube-v1 --max-episode-steps 100 --sigma-min 0.02 --sigma-max 0.05 "
    "--learning-rate 1e-5 --critic-warmup-iters 5 --target-kl 0.1 --demo-path {demos} --sft-steps 10",
    ("reinflow", "Hopper-v5"): "--env-id Hopper-v5 --num-envs 20 --num-eval-envs 10 --num-steps 125",
    (
        "flow_noise_ppo",
        "PickCube-v1",
    ): "--env-id PickCube-v1 --reward-mode normalized_dense --relative-reward "
    "--sigma-min 0.02 --sigma-max 0.04 --learning-rate 1e-5 --num-steps 1000 --num-minibatches 10 "
    "--critic-warmup-iters 1 --demo-path {demos} --sft-steps 10",
    ("flow_noise_ppo", "Hopper-v5"): "--env-id Hopper-v5",  # no README row: defaults
    ("flow_sde_ppo", "PickCube-v1"): "--env-id PickCube-v1 --num-steps 200 --learning-rate 1e-5 "
    "--critic-warmup-iters 3 --logprob-type token --demo-path {demos} --sft-steps 10",
    ("flow_sde_ppo", "Hopper-v5"): "--env-id Hopper-v5",  # no README row: defaults
    ("rl_cotrain", "PickCube-v1"): "--mode rl-co --seed 1 --demo-path {demos} --sft-steps 10",
    ("rl_cotrain", "Hopper-v5"): None,
}
# The bench's own flags, after the README's (the last one wins): a short run, evaluation cut to one
# episode and pushed past the budget; no critic warm-up in PPO (every measured iteration updates the actor,
# as all but the first few of a long run do); sac_flow's random warm-up cut from 4000 to 500 steps;
# rl_cotrain: 2 real demos (start-up only).
BUDGET = "--total-timesteps {n} --eval-freq 1000000 --eval-episodes 1"
EXTRA = {
    "sac_flow": "--learning-starts 500",
    "reinflow": "--critic-warmup-iters 0",
    "flow_noise_ppo": "--critic-warmup-iters 0",
    "flow_sde_ppo": "--critic-warmup-iters 0",
    "rl_cotrain": "--critic-warmup-iters 0 --real-demos 2 --num-steps 200",  # its earlier 400-step batches
}
SPS = re.compile(r"^step (\d+)/\d+ \| ([\d.]+) steps/s", re.M)


def parse(S, flags: str):
    """The script's Args after its own validation (resolves --sim-backend, --vector-env, batch sizes)."""
    args = tyro.cli(S.Args, args=flags.split())
    name = S.__name__
    if name == "sac_flow":
        S.validate(args)
    elif name == "reinflow":
        S.check_args(args, S.is_maniskill(args.env_id))
    elif name == "flow_noise_ppo":
        S.validate(args)
    else:
        S.check_args(args)
    return args


def build_envs(S, args):
    """The training vector env as the script's main() builds it: (the script's wrapper, the gym env)."""
    name = S.__name__
    if name == "sac_flow":
        envs = S.make_envs(args, args.num_envs, False)
        return envs, envs
    if name == "reinflow":
        envs = S.make_envs(args, args.num_envs)
        return envs, envs
    if name == "flow_noise_ppo":
        envs = S.VecEnv(args, args.num_envs, torch.device("cpu"))
        return envs, envs.envs
    if name == "flow_sde_ppo":
        envs = S.make_envs(args, S.is_maniskill(args.env_id), args.num_envs)
        return envs, envs
    envs = S.VecEnv(args, args.num_envs, dict(S.NOMINAL_SHIFT), torch.device("cpu"), evaluation=False)
    return envs, envs.envs


def timed(step_fn, seconds: float, warmup: int = 3, in_env: list | None = None) -> tuple[int, float]:
    """(env steps, wall s) of step_fn() -> env steps taken, over `seconds` after `warmup` calls (in_env[0], a
    clock that step_fn advances, is zeroed at the start)."""
    for _ in range(warmup):
        step_fn()
    if in_env is not None:
        in_env[0] = 0.0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step_fn()
    return n, time.perf_counter() - t0


def env_only(S, args, seconds: float) -> float:
    """(a) Random actions through the script's own vector env; ended envs reset as the script resets them
    (sac_flow's autoreset in the same step, the others by reset_mask after the step)."""
    _, raw = build_envs(S, args)
    space = raw.single_action_space
    N = args.num_envs
    rng = np.random.default_rng(0)
    raw.reset(seed=[1 + i for i in range(N)])  # one seed per env: reinflow's VecEnv takes only a list
    autoreset = S.__name__ == "sac_flow"

    def step():
        a = rng.uniform(space.low, space.high, (N, *space.shape)).astype(np.float32)
        _, _, term, trunc, _ = raw.step(a)
        done = np.asarray(term) | np.asarray(trunc)
        if not autoreset and done.any():
            raw.reset(options={"reset_mask": done})
        return N

    try:
        n, wall = timed(step, seconds)
        return n / wall
    finally:
        raw.close()


def rollout(S, args, seconds: float) -> tuple[float, float]:
    """(b) The script's policy and critic inference and its stepping routine, as in main(), no update; and
    (b_env) env steps per second spent inside the vector env's step/reset during (b)."""
    name, dev = S.__name__, torch.device("cpu")
    envs, raw = build_envs(S, args)
    space = raw.single_action_space
    obs_dim, A, N = raw.single_observation_space.shape[0], space.shape[0], args.num_envs
    lo, hi = np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)
    torch.manual_seed(1)
    st = {}
    if name == "sac_flow":
        policy = S.FlowPolicy(obs_dim, A, args.velocity, args.denoising_steps, args.hidden_dim,
                              args.transformer_dim, (hi - lo) / 2, (hi + lo) / 2, args.log_sigma_min,
                              args.log_sigma_max)  # fmt: skip
        st["obs"] = envs.reset(seed=1)[0]

        def step():
            s_t = torch.as_tensor(S.np_(st["obs"]), dtype=torch.float32)
            with torch.no_grad():
                a_t = policy(s_t)[0]
            st["obs"] = envs.step(S.np_(a_t))[0]
            return N
    elif name == "reinflow":
        K, Ta = args.denoising_steps, args.action_horizon
        policy = S.FlowPolicy(obs_dim, Ta, A, args.hidden_dim, args.flow == "shortcut")
        critic = S.Critic(obs_dim, args.hidden_dim)
        st["obs"], st["ep"] = S.reset_all(envs, 1), S.new_episode_stats(N)

        def step():
            s = torch.as_tensor(st["obs"].astype(np.float32))  # obs_norm with mean 0, std 1 (no demos)
            with torch.no_grad():
                chain, _ = S.sample_chain(policy, s, K, args.sigma_min, args.sigma_max)
                critic(s)
            chunk = chain[:, -1].reshape(N, Ta, A).cpu().numpy()
            st["obs"] = S.step_chunk(envs, st["obs"], chunk, st["ep"], lo, hi)[0]
            return N * Ta
    elif name == "flow_noise_ppo":
        H, C, K = args.action_horizon, args.num_action_chunks, args.denoising_steps
        policy = S.FlowNoisePolicy(
            obs_dim, A, H, K, args.sigma_min, args.sigma_max, args.backbone, args.backbone_path
        )
        critic = S.make_critic(obs_dim)
        policy.act_low.copy_(envs.low)
        policy.act_high.copy_(envs.high)
        mask = S.executed_mask(H, A, C)
        st["obs"], st["ep"] = envs.reset(seed=1), S.new_episodes(N, dev)

        def step():
            with torch.no_grad():
                chain, mu, sigma = policy.sample(st["obs"])
                S.chain_log_prob(chain, mu, sigma, mask, args.logprob_type)
                critic(policy.normalize(st["obs"]))
            alive = torch.ones(N, dtype=torch.bool)
            next_obs = S.step_chunk(envs, policy.to_env(chain[:, -1, :C]), alive, st["ep"])[0]
            for v in st["ep"].values():
                v[~alive] = 0
            st["obs"] = envs.reset_done(~alive, next_obs)
            return N * C
    elif name == "flow_sde_ppo":
        K, C = args.denoising_steps, args.num_action_chunks
        agent = S.Agent(obs_dim, A, args.action_horizon, args.hidden_dim, args.backbone, args.backbone_path)
        agent.act_low.copy_(torch.as_tensor(space.low))
        agent.act_high.copy_(torch.as_tensor(space.high))
        kstar_rng = np.random.default_rng(1)
        st["obs"] = torch.as_tensor(envs.reset(seed=1)[0], dtype=torch.float32)
        st["ep"] = S.new_episode_stats(N, dev)

        def step():
            o = agent.normalize(st["obs"])
            ks = S.stochastic_steps(K, args.sde_steps, args.sampler, kstar_rng)
            with torch.no_grad():
                chain, logp = agent.sample(o, K, ks, args.noise_level, args.sampler)
                agent.value(o)
            S.reduce_log_prob(logp, C, args.logprob_type)
            st["obs"] = S.step_chunk(envs, agent.to_env(chain[:, -1, :C]), st["ep"], dev)[0]
            return N * C
    else:  # rl_cotrain
        K, H = args.denoising_steps, 1
        policy = S.FlowNoisePolicy(obs_dim, A, H, K, args.sigma_min, args.sigma_max, args.hidden_dim)
        critic = S.mlp(obs_dim, 1, args.hidden_dim)
        st["obs"] = envs.reset([1 + i for i in range(N)], rebuild=True)

        def step():
            with torch.no_grad():
                chain = S.sample_chain(policy, st["obs"])
                S.chain_log_prob(policy, st["obs"], chain, args.logprob_type, A)
                critic(policy.norm(st["obs"]))
            obs, _, term, trunc, _ = envs.step(S.chunk_actions(policy, chain, 1)[:, 0])
            st["obs"] = envs.reset_done(term | trunc, obs)
            return N

    # time inside the gym vector env's step/reset (worker physics + pipes), to split (b) into the env under
    # the policy's own actions and the main process's own work (inference, conversions, bookkeeping)
    in_env = [0.0]

    def clocked(fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                in_env[0] += time.perf_counter() - t0

        return call

    raw.step, raw.reset = clocked(raw.step), clocked(raw.reset)
    try:
        n, wall = timed(step, seconds, in_env=in_env)
        return n / wall, n / in_env[0]
    finally:
        envs.close()


def cli_flags(script, env, demos, n):
    return f"{README[(script, env)].format(demos=demos)} {BUDGET.format(n=n)} {EXTRA[script]}".split()


def full_loop(script, env, demos, n, timeout=600):
    """(c) The CLI for n env steps; returns (steps/s, [(step, sps) of every progress line], wall s)."""
    cmd = [sys.executable, f"{script}.py", *cli_flags(script, env, demos, n), "--exp-name", "throughput"]
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    lines = [(int(s), float(v)) for s, v in SPS.findall(out.stdout)]
    starts = [0] + [s for s, _ in lines[:-1]]
    intervals = [(s - p, v) for (s, v), p in zip(lines, starts, strict=True)]
    if script == "sac_flow" and len(intervals) > 1:  # its first interval holds the evaluation at step 0
        intervals = intervals[1:]
    sps = sum(d for d, _ in intervals) / sum(d / v for d, v in intervals)  # total steps / total time
    return sps, lines, time.time() - t0


def profile_main(S, script, env, demos, n, top=40) -> str:
    """cProfile of main() in this process for n env steps, switched on at the loop's first rollout step
    (sac_flow: its first SAC update) and off when the final evaluation starts: one rollout + one update,
    without start-up, SFT or evaluation. Returns the top entries and ms per update under the profiler
    (PPO: from the rollout's last step to the evaluation; sac_flow: sac_update's mean)."""
    args = tyro.cli(S.Args, args=cli_flags(script, env, demos, n) + ["--exp-name", "throughput_profile"])
    prof, state = cProfile.Profile(), {"on": False, "done": False, "in_eval": False, "update_s": float("nan")}
    trigger = {"sac_flow": "descend", "rl_cotrain": "sample_chain"}.get(script, "step_chunk")
    original_trigger, original_evaluate = getattr(S, trigger), S.evaluate

    def start(*a, **kw):
        if not (state["on"] or state["done"] or state["in_eval"]):
            state["on"] = True
            prof.enable()
        out = original_trigger(*a, **kw)
        state["t_last"] = time.perf_counter()
        return out

    def evaluate(*a, **kw):
        if state["on"]:
            prof.disable()
            state["on"], state["done"] = False, True
            state["update_s"] = time.perf_counter() - state["t_last"]
        state["in_eval"] = True
        try:
            return original_evaluate(*a, **kw)
        finally:
            state["in_eval"] = False

    setattr(S, trigger, start)
    S.evaluate = evaluate
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        S.main(args)
    finally:
        if state["on"]:
            prof.disable()
        setattr(S, trigger, original_trigger)
        S.evaluate = original_evaluate
        os.chdir(cwd)
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    ms = 1000 * state["update_s"]
    if script == "sac_flow":  # values: (primitive calls, calls, own time, cumulative time, callers)
        calls, cum = next((v[1], v[3]) for k, v in stats.stats.items() if k[2] == "sac_update")
        ms = 1000 * cum / calls
    stats.strip_dirs().sort_stats("cumulative").print_stats(top)
    return buf.getvalue(), ms


def write(rows, profiles, out):
    """Merge the rows measured so far into `out` and the profile file: a subset replaces its own rows and
    profile sections, the others stay. Called after every row, so a crash keeps what finished."""
    order = {(s_, e): i for i, (s_, e) in enumerate((s_, e) for s_ in SCRIPTS for e in ENVS)}
    done = {(r["script"], r["env"]) for r in rows}
    merged = list(rows)
    if os.path.exists(out):
        with open(out) as f:
            merged += [r for r in csv.DictReader(f) if (r["script"], r["env"]) not in done]
    merged.sort(key=lambda r: order[(r["script"], r["env"])])
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(merged)
    prof_path = Path(out).with_name("throughput_profile.txt")
    profiles = dict(profiles)
    if profiles and prof_path.exists():
        for section in prof_path.read_text().split("\n==== ")[1:]:
            key = tuple(section.split(":", 1)[0].split())
            profiles.setdefault(key, "==== " + section.rstrip("\n") + "\n")
    if profiles:
        body = "\n".join(profiles[k] for k in sorted(profiles, key=order.get))
        head = "bench/throughput.py: cProfile sections, top entries by cumulative time\n\n"
        prof_path.write_text(head + body)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--envs", nargs="+", default=ENVS, choices=ENVS)
    p.add_argument("--seconds", type=float, default=12.0, help="wall time of each of (a) and (b)")
    p.add_argument("--demo-path", default=DEMOS, help="PickCube-v1 h5 demos (make_demos.sh) for the SFT stub")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every step budget (0.1 to try the bench)"
    )
    p.add_argument("--out", default=str(ROOT / "results" / "throughput.csv"))
    o = p.parse_args()
    torch.set_num_threads(1)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    rev, date = rev.stdout.strip(), datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows, profiles = [], {}
    for script in o.scripts:
        S = importlib.import_module(script)
        for env in o.envs:
            if README[(script, env)] is None:
                continue
            args = parse(S, " ".join(cli_flags(script, env, o.demo_path, 1)))
            if script == "sac_flow":
                per_update, upd = 1.0 / args.utd, args.utd  # env steps per update, updates per env step
                n, n_prof = max(int(5000 * o.scale), 2000), 1000  # a progress line per 1000 steps
            else:
                if script == "reinflow":  # env steps per chunk decision
                    C = args.action_horizon
                else:
                    C = 1 if script == "rl_cotrain" else args.num_action_chunks
                per_update = args.num_envs * args.num_steps * C  # env steps per PPO iteration (one update)
                upd, n_prof = 1.0 / per_update, per_update
                n = per_update * max(1, round(4000 * o.scale / per_update))
            print(f"== {script} {env}: {' '.join(cli_flags(script, env, o.demo_path, n))}", flush=True)
            a = env_only(S, args, o.seconds)
            print(f"   (a) env-only {a:.0f} steps/s", flush=True)
            b, b_env = rollout(S, args, o.seconds)
            print(
                f"   (b) rollout  {b:.0f} steps/s; the env alone under its actions {b_env:.0f} steps/s",
                flush=True,
            )
            c, lines, wall = full_loop(script, env, o.demo_path, n)
            print(
                f"   (c) full loop {c:.0f} steps/s (progress lines {lines}; {wall:.0f} s with start-up)",
                flush=True,
            )
            ms = max(1 / c - 1 / b, 0.0) * per_update * 1000
            print(f"   (d) {ms:.1f} ms per update, {upd:.3g} updates per env step", flush=True)
            rows.append(dict(script=script, env=env, num_envs=args.num_envs, env_only_sps=f"{a:.1f}",
                             rollout_sps=f"{b:.1f}", full_loop_sps=f"{c:.1f}", ms_per_update=f"{ms:.1f}",
                             ms_per_update_profiled="", updates_per_env_step=f"{upd:.4g}",
                             rollout_over_env=f"{b / a:.3f}", full_over_env=f"{c / a:.3f}",
                             env_in_rollout_sps=f"{b_env:.1f}",
                             rollout_over_env_in_rollout=f"{b / b_env:.3f}",
                             flags=" ".join(cli_flags(script, env, "DEMO", n)), date=date,
                             commit=rev))  # fmt: skip
            if not o.no_profile:
                text, rows[-1]["ms_per_update_profiled"] = profile_main(S, script, env, o.demo_path, n_prof)
                rows[-1]["ms_per_update_profiled"] = f"{rows[-1]['ms_per_update_profiled']:.1f}"
                print(
                    f"   (d) under the profiler: {rows[-1]['ms_per_update_profiled']} ms per update",
                    flush=True,
                )
                what = f"the loop of main() for {n_prof} env steps (one rollout + one update), {date}, {rev}"
                profiles[(script, env)] = f"==== {script} {env}: {what}\n{text}"
                print(
                    text[: text.find("\n\n", text.find("ncalls")) if "ncalls" in text else 2000], flush=True
                )
            write(rows, profiles, o.out)
    print(f"wrote {o.out}")


if __name__ == "__main__":
    main()

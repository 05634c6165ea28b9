"""One row and one seed of the PickCube-v1 benchmark (issue 17): every flow method from the same demos, on
the same protocol. Trains the row's script once, keeps a copy of its checkpoint at each env-step mark, then
evaluates every mark with the script's own `--evaluate` on one fixed list of 200 initial states.

    OMP_NUM_THREADS=1 python bench/pickcube_benchmark.py --row flow_noise_ppo --seed 1
    python bench/pickcube_benchmark_results.py      # all runs -> results/benchmark/pickcube.csv, table, plot

Protocol (the same for every row):
- demos: `bash make_demos.sh PickCube-v1 100` (motion planner, pd_ee_delta_pos); 100-step episodes;
- SFT: 8000 flow-matching updates of batch 256 in every script (each keeps its own network and learning
  rate); the SFT policy is mark 0 of its row, so every row's 0 column is "SFT only" for that method;
- RL: 500k env steps for reinflow, flow_noise_ppo and flow_sde_ppo, 150k for sac_flow; 2 CPU envs
  (physx_cpu, one simulator per process), OMP_NUM_THREADS=1;
- evaluation: the noise-free policy, 200 episodes, `--seed 1000000`, so episode i starts from the reset with
  seed 1010000 + i in every script (each evaluates with seed + 10000 + i; disjoint from the training resets,
  seed + env step <= 500004, and from the demos' seeds 0..99); success_once and success_at_end;
- wall time: seconds from the start of the training process to the line in which it reports the mark's
  checkpoint (SFT, training and the script's own short in-run evaluations; not the 200-episode evaluations,
  which run afterwards).

Why one unbroken training process, not a resume per mark: reinflow anneals sigma_max over --total-timesteps,
so a run cut into segments of --total-timesteps <mark> is another run than the 500k one. The script evaluates
and checkpoints every gcd(marks) env steps (2 evaluation episodes, to keep that cheap); the runner reads its
output and copies the checkpoint it names right after `eval step <mark>` (sft.pt for mark 0) to
mark_<step>.pt.

Writes results/benchmark/runs/<row>_s<seed>/ (git-ignored: train.log, the script's runs/ directory,
mark_<step>.pt, mark_<step>.eval.json, eval.log, run.json) and results/benchmark/per_run/<row>_s<seed>.csv
(step, wall_s, success_once, success_at_end, return), which is committed. The same command again skips what is
done (a finished training, an evaluated mark); a training that did not reach its last mark starts again.
--train-only stops after training, so the trainings can run alone on the machine (their wall time is the
measurement) and the evaluations later.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmark"
DEMO = "demos/PickCube-v1/motionplanning/mp100.state.pd_ee_delta_pos.physx_cpu.h5"
EVAL_SEED = 1_000_000
EVAL_EPISODES = 200
PPO_MARKS = (0, 50_000, 100_000, 200_000, 300_000, 500_000)
SAC_MARKS = (0, 25_000, 50_000, 100_000, 150_000)

# Flags shared by every row: the protocol above. sac_flow's SFT batch is its --batch-size (256, its default).
COMMON = ("--env-id PickCube-v1 --control-mode pd_ee_delta_pos --max-episode-steps 100 --num-envs 2 "
          "--num-eval-envs 2 --sim-backend physx_cpu --vector-env gymnasium --sft-steps 8000")  # fmt: skip
SFT_BATCH = "--sft-batch-size 256"

# Each row's own flags: the README's best PickCube-v1 command for its script (and the results notes named).
ROWS = {
    # README "sac_flow.py: SAC Flow", the offline-to-online command (the 0.96 row; results/sac_flow/
    # commands.md, pickcube_g_o2o.csv): defaults otherwise (utd 0.5, batch 256, bootstrap through success).
    "sac_flow_g": ("sac_flow.py", "--velocity g", SAC_MARKS),
    # the same command with the paper's other velocities (README's Hopper/Pendulum rows: --velocity t / naive)
    "sac_flow_t": ("sac_flow.py", "--velocity t", SAC_MARKS),
    "sac_flow_naive": ("sac_flow.py", "--velocity naive", SAC_MARKS),
    # README "reinflow.py: ReinFlow", the PickCube fine-tuning command (actor lr 1e-5, the row that did not
    # collapse; results/reinflow/pickcube_ft_lr1e-5.csv); K=4 is the default --denoising-steps. Plus RLinf's
    # relative reward and large rollout batches (flow_noise_ppo's lessons: 10k env steps per update, one
    # critic-only iteration) and no entropy bonus. On the dense reward seed 2 fell from 0.18 to 0.00 at 500k;
    # with 1k-step batches seeds 1 and 3 peaked by 100k and ended below their start (seed 1 also without the
    # bonus, which pushed sigma to its bound; results/benchmark/COMMANDS.md, "What was tried")
    "reinflow": ("reinflow.py", f"{SFT_BATCH} --denoising-steps 4 --sigma-min 0.02 --sigma-max 0.05 "
                 "--learning-rate 1e-5 --critic-warmup-iters 1 --target-kl 0.1 --relative-reward "
                 "--ent-coef 0 --num-steps 1250", PPO_MARKS),  # fmt: skip
    # README "flow_noise_ppo.py", the long-run command (L1 in results/flow_noise_ppo/README.md: 0.365 -> 0.69)
    "flow_noise_ppo": ("flow_noise_ppo.py", f"{SFT_BATCH} --reward-mode normalized_dense --relative-reward "
                       "--sigma-min 0.02 --sigma-max 0.04 --learning-rate 1e-5 --num-steps 1000 "
                       "--num-minibatches 10 --critic-warmup-iters 1", PPO_MARKS),  # fmt: skip
    # README "flow_sde_ppo.py", the command matched against flow_noise_ppo (results/flow_sde_ppo/COMMANDS.md)
    "flow_sde_ppo": ("flow_sde_ppo.py", f"{SFT_BATCH} --num-steps 200 --learning-rate 1e-5 "
                     "--critic-warmup-iters 3 --logprob-type token", PPO_MARKS),  # fmt: skip
}


def fail(msg: str):
    raise SystemExit(f"error: {msg}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", required=True, choices=sorted(ROWS))
    p.add_argument("--seed", type=int, required=True, help="training seed (the protocol runs 1, 2, 3)")
    p.add_argument("--demo-path", default=DEMO, help="ManiSkill h5 (default: make_demos.sh's 100)")
    p.add_argument("--marks", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="env-step marks, comma-separated (default: the protocol's for the row)")  # fmt: skip
    p.add_argument("--eval-episodes", type=int, default=EVAL_EPISODES, help="episodes per mark evaluation")
    p.add_argument("--train-only", action="store_true",
                   help="stop after training; the same command without it then evaluates the marks")
    p.add_argument("--extra", default="", help="flags after the row's (the later flag wins); for probes only")
    p.add_argument("--out", type=Path, default=OUT, help="where runs/ and per_run/ go")
    args = p.parse_args(argv)
    args.marks = args.marks or ROWS[args.row][2]
    if list(args.marks) != sorted(set(args.marks)) or args.marks[0] != 0 or len(args.marks) < 2:
        fail(f"--marks {args.marks}: increasing env steps that start at 0, at least two")
    if not Path(args.demo_path).is_file():
        fail(f"--demo-path {args.demo_path} not found: make it with `bash make_demos.sh PickCube-v1 100`")
    return args


def row_flags(args) -> list[str]:
    """The flags that define the row (its env, network and training), given to training and --evaluate."""
    _, flags, _ = ROWS[args.row]
    demo = str(Path(args.demo_path).resolve())
    return shlex.split(f"{COMMON} {flags} --demo-path {demo} {args.extra}")


def train(args, script: str, run_dir: Path) -> dict[int, float]:
    """One unbroken training run; returns {mark: wall seconds} and leaves mark_<step>.pt in run_dir."""
    gcd = math.gcd(*args.marks)
    cmd = [sys.executable, str(ROOT / script), *row_flags(args), "--seed", str(args.seed),
           "--total-timesteps", str(args.marks[-1]), "--eval-freq", str(gcd), "--eval-episodes", "2",
           "--exp-name", f"bench_{args.row}"]  # fmt: skip
    (run_dir / "train_cmd.txt").write_text(shlex.join(cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    walls, last_eval = {}, None
    t0 = time.monotonic()
    with open(run_dir / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:
            log.write(line)
            if m := re.match(r"eval step (\d+)", line):
                last_eval = int(m.group(1))
            elif m := re.match(r"checkpoint (\S+)", line):
                path = run_dir / m.group(1)
                step = 0 if path.name == "sft.pt" else last_eval if path.name == "ckpt.pt" else None
                if step in args.marks and step not in walls:
                    walls[step] = round(time.monotonic() - t0, 1)
                    shutil.copyfile(path, run_dir / f"mark_{step}.pt")
                    print(f"{args.row} s{args.seed}: mark {step} at {walls[step]:.0f} s", flush=True)
        rc = proc.wait()
    if rc != 0:
        fail(f"{script} exited with {rc}; see {run_dir / 'train.log'}")
    missing = [m for m in args.marks if m not in walls]
    if missing:
        fail(f"no checkpoint at marks {missing} (each mark must be a multiple of the script's env steps per "
             f"iteration); see {run_dir / 'train.log'}")  # fmt: skip
    return walls


def evaluate(args, script: str, run_dir: Path, step: int) -> dict:
    """The script's own --evaluate of mark_<step>.pt on the fixed initial states; returns its eval.json."""
    ckpt = run_dir / f"mark_{step}.pt"
    out = run_dir / f"mark_{step}.eval.json"
    if not out.exists():
        cmd = [sys.executable, str(ROOT / script), *row_flags(args), "--checkpoint", str(ckpt), "--evaluate",
               "--eval-episodes", str(args.eval_episodes), "--seed", str(EVAL_SEED)]  # fmt: skip
        with open(run_dir / "eval.log", "a") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            env = dict(os.environ, OMP_NUM_THREADS="1")
            rc = subprocess.run(cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if rc != 0 or not out.exists():
            fail(f"--evaluate of {ckpt} exited with {rc}; see {run_dir / 'eval.log'}")
    res = json.loads(out.read_text())
    if res.get("eval_episodes", res.get("episodes")) != args.eval_episodes:
        fail(f"{out} has {res.get('eval_episodes', res.get('episodes'))} episodes, not {args.eval_episodes}: "
             "delete it to evaluate again")  # fmt: skip
    return res


def main(argv=None):
    args = parse_args(argv)
    script = ROWS[args.row][0]
    name = f"{args.row}_s{args.seed}"
    run_dir, csv = args.out / "runs" / name, args.out / "per_run" / f"{name}.csv"
    run_dir.mkdir(parents=True, exist_ok=True)
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    trained = all((run_dir / f"mark_{m}.pt").exists() for m in args.marks)
    if info.get("marks") != list(args.marks) or not trained:
        for old in run_dir.glob("mark_*"):  # a stale or partial run: start it again
            old.unlink()
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        t_start = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        walls = train(args, script, run_dir)
        info = dict(row=args.row, seed=args.seed, script=script, marks=list(args.marks), started=t_start,
                    commit=commit.strip(), flags=row_flags(args), load_at_end=os.getloadavg(),
                    wall_s={str(k): w for k, w in walls.items()})  # fmt: skip
        info_path.write_text(json.dumps(info, indent=1))
    if args.train_only:
        return
    rows = []
    for step in args.marks:
        res = evaluate(args, script, run_dir, step)
        ret = res.get("return", res.get("episode_return"))
        wall = info["wall_s"][str(step)]
        rows.append((step, wall, res["success_once"], res["success_at_end"], ret))
        print(f"{name} mark {step}: success_once {res['success_once']:.3f} success_at_end "
              f"{res['success_at_end']:.3f} (wall {wall:.0f} s)", flush=True)  # fmt: skip
    csv.parent.mkdir(parents=True, exist_ok=True)
    lines = ["step,wall_s,success_once,success_at_end,return"]
    lines += [f"{s},{w:.1f},{once:.4f},{end:.4f},{ret:.4f}" for s, w, once, end, ret in rows]
    csv.write_text("\n".join(lines) + "\n")
    print(f"wrote {csv}")


if __name__ == "__main__":
    main()

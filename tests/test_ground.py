"""The ground every script stands on: the CPU simulator starts and offline demos have ManiSkill's format."""

import json
import subprocess

import h5py
import pytest
import torch
from conftest import ROOT


def test_maniskill_runs_on_cpu():
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the ids)
    from mani_skill.utils.gym_utils import find_max_episode_steps_value
    from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

    env = gym.make(
        "PickCube-v1",
        obs_mode="state",
        sim_backend="physx_cpu",
        render_backend="cpu",
        control_mode="pd_ee_delta_pos",
        reward_mode="normalized_dense",
    )
    assert find_max_episode_steps_value(env) == 50
    env = CPUGymWrapper(env)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (42,) and env.action_space.shape == (4,)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert "success" in info and 0.0 <= float(reward) <= 1.0
    env.close()


def test_demos_have_maniskill_format(pickcube_demos):
    meta = json.loads(pickcube_demos.with_suffix(".json").read_text())
    assert meta["env_info"]["env_kwargs"]["control_mode"] == "pd_ee_delta_pos"
    with h5py.File(pickcube_demos) as f:
        assert len(f.keys()) == 10
        for key in f:
            obs, actions = f[key]["obs"], f[key]["actions"]
            assert obs.shape[0] == actions.shape[0] + 1 and obs.shape[1] == 42 and actions.shape[1] == 4
            assert bool(f[key]["success"][-1])


def test_gpu_check_without_a_gpu_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu_check.sh would run the real check")
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "no GPU" in result.stdout
    assert not (ROOT / "runs" / "gpu_check").exists()



def test_benchmark_rows_parse_with_their_scripts(tmp_path):
    """Every row of bench/pickcube_benchmark.py, as it trains and as it evaluates, is a valid command line of
    its script (a renamed flag fails here, not hours into a benchmark run)."""
    import importlib
    import sys

    import tyro

    sys.path.insert(0, str(ROOT / "bench"))
    import pickcube_benchmark as B

    demo = tmp_path / "demos.h5"
    demo.touch()
    for row, (script, _, marks) in B.ROWS.items():
        args = B.parse_args(["--row", row, "--seed", "1", "--demo-path", str(demo)])
        assert args.marks == marks and marks[-1] == (150_000 if script == "sac_flow.py" else 500_000)
        S = importlib.import_module(script.removesuffix(".py"))
        train = tyro.cli(S.Args, args=[*B.row_flags(args), "--total-timesteps", str(marks[-1])])
        protocol = (train.env_id, train.max_episode_steps, train.num_envs, train.num_eval_envs)
        assert protocol == ("PickCube-v1", 100, 2, 2) and train.sft_steps == 8000
        assert train.demo_path == str(demo.resolve())
        tyro.cli(S.Args, args=[*B.row_flags(args), "--checkpoint", "x.pt", "--evaluate", "--seed", "1000000"])
    with pytest.raises(SystemExit, match="--marks"):
        B.parse_args(["--row", "reinflow", "--seed", "1", "--demo-path", str(demo), "--marks", "50,0"])

#!/usr/bin/env bash
# Makes ManiSkill3 demonstrations offline (no hub download): ManiSkill's motion planner (mplib) solves
# the task on the CPU simulator, then ManiSkill's replay tool converts the joint-position trajectories
# into state observations, the chosen controller's actions and normalized_dense rewards.
# usage: bash make_demos.sh [ENV_ID=PickCube-v1] [NUM=100] [CONTROL_MODE=pd_ee_delta_pos] [OUT_DIR=demos]
# prints the path of the h5 file (ManiSkill's format: traj_i/{obs,actions,rewards,success,...} + json)
set -euo pipefail
env_id=${1:-PickCube-v1}; num=${2:-100}; control_mode=${3:-pd_ee_delta_pos}; out=${4:-demos}
name="mp${num}"
python3 -m mani_skill.examples.motionplanning.panda.run -e "$env_id" -n "$num" -b cpu --only-count-success \
  --num-procs 1 --record-dir "$out" --traj-name "$name" >&2
python3 -m mani_skill.trajectory.replay_trajectory --traj-path "$out/$env_id/motionplanning/$name.h5" \
  -b physx_cpu -o state -c "$control_mode" --save-traj --record-rewards --reward-mode normalized_dense \
  --num-envs 1 >&2
echo "$out/$env_id/motionplanning/$name.state.$control_mode.physx_cpu.h5"

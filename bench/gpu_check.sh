#!/usr/bin/env bash
# One prepared check of the GPU path: each RL script's PickCube-v1 command on physx_cuda (ManiSkillVectorEnv;
# sac_flow's own GPU default of 512 envs, 256 for the PPO scripts) for a short fixed budget. Prints per script
# the env steps/s of its last progress line, its first evaluation line and any error line; logs in $LOG_DIR.
# With no GPU it says so and exits 0. The whole check is sized to finish in under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh                 # demos: makes 10 with make_demos.sh unless DEMO=path.h5 is given
#   SECONDS_PER_SCRIPT=60 LOG_DIR=$OUT bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-runs/gpu_check}
SECONDS_PER_SCRIPT=${SECONDS_PER_SCRIPT:-75}

if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no GPU (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
mkdir -p "$LOG_DIR"
$PY -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" \
  | tee "$LOG_DIR/summary.txt"
date -u '+gpu_check: %Y-%m-%d %H:%M UTC' | tee -a "$LOG_DIR/summary.txt"

DEMO=${DEMO:-}
if [ -z "$DEMO" ]; then
  DEMO=$(bash make_demos.sh PickCube-v1 10 pd_ee_delta_pos "$LOG_DIR/demos" 2>"$LOG_DIR/make_demos.log" | tail -1)
fi

GPU="--env-id PickCube-v1 --sim-backend physx_cuda --exp-name gpu_check"
PPO="$GPU --num-envs 256 --num-eval-envs 16"  # the PPO scripts default to 2 envs on either backend
declare -A CMD=(
  [sac_flow]="sac_flow.py $GPU --total-timesteps 20000 --learning-starts 2000 --eval-freq 10000"
  [reinflow]="reinflow.py $PPO --demo-path $DEMO --sft-steps 200 --total-timesteps 100000 --eval-freq 20000"
  [flow_noise_ppo]="flow_noise_ppo.py $PPO --demo-path $DEMO --sft-steps 200 --total-timesteps 100000 --eval-freq 20000"
  [flow_sde_ppo]="flow_sde_ppo.py $PPO --demo-path $DEMO --sft-steps 200 --total-timesteps 100000 --eval-freq 20000"
  [rl_cotrain]="rl_cotrain.py $PPO --num-steps 40 --demo-path $DEMO --real-demos 4 --sft-steps 200 --total-timesteps 100000 --eval-freq 20000"
)
for s in sac_flow reinflow flow_noise_ppo flow_sde_ppo rl_cotrain; do
  log="$LOG_DIR/$s.log"
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$SECONDS_PER_SCRIPT" env PYTHONUNBUFFERED=1 $PY ${CMD[$s]} >"$log" 2>&1
  rc=$?
  status="ok"
  [ $rc -eq 124 ] && status="stopped at the ${SECONDS_PER_SCRIPT}s budget"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED (exit $rc)"
  {
    echo "== $s: $status, $(($(date +%s) - start)) s"
    echo "   command: python ${CMD[$s]}"
    echo "   speed:   $(grep -E 'steps/s' "$log" | tail -1)"
    echo "   eval:    $(grep -E '^eval' "$log" | head -1)"
    grep -E '^error:|Error|Traceback' "$log" | head -3 | sed 's/^/   error:   /'
  } | tee -a "$LOG_DIR/summary.txt"
done
echo "gpu_check: logs in $LOG_DIR"

#!/usr/bin/env bash
# One launcher for every scale: a CPU smoke run, one GPU, N GPUs, N nodes (SLURM or plain env vars).
# Runs the recipe's stages in order: sft -> dpo -> grpo (each with its eval hook when `eval` is a stage) -> export.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./launch.sh [--dry-run] [--config NAME] [--max-restarts N] [RECIPE [key=value ...]]

  RECIPE          a YAML recipe, e.g. recipes/chartqa.yaml; default: recipes/demo.yaml (the CPU demo)
  key=value       recipe overrides by dotted path, e.g. train.lr=1.0e-4 data.train.0.limit=1000
  --config NAME   accelerate config in recipes/accelerate/: cpu, ddp, zero2, zero3, fsdp2
                  (default: cpu without a GPU, ddp with GPUs)
  --max-restarts N  restart a failed stage up to N times (torchrun's elastic agent, through accelerate launch):
                  a lost rank ends every rank of the stage, all restart and resume from the newest complete
                  checkpoint (train.resume=true is passed). Needs more than one process.
  --dry-run       print the exact commands and exit
  --debug         print the traceback of an error, not only its message (same as PHI3V_DEBUG=1)
  -h, --help      this help

Environment (SLURM's variables are read when present):
  NPROC        processes per node    (default: number of GPUs, or 1 on CPU)
  NNODES       nodes                 (default: $SLURM_NNODES or 1)
  NODE_RANK    this node's rank      (default: $SLURM_NODEID or 0)
  MASTER_ADDR  rank-0 host           (default: first host of $SLURM_JOB_NODELIST, or 127.0.0.1)
  MASTER_PORT  rendezvous port       (default: 29500)
  PYTHON       interpreter           (default: python)
  OMP_NUM_THREADS  intra-op threads per process (default: usable cores / NPROC, at least 1); the recipe's
                   train.num_threads, when set, wins over it
USAGE
}

dry_run=0
config=""
max_restarts=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --debug) export PHI3V_DEBUG=1; shift ;;
    --config) config="${2:?--config needs a name}"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a number}"; shift 2 ;;
    --max-restarts=*) max_restarts="${1#--max-restarts=}"; shift ;;
    -*) echo "launch.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -ge 1 ]]; then
  recipe="$1"; shift
else
  recipe="$here/recipes/demo.yaml"
  echo "launch.sh: no recipe given; running the CPU demo, $recipe"
fi
overrides=("$@")
[[ -f "$recipe" ]] || { echo "launch.sh: recipe file '$recipe' not found" >&2; exit 2; }

PYTHON="${PYTHON:-python}"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || echo 0)
fi
NPROC="${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
NNODES="${NNODES:-${SLURM_NNODES:-1}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [[ -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
  MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
fi
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
config="${config:-$([[ $gpus -gt 0 ]] && echo ddp || echo cpu)}"
config_file="$here/recipes/accelerate/$config.yaml"
[[ -f "$config_file" ]] || { echo "launch.sh: no accelerate config '$config' ($config_file)" >&2; exit 2; }
for n in NPROC NNODES NODE_RANK MASTER_PORT max_restarts; do
  [[ "${!n}" =~ ^[0-9]+$ ]] || { echo "launch.sh: $n must be a whole number, got '${!n}'" >&2; exit 2; }
done
# One share of this node's cores per process, unless the caller chose: N processes x all cores oversubscribe.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores=$(nproc 2>/dev/null || echo 1)
  OMP_NUM_THREADS=$(( NPROC > 0 && cores / NPROC > 0 ? cores / NPROC : 1 ))
fi
export OMP_NUM_THREADS

# Everything derived from the recipe comes from Python (validation included: a bad recipe stops here).
# One run directory for every node: under SLURM named by the job id, else output_dir= must be given for NNODES > 1.
output_dir="$("$PYTHON" -m train.tools.launch_plan "$recipe" "${overrides[@]}" --field output_dir \
              --job-id "${SLURM_JOB_ID:-}" --nodes "$NNODES")"
world=$(( NPROC * NNODES ))
# --processes: the plan refuses a train.sequence_parallel group that does not divide the job's processes.
stage_list="$("$PYTHON" -m train.tools.launch_plan "$recipe" "${overrides[@]}" --field stages --processes "$world")" \
  || exit 2
read -r -a stages <<< "$stage_list"
# Every stage writes into the same run directory.
run_overrides=("${overrides[@]}")
[[ " ${overrides[*]} " == *" output_dir="* ]] || run_overrides+=("output_dir=$output_dir")
if [[ $max_restarts -gt 0 ]]; then
  [[ $world -gt 1 ]] || { echo "launch.sh: --max-restarts needs more than one process (NPROC x NNODES)" >&2; exit 2; }
  # a restarted rank continues from the newest complete checkpoint (added once: a repeated override warns)
  [[ " ${overrides[*]} " == *" train.resume=true "* ]] || run_overrides+=("train.resume=true")
fi

launcher=("$PYTHON" -m accelerate.commands.launch --config_file "$config_file"
          --num_machines "$NNODES" --num_processes "$world" --machine_rank "$NODE_RANK"
          --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
[[ $max_restarts -gt 0 ]] && launcher+=(--max_restarts "$max_restarts")
env_prefix=()
if [[ "$config" == cpu ]]; then
  if [[ $world -gt 1 ]]; then
    # Several CPU processes need --multi_gpu with ACCELERATE_USE_CPU=1 (--cpu alone runs one process).
    env_prefix=(env ACCELERATE_USE_CPU=1)
    launcher+=(--multi_gpu)
  else
    launcher=("$PYTHON")  # one process: no launcher needed
  fi
fi

commands=()
for stage in "${stages[@]}"; do
  case "$stage" in
    sft|dpo|grpo) commands+=("$(printf '%q ' "${env_prefix[@]}" "${launcher[@]}" "$here/train/$stage.py" "$recipe" "${run_overrides[@]}")") ;;
    eval) ;;  # the eval hook runs inside the training stages; alone it is: python -m eval RECIPE --model RUN_DIR
    export) [[ $NODE_RANK -eq 0 ]] && commands+=("$(printf '%q ' "$PYTHON" -m train.export "$output_dir")") ;;
  esac
done
# Export and a lone eval run once, on node 0 (the other nodes only take part in the training stages).
if [[ $NODE_RANK -eq 0 && " ${stages[*]} " == *" eval "* && " ${stages[*]} " != *" sft "* && " ${stages[*]} " != *" dpo "* && " ${stages[*]} " != *" grpo "* ]]; then
  commands+=("$(printf '%q ' "$PYTHON" -m eval "$recipe" --model "$output_dir")")
fi

echo "launch.sh: recipe $recipe, stages: ${stages[*]}, run directory: $output_dir"
echo "launch.sh: $NNODES node(s) x $NPROC process(es), accelerate config '$config', OMP_NUM_THREADS=$OMP_NUM_THREADS"
for command in "${commands[@]}"; do echo "+ $command"; done
[[ $dry_run -eq 1 ]] && exit 0

# One writer per run directory: node 0 takes the lock for the whole launch (a second launch into it exits 2 naming
# this one); every stage joins it through the token, and it is released when this script exits, however it exits.
if [[ $NODE_RANK -eq 0 ]]; then
  PHI3V_RUN_LOCK="$("$PYTHON" -m rundir.run_lock acquire "$output_dir" --pid $$ --command "launch.sh $recipe ${overrides[*]}")"
  export PHI3V_RUN_LOCK
  trap '"$PYTHON" -m rundir.run_lock release "$output_dir" --token "$PHI3V_RUN_LOCK" || true' EXIT
  # A signal ends the launch through the EXIT trap too (bash runs it after the running stage, which handles the
  # same SIGTERM by saving a checkpoint, has exited); an unhandled SIGTERM would skip it.
  trap 'exit 143' TERM
  trap 'exit 130' INT
fi
for command in "${commands[@]}"; do
  eval "$command"
done
# Scores (base / SFT / DPO), rows skipped per stage, and where the report, adapters and exports are.
"$PYTHON" -m eval.summary "$output_dir"
echo "launch.sh: done; run directory: $output_dir"

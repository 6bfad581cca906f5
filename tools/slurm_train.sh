#!/usr/bin/env bash
# Train on several machines under SLURM: one task per machine, each running `accelerate launch` for the
# machine's GPUs, the rendezvous taken from SLURM's variables. In a batch script:
#
#   #SBATCH --nodes=2
#   #SBATCH --ntasks-per-node=1
#   #SBATCH --gpus-per-node=8
#   #SBATCH --cpus-per-task=64
#   #SBATCH --signal=TERM@120          # SIGTERM 2 minutes before the time limit: a checkpoint, then exit
#   srun bash tools/slurm_train.sh configs/frcnn_r101.yaml train.collective_timeout_s=600
#
# Every argument goes to tools/train.py. Environment (all optional):
#   GPUS_PER_NODE    processes a machine (default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1)
#   MAIN_PORT        the rendezvous port on the first machine (default: 29500 + SLURM_JOB_ID % 1000)
#   MAX_RESTARTS     workers restarted this many times after a lost one, each resuming from the newest intact
#                    checkpoint (default 0: a lost worker ends the job, and `sbatch --requeue` or a new job
#                    with the same output_dir resumes it)
#   ACCELERATE_ARGS  more `accelerate launch` options, e.g. "--mixed_precision bf16"
set -euo pipefail
: "${SLURM_JOB_NODELIST:?run this with srun inside a SLURM allocation (one task per machine)}"
: "${SLURM_NNODES:?}" "${SLURM_NODEID:?}" "${SLURM_JOB_ID:?}"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The first host of the allocation. Not `scontrol ... | head -n 1`: head leaves after one line, and under
# pipefail the SIGPIPE scontrol then gets on a later line would end this script (exit code 141, no message).
hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
main_host="${hosts%%$'\n'*}"
gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}"
[ "${gpus:-0}" -ge 1 ] 2>/dev/null || gpus=1
port="${MAIN_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
restarts="${MAX_RESTARTS:-0}"

# shellcheck disable=SC2086  # ACCELERATE_ARGS is a list of options
exec python -m accelerate.commands.launch --multi_gpu \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes "$((SLURM_NNODES * gpus))" \
    --main_process_ip "$main_host" --main_process_port "$port" \
    --max_restarts "$restarts" \
    ${ACCELERATE_ARGS:-} \
    tools/train.py "$@"

#!/usr/bin/env bash
# One SLURM task = one rank, started by launch/slurm.sbatch through srun: torch's rendezvous variables from SLURM's,
# then the trainer.
#
#   srun launch/slurm_task.sh [--dry-run] [overrides...]
#
# Environment: SLURM_PROCID -> RANK, SLURM_LOCALID -> LOCAL_RANK, SLURM_NTASKS -> WORLD_SIZE (set by srun);
# MASTER_ADDR, MASTER_PORT (exported by slurm.sbatch); OMP_NUM_THREADS [SLURM_CPUS_PER_TASK, else 1];
# PYTHON, the interpreter with asymoe_train installed [python]; DRY_RUN=1, same as --dry-run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_parse "$@"
for var in SLURM_PROCID SLURM_LOCALID SLURM_NTASKS MASTER_ADDR MASTER_PORT; do
    [[ -n ${!var:-} ]] || launch_die "$var is not set: run through srun, from launch/slurm.sbatch"
done
launch_exec env RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS" \
    MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT" OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}" \
    "${PYTHON:-python}" -u -m asymoe_train.cli ${ARGS[@]+"${ARGS[@]}"}

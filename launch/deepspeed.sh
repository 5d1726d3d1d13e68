#!/usr/bin/env bash
# Train with the DeepSpeed launcher: one node, or several nodes listed in a DeepSpeed hostfile.
#
#   launch/deepspeed.sh [--dry-run] [overrides...]
#
#   NUM_GPUS=8 launch/deepspeed.sh experiment=demo engine=gpu          # this node
#   HOSTFILE=hostfile launch/deepspeed.sh engine=gpu model/moe=asymoe  # every node in the hostfile (via pdsh/ssh)
#
# Environment (defaults in brackets):
#   NUM_GPUS     GPUs per node [nvidia-smi's count, else 1; with HOSTFILE: the slots of each host]
#   HOSTFILE     DeepSpeed hostfile, lines of `<host> slots=<gpus>`; set = multi-node [unset: this node only]
#   NNODES       with HOSTFILE: use the first NNODES hosts [all of them]
#   MASTER_ADDR  with HOSTFILE: address of rank 0 [the first host of the hostfile]
#   MASTER_PORT  rendezvous port [29500]
#   EXPERIMENT   experiment=... when no such override is given [demo]
#   RUN_ID, RUN_DIR  the run directory every rank writes to [outputs/<experiment>/<time>]
#   OMP_NUM_THREADS  threads per rank on this node [1, as torchrun does; other hosts read .deepspeed_env]
#   DRY_RUN=1    same as --dry-run: print the command, run nothing
#
# The launcher runs `python -m asymoe_train.cli` on every rank with --no_local_rank (a Hydra app rejects the
# --local_rank argument; ranks read LOCAL_RANK from the environment) and with the same hydra.run.dir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_parse "$@"
launch_run_dir

cmd=(deepspeed)
if [[ -n ${HOSTFILE:-} ]]; then
    [[ -f $HOSTFILE ]] || launch_die "HOSTFILE=$HOSTFILE: no such file"
    first_host=$(awk '$1 !~ /^#/ && NF {print $1; exit}' "$HOSTFILE")
    [[ -n $first_host ]] || launch_die "HOSTFILE=$HOSTFILE lists no host"
    cmd+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$first_host}")
    [[ -z ${NNODES:-} ]] || cmd+=(--num_nodes "$NNODES")
    [[ -z ${NUM_GPUS:-} ]] || cmd+=(--num_gpus "$NUM_GPUS")
else
    cmd+=(--num_gpus "$(launch_num_gpus)")
fi
cmd+=(--master_port "${MASTER_PORT:-29500}" --no_local_rank --module asymoe_train.cli "${TRAIN_ARGS[@]}")
launch_exec env OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "${cmd[@]}"

#!/usr/bin/env bash
# Train with torchrun: one node, or several nodes that each run this script (rendezvous through rank 0's node).
#
#   launch/torchrun.sh [--dry-run] [overrides...]
#
#   NUM_GPUS=8 launch/torchrun.sh experiment=demo engine=gpu
#   # on each of 4 nodes, with the same RUN_ID everywhere:
#   NNODES=4 MASTER_ADDR=node-0 RUN_ID=asymoe-try1 launch/torchrun.sh engine=gpu model/moe=asymoe
#
# Environment (defaults in brackets):
#   NUM_GPUS      ranks (GPUs) on this node [nvidia-smi's count, else 1]
#   NNODES        nodes; > 1 = multi-node [1: --standalone, a free local port]
#   MASTER_ADDR, MASTER_PORT  multi-node: the rendezvous endpoint, a host of the job [required, 29500]
#   RDZV_BACKEND  multi-node: c10d (elastic, nodes get their rank at rendezvous) or static (fixed ranks) [c10d]
#   NODE_RANK     with RDZV_BACKEND=static: this node's rank, 0 on MASTER_ADDR [required]
#   RUN_ID        names the run directory and the rendezvous (--rdzv-id); multi-node: required, the same on every
#                 node, since each node computes the run directory itself [single node: the current time]
#   RUN_DIR       the run directory every rank writes to [outputs/<experiment>/<RUN_ID>]
#   EXPERIMENT    experiment=... when no such override is given [demo]
#   DRY_RUN=1     same as --dry-run: print the command, run nothing
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
launch_parse "$@"
NNODES=${NNODES:-1}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || launch_die "NNODES=$NNODES is not a positive number"
if ((NNODES > 1)); then
    [[ -n ${RUN_ID:-} ]] || launch_die "NNODES=$NNODES: set RUN_ID, the same on every node (rendezvous id and run directory)"
    [[ -n ${MASTER_ADDR:-} ]] || launch_die "NNODES=$NNODES: set MASTER_ADDR, the rendezvous host"
fi
launch_run_dir

cmd=(torchrun --nproc-per-node "$(launch_num_gpus)")
if ((NNODES == 1)); then
    cmd+=(--standalone)
else
    port=${MASTER_PORT:-29500}
    case ${RDZV_BACKEND:-c10d} in
        c10d) cmd+=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$port" --rdzv-id "$RUN_ID") ;;
        static)
            [[ -n ${NODE_RANK:-} ]] || launch_die "RDZV_BACKEND=static: set NODE_RANK (0 on MASTER_ADDR)"
            cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$port") ;;
        *) launch_die "RDZV_BACKEND=$RDZV_BACKEND: expected c10d or static" ;;
    esac
fi
launch_exec "${cmd[@]}" --module asymoe_train.cli "${TRAIN_ARGS[@]}"

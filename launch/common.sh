# shellcheck shell=bash
# Sourced by the launch scripts: argument parsing with the dry-run flag, the run directory every rank shares, and
# the command runner. Not a script of its own.
#
# Every launched rank composes its Hydra config separately, and Hydra's default run directory is named by the
# second it was composed in, so ranks starting a second apart would write to different directories. The scripts
# compute the directory once and pass `hydra.run.dir=<dir>` to every rank.

DRY_RUN=${DRY_RUN:-0}
ARGS=()  # the script's arguments minus its own flags: Hydra overrides for asymoe-train, passed through as given

# Print the comment block at the top of the calling script (its usage).
launch_usage() {
    sed -n '2,${/^#\( \|$\)/!q;s/^# \{0,1\}//;p}' "$0"
}

launch_die() {
    echo "$(basename "$0"): $*" >&2
    exit 2
}

# launch_parse "$@": --dry-run (anywhere) sets DRY_RUN=1, -h/--help prints the usage; the rest goes to ARGS.
launch_parse() {
    local arg
    for arg in "$@"; do
        case $arg in
            --dry-run) DRY_RUN=1 ;;
            -h | --help) launch_usage; exit 0 ;;
            -m | --multirun | hydra.mode=MULTIRUN)
                launch_die "sweeps do not go through a launch script: use asymoe-train -m hydra/launcher=slurm ..." ;;
            *) ARGS+=("$arg") ;;
        esac
    done
}

# launch_run_dir [DEFAULT_OVERRIDES...]: pin the run directory. Sets EXPERIMENT (an experiment=... override in ARGS,
# else $EXPERIMENT, else demo), RUN_ID (default: the current time), RUN_DIR (default outputs/<experiment>/<run_id>,
# made absolute so ranks on other nodes find it on a shared filesystem) and TRAIN_ARGS, what every rank gets:
# experiment=<experiment> (unless in ARGS), hydra.run.dir=<dir>, DEFAULT_OVERRIDES (e.g. resume=auto), then ARGS,
# so that an override in ARGS replaces a default (Hydra applies the last one).
launch_run_dir() {
    local arg given=""
    for arg in ${ARGS[@]+"${ARGS[@]}"}; do
        [[ $arg == experiment=* ]] && given=${arg#experiment=}
    done
    EXPERIMENT=${given:-${EXPERIMENT:-demo}}
    RUN_ID=${RUN_ID:-$(date +%Y%m%d-%H%M%S)}
    RUN_DIR=${RUN_DIR:-outputs/$EXPERIMENT/$RUN_ID}
    [[ $RUN_DIR == /* ]] || RUN_DIR=$PWD/$RUN_DIR
    TRAIN_ARGS=()
    [[ -n $given ]] || TRAIN_ARGS+=("experiment=$EXPERIMENT")
    TRAIN_ARGS+=("hydra.run.dir=$RUN_DIR" "$@" ${ARGS[@]+"${ARGS[@]}"})
}

# GPUs on this node: $NUM_GPUS, else the count nvidia-smi lists, else 1.
launch_num_gpus() {
    local count=0
    if [[ -n ${NUM_GPUS:-} ]]; then
        count=$NUM_GPUS
        [[ $count =~ ^[0-9]+$ ]] || launch_die "NUM_GPUS=$count is not a number"
    elif command -v nvidia-smi >/dev/null; then
        count=$(nvidia-smi -L | grep -c '^GPU' || true)
    fi
    echo $((count > 0 ? count : 1))
}

# Print a command shell-quoted on one line (ready to paste).
launch_print() {
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
}

# launch_exec CMD...: with DRY_RUN=1 print the command and exit 0, otherwise replace this shell with it.
launch_exec() {
    if [[ $DRY_RUN == 1 ]]; then
        launch_print "$@"
        exit 0
    fi
    exec "$@"
}

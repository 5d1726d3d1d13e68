"""``asymoe-train``: the Hydra training application (``--cfg job``, ``-m`` multirun and overrides all work), plus
subcommands:

    asymoe-train plan [world_size=N] [gpu_memory_gib=G] [overrides]
                                                     parameters, per-GPU memory with activations (fits G GiB?) and
                                                     schedule; allocates nothing
    asymoe-train export <run_dir> [--stage NAME] [--out DIR]
    asymoe-train generate <export_dir> --image PATH --question "..." [--max-new-tokens N]

A user's mistake or a fault outside the code (a config key, the data budget, divergence, a full disk, a corrupt or
missing checkpoint or path) ends the command with one line naming the key or path and the fix, and exit status 1;
``--debug`` (anywhere on the command line) or ``HYDRA_FULL_ERROR=1`` shows the traceback instead. An interrupt
(the second SIGINT; the first one checkpoints, see asymoe_train.training.signals) exits with status 130.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import hydra
from omegaconf import DictConfig

from asymoe_train.config import register_configs
from asymoe_train.config.errors import ConfigError, RunError
from asymoe_train.config.paths import CONF_DIR

COMMANDS = ("plan", "export", "generate")
DEBUG_FLAG = "--debug"
# Errors that are the user's to fix (ValueError is what config checks raise: STYLE.md), reported without traceback
USER_ERRORS = (ValueError, RunError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT
_EMPTY_DIR = re.compile(r"^\+*hydra\.(run|sweep)\.dir=(''|\"\")?$")


def debugging() -> bool:
    """Whether errors show their traceback: ``--debug`` or ``HYDRA_FULL_ERROR=1``."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(prefix: str, exn: BaseException) -> None:
    """End the process with one line (status 1), or re-raise when debugging."""
    if debugging():
        raise exn
    message = str(exn) or type(exn).__name__
    if isinstance(exn, OSError) and exn.filename and str(exn.filename) not in message:
        message += f" ({exn.filename})"
    sys.exit(f"{prefix}: {message}")


def interrupted(exn: KeyboardInterrupt) -> None:
    if debugging():
        raise exn
    print("asymoe-train: interrupted (second SIGINT): stopped at once; the checkpoints written so far are kept",
          file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


def check_output_dir() -> None:
    """Refuse an empty ``hydra.run.dir`` / ``hydra.sweep.dir``: Hydra would write the run into the working directory."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    key, value = (("hydra.run.dir", hydra_cfg.run.dir) if hydra_cfg.mode == RunMode.RUN
                  else ("hydra.sweep.dir", hydra_cfg.sweep.dir))
    if not str(value or "").strip():
        raise ConfigError(f"{key}={value!r} is empty, which would write the run into the working directory; set "
                          f"{key}=<directory> (or leave it out for outputs/<experiment>/<time>-<variant>)")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> float | None:
    """Train. With ``optimized_metric`` set (``++optimized_metric=instruct.cp_test.accuracy``, as the Optuna sweep in
    conf/hparams_search/ does), rank 0 returns that result as a float for the sweeper; otherwise returns None."""
    from asymoe_train.distributed.engine import world
    from asymoe_train.train import train

    metric = cfg.get("optimized_metric")
    try:
        check_output_dir()
        if metric:
            check_metric(cfg, metric)
        results = train(cfg)
    except ConfigError as exn:
        fail("config error", exn)
    except USER_ERRORS as exn:
        fail("asymoe-train", exn)
    except KeyboardInterrupt as exn:
        interrupted(exn)
    return metric_value(results, metric) if metric and world()[0] == 0 else None


def check_metric(cfg: DictConfig, metric: str) -> None:
    """Fail before training when ``optimized_metric`` names no evaluation result of this run."""
    stage, split, *rest = metric.split(".") + ["", ""]
    stages = [name for name, conf in cfg.curriculum.stages.items() if conf.get("eval", True)]
    if stage not in stages or split not in cfg.data.eval_sources or rest[0] not in ("accuracy", "breakdown"):
        raise ConfigError(f"optimized_metric={metric} is not <stage>.<split>.accuracy (or "
                          f"<stage>.<split>.breakdown.<key>.accuracy) with an evaluated stage of {stages} and a split "
                          f"of data.eval_sources {list(cfg.data.eval_sources)}")


def metric_value(results: dict, metric: str) -> float:
    """The number at the dotted path ``metric`` in train()'s results, e.g. ``instruct.cp_test.accuracy``."""
    value = results
    for key in metric.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"optimized_metric={metric}: no {key!r} in the results")
        value = value[key]
    return float(value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymoe-train", description="Plan a run, export a trained run, or ask it "
                                     "a question. Without a subcommand, asymoe-train trains (Hydra overrides; see "
                                     "--help).")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="total and activated parameters, per-GPU memory of weights, gradients, "
                               "optimizer states and activations, tokens and steps per stage; builds the model on "
                               "the meta device")
    plan.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                      help="world_size=N (GPUs, default 1), gpu_memory_gib=G (a fits / does-not-fit verdict) and "
                      "Hydra overrides, e.g. experiment=asymoe_llama3_8b")
    export = commands.add_parser("export", help="consolidated weights + config of a run's stage, loadable in plain "
                                 "PyTorch (asymoe_train.load_pretrained)")
    export.add_argument("run_dir", help="a run directory, outputs/<experiment>/<run_id>")
    export.add_argument("--stage", help="curriculum stage to export (default: the last one that finished)")
    export.add_argument("--out", help="output directory (default: <run_dir>/export)")
    export.add_argument("--tokenizer", help="the run's tokenizer (tokenizer.json or Hugging Face tokenizer directory), when data.root cannot be found from here")
    generate = commands.add_parser("generate", help="answer a question about an image with an exported model "
                                   "(greedy decoding, the training template and image preprocessing)")
    generate.add_argument("export_dir", help="a directory written by `asymoe-train export`")
    generate.add_argument("--image", required=True, help="image file (png, jpg, ...)")
    generate.add_argument("--question", required=True, help="the question, e.g. 'what shape is in the image?'")
    generate.add_argument("--max-new-tokens", type=_positive_int, help="default: the run's eval.max_new_tokens")
    generate.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    return parser


def run_command(argv: list[str]) -> None:
    """``export`` or ``generate``; user errors exit with one line naming the file and what to run."""
    args = command_parser().parse_args(argv)
    try:
        if args.command == "plan":
            from asymoe_train.plan import plan_command

            print(plan_command(args.overrides))
        elif args.command == "export":
            from asymoe_train.export import export

            out = export(args.run_dir, args.stage, args.out, args.tokenizer)
            print(f"export_dir: {out}")
        else:
            from asymoe_train.evaluation.generate import generate
            from asymoe_train.export import load_pretrained

            model, tokenizer, meta = load_pretrained(args.export_dir, args.device)
            print(generate(model, tokenizer, meta, args.image, args.question, args.max_new_tokens))
    except USER_ERRORS as exn:
        fail(f"asymoe-train {args.command}", exn)


def main() -> None:
    if DEBUG_FLAG in sys.argv[1:]:
        sys.argv.remove(DEBUG_FLAG)
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors show theirs too
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        run_command(sys.argv[1:])
        return
    for arg in sys.argv[1:]:
        if _EMPTY_DIR.match(arg):  # before Hydra creates it: an empty run directory is the working directory
            key = arg.split("=", 1)[0].lstrip("+")
            sys.exit(f"config error: {key} is empty, which would write the run into the working directory; set "
                     f"{key}=<directory> (or leave it out for outputs/<experiment>/<time>-<variant>)")
    if not os.path.isdir(CONF_DIR):
        sys.exit(f"asymoe-train: config directory {CONF_DIR} not found; install the package from its repository "
                 "with `pip install -e .`")
    register_configs()
    _app()


if __name__ == "__main__":
    main()

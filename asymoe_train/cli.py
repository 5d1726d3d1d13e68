"""``asymoe-train``: the Hydra training application (``--cfg job``, ``-m`` multirun and overrides all work), plus
two subcommands that need no Hydra config:

    asymoe-train export <run_dir> [--stage NAME] [--out DIR]
    asymoe-train generate <export_dir> --image PATH --question "..." [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import os
import sys

import hydra
from omegaconf import DictConfig

from asymoe_train.config import register_configs

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
COMMANDS = ("export", "generate")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _app(cfg: DictConfig) -> None:
    from asymoe_train.config.validate import ConfigError
    from asymoe_train.train import train

    try:
        train(cfg)
    except ConfigError as exn:
        sys.exit(f"config error: {exn}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def command_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asymoe-train", description="Export a trained run, or ask it a question. "
                                     "Without a subcommand, asymoe-train trains (Hydra overrides; see --help).")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="consolidated weights + config of a run's stage, loadable in plain "
                                 "PyTorch (asymoe_train.load_pretrained)")
    export.add_argument("run_dir", help="a run directory, outputs/<experiment>/<run_id>")
    export.add_argument("--stage", help="curriculum stage to export (default: the last one that finished)")
    export.add_argument("--out", help="output directory (default: <run_dir>/export)")
    export.add_argument("--tokenizer", help="the run's tokenizer.json, when data.root cannot be found from here")
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
        if args.command == "export":
            from asymoe_train.export import export

            out = export(args.run_dir, args.stage, args.out, args.tokenizer)
            print(f"export_dir: {out}")
        else:
            from asymoe_train.evaluation.generate import generate
            from asymoe_train.export import load_pretrained

            model, tokenizer, meta = load_pretrained(args.export_dir, args.device)
            print(generate(model, tokenizer, meta, args.image, args.question, args.max_new_tokens))
    except (FileNotFoundError, ValueError) as exn:
        sys.exit(f"asymoe-train {args.command}: {exn}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        run_command(sys.argv[1:])
        return
    if not os.path.isdir(CONF_DIR):
        sys.exit(f"asymoe-train: config directory {CONF_DIR} not found; install the package from its repository "
                 "with `pip install -e .`")
    register_configs()
    _app()


if __name__ == "__main__":
    main()

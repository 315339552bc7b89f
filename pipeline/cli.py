"""``selfsup``: one entry point.

    selfsup run [RECIPE] [key=value ...]     run a recipe's stages in order (default: the starter recipe)
    selfsup <stage> [args] [--option value]  run one stage on its own (shard, validate, tokenize, …)
    selfsup list                             registered modalities, stages and objectives

Stage options are generated from each stage's ``Config``: ``--max-count 500`` sets ``max_count``.
A user mistake prints one line naming the file, key or setting, and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, get_origin

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Parser(argparse.ArgumentParser):
    """argparse that names the closest valid option when a flag is misspelt (and takes no
    abbreviations, which would let a typo silently select another option)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            import difflib

            valid = _options(self, getattr(self, "command", []))
            bad = [w.split("=")[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
            close = difflib.get_close_matches(bad[0], valid, n=1) if bad else []
            if close:
                message += f" (did you mean {close[0]}?)"
        super().error(message)


def _options(parser: argparse.ArgumentParser, command: list[str]) -> list[str]:
    """Option strings of ``parser`` and, if ``command`` names one, of that subcommand."""
    found = [o for a in parser._actions for o in a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command and command[0] in action.choices:
            found += [o for a in action.choices[command[0]]._actions for o in a.option_strings]
    return found


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from pipeline import registry
    from pipeline.config import ConfigError
    from pipeline.data.loader import SampleError
    from pipeline.data.shards import ShardError
    from pipeline.train.health import HealthError

    stages = registry.names("stage")
    parser = _Parser(prog="selfsup", description=__doc__.split("\n\n")[0])
    parser.command = argv[:1]  # which subcommand's options a misspelt flag is compared with
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a recipe (default: the starter recipe)")
    run.add_argument("recipe", nargs="?", help="recipe YAML (default: recipes/starter.yaml)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.tokenize.vocab_size=4000")
    run.add_argument("--runs", default="runs", help="parent of the run directory (default: runs/)")
    run.add_argument("--only", action="append", help="run only this stage (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    sub.add_parser("list", help="registered components")
    for name in stages:
        _stage_parser(sub, name)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            for kind, package in registry.KINDS.items():
                print(f"{package.rsplit('.', 1)[-1]}: {', '.join(registry.names(kind)) or '-'}")
            return 0
        return _stage(args)
    except (ConfigError, ShardError, SampleError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except HealthError as e:  # the run stopped itself: the message names the problem and the checkpoint
        print(f"selfsup: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the process group a launch opened (a gloo group left open can abort the process at
    exit); local, so a process that stops early does not wait for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run(args) -> int:
    from pipeline.runner import DEFAULT_RECIPE, run_recipe

    recipe = args.recipe
    if recipe and "=" in recipe and not Path(recipe).exists():  # `selfsup run seed=1`
        args.overrides.insert(0, recipe)
        recipe = None
    run_dir = run_recipe(recipe or DEFAULT_RECIPE, args.overrides, runs=args.runs, only=args.only, force=args.force)
    print(f"run directory: {run_dir}")
    return 0


def _stage_parser(sub, name: str) -> None:
    from pipeline import registry

    module = registry.module("stage", name)
    doc = (module.__doc__ or "").strip()
    p = sub.add_parser(name, help=doc.split("\n")[0], description=doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    positional = getattr(module, "positional", ())
    for field, info in module.Config.model_fields.items():
        help_text = info.description or ""
        if not info.is_required() and "default" not in help_text:
            default = info.get_default(call_default_factory=True)
            default = default.model_dump(mode="json") if hasattr(default, "model_dump") else default
            help_text += f" (default: {default!r})".replace("%", "%%")
        flag = "--" + field.replace("_", "-")
        if field in positional:
            many = get_origin(info.annotation) is list or "list" in str(info.annotation)
            p.add_argument(field, nargs="+" if many else None, help=help_text)
        elif info.annotation is bool:  # --full / --no-full
            p.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=help_text,
                           action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(flag, dest=field, default=argparse.SUPPRESS, help=help_text, metavar="VALUE")
    p.add_argument("--recipe", dest="_recipe", metavar="YAML", help="take sources and modality settings from this recipe")
    if "out" not in module.Config.model_fields:
        p.add_argument("--out", dest="_out", default=None, metavar="DIR", help="output directory (default: runs/<stage>)")
    p.set_defaults(_stage_name=name)


def _stage(args) -> int:
    from pipeline import registry
    from pipeline.config import build, parse_value
    from pipeline.runner import load_recipe, run_stage
    from pipeline.stage import Context

    module = registry.module("stage", args._stage_name)
    raw: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith("_") or k == "command":
            continue
        if isinstance(v, list):
            raw[k] = [parse_value(x) if not isinstance(x, str) or not Path(x).exists() else x for x in v]
        elif isinstance(v, bool) or k in getattr(module, "positional", ()):
            raw[k] = v
        else:
            raw[k] = parse_value(v)
    cfg = build(module.Config, raw, f"selfsup {args._stage_name}")
    out = getattr(args, "_out", None) or raw.get("out")
    ctx = Context(out_dir=Path(out or Path("runs") / args._stage_name))
    if args._recipe:
        recipe, modalities = load_recipe(args._recipe)
        ctx.sources, ctx.modalities, ctx.seed = recipe.sources, modalities, recipe.seed
        ctx.base_dir = Path(args._recipe).resolve().parent
        ctx.run_dir = (Path("runs") / recipe.name).resolve()  # where `selfsup run` puts its stages: {run}
    summary = run_stage(module, cfg, ctx, digest="cli", force=True, clear=False)
    status = summary.get("status", "ok") if isinstance(summary, dict) else "ok"
    return 1 if status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())

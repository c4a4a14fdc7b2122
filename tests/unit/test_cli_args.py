"""The command line as documented: overrides anywhere, every documented command line parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedtune.cli import parse_args, resume_hint
from fedtune.config import split_recipe_args

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BREAKS = {"&", "&&", "|", "||", ";", ">", ">>", "2>&1", "<"}


def documented_commands() -> list[tuple[str, int, list[str]]]:
    """(file, line, argv after `fedtune`) of every fedtune command in a fenced code block.

    A line may start with `$ `, environment assignments (`HF_HUB_OFFLINE=1 fedtune ...`) or
    `python -m fedtune`; `\\` continues it on the next line; `#` starts a comment; a shell
    operator (`&`, `|`, `>`, ...) ends the command.
    """
    found = []
    for path in DOCS:
        in_block, pending, start = False, "", 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            if not pending:
                start = number
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            text, pending = pending.strip().removeprefix("$ "), ""
            try:
                words = shlex.split(text, comments=True)
            except ValueError:
                continue  # not shell (e.g. a YAML or Python line with a stray quote)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]  # VAR=value before the command
            if words[:3] == ["python", "-m", "fedtune"]:
                words = ["fedtune", *words[3:]]
            if not words or words[0] != "fedtune":
                continue
            argv = []
            for word in words[1:]:
                if word in SHELL_BREAKS:
                    break
                argv.append(word)
            found.append((path.relative_to(ROOT).as_posix(), start, argv))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    commands = {" ".join(argv) for _, _, argv in COMMANDS}
    assert len(COMMANDS) >= 25
    # the two documented lines that used to end in "unrecognized arguments"
    assert any(c.startswith("server deploy.yaml --address") and "output.name=" in c for c in commands)
    assert any(c.startswith("eval my-recipe.yaml --adapter") and "model.name=" in c for c in commands)


@pytest.mark.parametrize(("where", "line", "argv"), COMMANDS,
                         ids=[f"{w}:{n}" for w, n, _ in COMMANDS])
def test_every_documented_command_line_parses(where, line, argv, capsys):
    try:
        args = parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}, line {line}: `fedtune {shlex.join(argv)}` is refused: "
                    f"{capsys.readouterr().err.strip()}")
    if hasattr(args, "items"):
        split_recipe_args(args.items)  # at most one recipe; the rest are KEY=VALUE


def test_overrides_and_the_recipe_may_follow_options():
    args = parse_args(["server", "deploy.yaml", "--address", "0.0.0.0:50051", "output.name=study-1"])
    assert args.items == ["deploy.yaml", "output.name=study-1"] and args.address == "0.0.0.0:50051"
    args = parse_args(["eval", "--adapter", "a/final", "my.yaml", "model.name=/m", "--limit", "5"])
    assert (args.items, args.adapter, args.limit) == (["my.yaml", "model.name=/m"], "a/final", 5)
    args = parse_args(["client", "--name", "client_1", "d.yaml", "--server", "h:1", "train.lr=1e-3"])
    assert (args.items, args.name, args.server) == (["d.yaml", "train.lr=1e-3"], "client_1", "h:1")
    args = parse_args(["bench", "default", "federation.rounds=2"])
    assert args.items == ["default", "federation.rounds=2"]


def test_overrides_keep_their_order_around_options():
    # the last override of a key wins, so the order on the command line must survive
    args = parse_args(["run", "train.lr=1", "--resume", "r", "train.lr=2", "train.lr=3"])
    assert args.items == ["train.lr=1", "train.lr=2", "train.lr=3"] and args.resume == "r"


def test_verbose_before_or_after_the_command():
    assert parse_args(["-v", "run", "default"]).verbose is True
    assert parse_args(["run", "default", "-v", "train.lr=1"]).verbose is True
    assert parse_args(["run", "default"]).verbose is False


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "default", "--bogus"], "fedtune run: error: unrecognized arguments: --bogus"),
    (["server", "d.yaml", "--address", "h:1", "--nope", "x=1"], "unrecognized arguments: --nope"),
    (["recipes", "federation.rounds=2"], "fedtune recipes: error: unrecognized arguments"),
    (["certs", "out", "extra"], "fedtune certs: error: unrecognized arguments: extra"),
    (["eval", "default", "model.name=x"], "the following arguments are required: --adapter"),
])
def test_option_errors_stay_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_interrupt_messages_name_the_real_directory(tmp_path):
    run_dir = tmp_path / "runs" / "my run"
    exc = KeyboardInterrupt()
    exc.run_dir = run_dir
    args = parse_args(["run", "default"])
    assert args.interrupted(args, exc) == (
        f"interrupted; continue with `fedtune run --resume '{run_dir}'` (from its last checkpoint)")
    args = parse_args(["server", "deploy.yaml", "--address", "0.0.0.0:1"])
    assert f"`fedtune server --resume '{run_dir}'`" in args.interrupted(args, exc)
    args = parse_args(["run", "--resume", "runs/x"])  # stopped again while resuming
    assert "`fedtune run --resume runs/x`" in args.interrupted(args, KeyboardInterrupt())
    assert resume_hint("run", None) == "interrupted before the run directory was made; nothing to resume"
    args = parse_args(["client", "d.yaml", "--name", "client_2"])
    assert args.interrupted(args, exc) == "interrupted; start the client again to rejoin as client_2"

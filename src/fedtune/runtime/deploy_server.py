"""`fedtune server`: the federation's server process over gRPC, writing the same run directory as a
simulation. It checkpoints every round; `--resume RUN_DIR` continues a stopped server."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.algorithms import build_strategy
from fedtune.config import Recipe, load_recipe, parse_override
from fedtune.data.federated import client_names
from fedtune.errors import DeploymentError, RunDirError
from fedtune.runtime.finish import finish_run
from fedtune.runtime.server import Server
from fedtune.runtime.setup import Setup
from fedtune.runtime.simulation import resume_server
from fedtune.track.report import human_bytes
from fedtune.track.reporter import ConsoleReporter, NullReporter, plain_console
from fedtune.track.rundir import RunDir
from fedtune.transport.auth import (
    Authenticator,
    check_token_file_covers,
    load_tokens,
    server_credentials,
)
from fedtune.transport.grpc_server import GrpcServerTransport

log = logging.getLogger("fedtune.deploy")
RESUME = "fedtune server --resume"  # how a stopped server continues (no recipe: it is in the run)


def require_grpc(recipe: Recipe, command: str) -> None:
    if recipe.transport.kind != "grpc":
        raise DeploymentError(
            f"`fedtune {command}` needs transport.kind: grpc in the recipe (it is "
            f"'{recipe.transport.kind}'); set it with its TLS and token keys, see docs/deployment.md"
        )


def _load(recipe: Any, overrides: list[str], resume: str | Path | None) -> tuple[Recipe, RunDir | None]:
    if resume is None:
        loaded = load_recipe(recipe, overrides)
        if loaded.output.name is not None:  # refuse an existing named directory before set-up
            RunDir.check_free(Path(loaded.output.dir) / loaded.output.name, resume_with=RESUME)
        return loaded, None
    if recipe is not None:
        raise RunDirError("--resume continues a run with its saved recipe; give no recipe")
    for text in overrides:
        if parse_override(text)[0][0] != "transport":
            raise RunDirError(f"override {text!r}: with --resume only transport.* keys may change "
                              "(they do not change results)")
    run_dir = RunDir.open(resume)
    if (run_dir.path / "summary.json").exists():
        raise RunDirError(f"{run_dir.path} has finished already (summary.json exists)")
    return load_recipe(run_dir.recipe_path, overrides), run_dir


def _authenticator(recipe: Recipe, names: list[str]) -> Authenticator:
    section = recipe.transport
    tokens = None
    if section.tokens is not None:
        tokens = load_tokens(section.tokens)
        check_token_file_covers(tokens, names, section.tokens)
    elif not section.mutual_tls:
        raise DeploymentError("the server needs transport.tokens (a file of client name -> token) "
                              "or mutual_tls: true; make trial ones with `fedtune certs`")
    return Authenticator(clients=names, tokens=tokens, mutual_tls=section.mutual_tls)


def serve(recipe: Any = None, overrides: list[str] | None = None, *, resume: str | Path | None = None,
          console: Console | None = None) -> dict[str, Any]:
    """Run the server of a deployed federation; returns the summary (also in summary.json)."""
    loaded, run_dir = _load(recipe, list(overrides or []), resume)
    require_grpc(loaded, "server")
    section = loaded.transport
    out = plain_console()
    names = client_names(loaded.federation.clients)
    auth = _authenticator(loaded, names)  # files are checked before minutes of set-up
    credentials = None if section.insecure else server_credentials(section.tls, section.mutual_tls)

    setup = Setup(loaded, console)
    if run_dir is not None:  # resumed: clients may still hold what they downloaded at first
        setup.keep(run_dir, resume=True)
    reporter = ConsoleReporter(setup.console) if loaded.output.progress else NullReporter()
    downloads = setup.party.downloads()  # what clients fetch before they join (if anything)
    transport = GrpcServerTransport(section, names, auth, credentials=credentials,
                                    on_reply=reporter.client_done, downloads=downloads)
    try:
        address = transport.start()
        mode = "insecure" if section.insecure else ("mutual TLS" if section.mutual_tls else "TLS")
        out.print(f"fedtune server: listening on {address} ({mode}); waiting for {len(names)} "
                  f"clients (up to {section.join_timeout:.0f} s)")
        joined = transport.wait_for_clients(section.join_timeout)
        if len(joined) < min(section.min_replies, len(names)) or not joined:
            raise DeploymentError(
                f"only {len(joined)} of {len(names)} clients joined within transport.join_timeout "
                f"({section.join_timeout:.0f} s): missing {', '.join(sorted(set(names) - set(joined)))}"
            )
        if len(joined) < len(names):
            out.print(f"starting with {len(joined)} of {len(names)} clients; the others may join later")
        if run_dir is None:  # made only now, so a federation that never gathered leaves nothing
            name = loaded.output.name or f"{loaded.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir = RunDir.create(loaded.output.dir, name, explicit=loaded.output.name is not None,
                                    resume_with=RESUME)
            run_dir.write_recipe(loaded.to_yaml())
            setup.keep(run_dir, resume=False)
        setup.evaluation.write_split(run_dir)
        out.print(f"fedtune server: {len(joined)} clients joined; run directory {run_dir.path}")
        # Deployment checkpoints every round, so a restarted server loses at most one round.
        server_recipe = loaded.model_copy(deep=True)
        server_recipe.output.checkpoint_every = 1
        fed = loaded.federation
        server = Server(
            server_recipe, strategy=build_strategy(fed.algorithm, fed.options, fed.clients),
            transport=transport, clients=names, global_state=setup.view.initial(), run_dir=run_dir,
            evaluate_global=setup.evaluation.evaluate_global, reporter=reporter, party=setup.party,
            reply_timeout=section.round_timeout,
        )
        start = resume_server(server, run_dir, out) if resume is not None else 1
        try:
            result = server.run(start)
        finally:
            reporter.close()
        summary = finish_run(setup, run_dir, server, result)
        summary["transport"] = {"kind": "grpc", "address": address, "mode": mode, **transport.stats()}
        run_dir.write_json("summary.json", summary)
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: the CLI names the directory to resume
        if run_dir is not None:
            exc.run_dir = run_dir.path  # type: ignore[attr-defined]
        raise
    finally:
        transport.close()
    out.print(_closing_line(summary))
    return summary


def _closing_line(summary: dict[str, Any]) -> str:
    final = summary.get("final") or {}
    loss = f"final loss {final['loss']:.4f}, " if isinstance(final.get("loss"), float) else ""
    t = summary["transport"]
    return (f"fedtune server: done, {summary['rounds']} rounds; {loss}sent "
            f"{human_bytes(summary['bytes_down'])} down, {human_bytes(summary['bytes_up'])} up; "
            f"{t['late_replies']} late replies, {t['rejected_messages']} rejected uploads, "
            f"{t['refused_calls']} refused calls; {summary['wall_seconds']:.0f} s; "
            f"final adapter in {summary['final_adapter']}")

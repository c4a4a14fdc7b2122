"""Simulation: one server and N virtual clients in one process, sharing ONE copy of the base model.

Each client's turn swaps its tensors into the shared model (AdapterSlot); messages between server
and clients are really encoded, so byte counts and checks are those of a deployment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.algorithms import build_strategy
from fedtune.config import Recipe, load_recipe
from fedtune.data.federated import FederatedData
from fedtune.errors import RecipeError, RunDirError
from fedtune.runtime.client import Client
from fedtune.runtime.finish import finish_run
from fedtune.runtime.hosting import client_host
from fedtune.runtime.launch import check_launch
from fedtune.runtime.relay import Relay, evaluation_endpoints, party_relay, relayed_evaluation
from fedtune.runtime.server import Server
from fedtune.runtime.setup import Setup
from fedtune.track.reporter import ConsoleReporter, NullReporter
from fedtune.track.rundir import RunDir, naming_on_interrupt
from fedtune.transport.inprocess import InProcessTransport


class Simulation:
    """One server and every client of the recipe in this process, over the in-process transport."""

    def __init__(self, recipe: Recipe, console: Console | None = None, data: FederatedData | None = None):
        if data is not None and recipe.federation.engine != "inprocess":
            raise RecipeError(f"federation.engine {recipe.federation.engine}: the clients build "
                              "their data from the recipe; a FederatedData object is in-process only")
        self.setup = Setup(recipe, console, data=data)
        self.recipe = recipe
        self.host = client_host(recipe.federation.engine, self.setup)

    @property
    def clients(self) -> dict[str, Client]:
        """The in-process clients (InProcessHost), for tests that reach into one."""
        return self.host.clients

    @property
    def model(self):
        return self.setup.model

    @property
    def slot(self):
        return self.setup.slot

    def run(self, run_dir: RunDir, resume: bool = False, relay: Relay | None = None,
            on_eval: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Run the federation into `run_dir`. `relay`: this is rank 0 of a multi-process launch,
        and every delivery goes to the other ranks first (they train with this one). `on_eval`:
        see run()."""
        recipe, setup = self.recipe, self.setup
        setup.keep(run_dir, resume)
        setup.evaluation.write_split(run_dir)
        self.host.write_predictions_to(Path(run_dir.path) / "predictions")  # beside the server's
        reporter = ConsoleReporter(setup.console) if recipe.output.progress else NullReporter()
        endpoints = self.host.endpoints()
        transport = InProcessTransport(
            endpoints if relay is None else relay.relaying(endpoints),
            max_message_bytes=recipe.transport.max_message_bytes,
            on_delivery=reporter.client_done,
            deliver=self.host.deliver if relay is None else None,  # relayed: one at a time
        )
        server = Server(
            recipe, strategy=build_strategy(recipe.federation.algorithm, recipe.federation.options,
                                           recipe.federation.clients),
            transport=transport, clients=self.host.names(), global_state=setup.view.initial(),
            run_dir=run_dir, evaluate_global=self._evaluate_global(relay), reporter=reporter, party=setup.party,
            client_state=self.host, example_counts=self.host.example_counts(), on_eval=on_eval,
        )
        start_round = resume_server(server, run_dir, setup.console) if resume else 1
        if start_round == 1:  # a resumed run has them in its checkpoint's traffic
            setup.charge_downloads(transport.traffic)
        try:
            result = server.run(start_round)
        finally:
            reporter.close()
            if relay is not None:
                relay.stop()  # the rest (final evaluation, files) is rank 0's alone
            close = getattr(self.host, "close", None)
            if close is not None:  # a host with workers of its own (Ray actors)
                close()
        return finish_run(setup, run_dir, server, result)

    def _evaluate_global(self, relay: Relay | None):
        """The server's evaluation; under FSDP relayed, so that every rank runs its forward passes."""
        evaluate = self.setup.evaluation.evaluate_global
        return evaluate if relay is None or not self.setup.sharded else relayed_evaluation(relay, evaluate)

    def follow(self, relay: Relay, resume_dir: Path | None = None) -> dict[str, Any]:
        """A rank other than 0: train every client's turn with rank 0 (DDP) until it stops. It
        keeps the clients' state in step and writes nothing. Resuming, it reads the checkpoint's
        client states before the first message (rank 0 writes no checkpoint before then)."""
        if resume_dir is not None:
            ckpt = RunDir.open(resume_dir).latest_checkpoint()
            if ckpt is not None:
                self.host.load_state_dict(ckpt.client_state)
        endpoints = dict(self.host.endpoints())
        if self.setup.sharded:  # FSDP: the server's evaluation runs on every rank
            endpoints.update(evaluation_endpoints(self.setup.evaluation.evaluate_global))
        handled = relay.serve(endpoints)
        return {"rank": relay.ranks.rank, "messages": handled}


def resume_server(server: Server, run_dir: RunDir, console: Console) -> int:
    """Restore the server from the run's last checkpoint; returns the round to start with."""
    ckpt = run_dir.latest_checkpoint()
    if ckpt is None:
        run_dir.truncate_events_after(-1)
        start = 1
    else:
        start = server.restore(ckpt)
        run_dir.truncate_events_after(ckpt.round)
    console.print(f"resuming {run_dir.path} at round {start}")
    return start


def _run_name(recipe: Recipe) -> str:
    return recipe.output.name or f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(recipe: Recipe | str | Path | dict | None = None, overrides: list[str] | None = None,
        *, resume: str | Path | None = None, console: Console | None = None,
        on_eval: Callable[[int, dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Run a federated fine-tuning simulation and return its summary (also in summary.json).

    `recipe` is a Recipe, a built-in recipe name, a YAML path or a dict; `overrides` are
    `key.path=value` strings. With `resume`, the run in that directory continues from its last
    checkpoint, with the recipe saved there. `on_eval(round, metrics)` is called after each
    evaluation during training; True stops the run there (summary.json says where).
    """
    if resume is not None:
        if recipe is not None or overrides:
            raise RunDirError("--resume continues a run with its saved recipe; give no recipe or overrides")
        run_dir = RunDir.open(resume)
        if (run_dir.path / "summary.json").exists():
            raise RunDirError(f"{run_dir.path} has finished already (summary.json exists)")
        loaded = load_recipe(run_dir.recipe_path)

        def resumed(relay: Relay | None) -> dict[str, Any]:
            with naming_on_interrupt(run_dir):
                return Simulation(loaded, console).run(run_dir, resume=True, relay=relay, on_eval=on_eval)

        return _on_every_rank(loaded, resumed, resume_dir=run_dir.path)
    loaded = load_recipe(recipe, overrides)

    def fresh(relay: Relay | None) -> dict[str, Any]:
        explicit = loaded.output.name is not None
        if explicit:  # refuse an existing named directory before minutes of set-up
            RunDir.check_free(Path(loaded.output.dir) / loaded.output.name)
        simulation = Simulation(loaded, console)
        run_dir = RunDir.create(loaded.output.dir, _run_name(loaded), explicit=explicit)
        run_dir.write_recipe(loaded.to_yaml())
        with naming_on_interrupt(run_dir):
            return simulation.run(run_dir, relay=relay, on_eval=on_eval)

    return _on_every_rank(loaded, fresh)


def _on_every_rank(recipe: Recipe, lead: Callable[[Relay | None], dict[str, Any]],
                   resume_dir: Path | None = None) -> dict[str, Any]:
    """`lead` in one process; under torchrun / accelerate launch, `lead` on rank 0 (it alone
    names and writes the run) and the clients' training with it on the other ranks, which leave
    when rank 0 is done or fails."""
    check_launch(recipe)
    relay = party_relay()
    if relay is None:
        return lead(None)
    if not relay.ranks.main:
        return Simulation(recipe, Console(quiet=True)).follow(relay, resume_dir)
    try:
        return lead(relay)
    finally:
        relay.stop()

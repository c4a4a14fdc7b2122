"""What every process of a federation builds from a recipe: data, ONE base model with its adapter
(or the model the algorithm's party hooks give it), the local trainer and the evaluator.
Simulation, deployed server and deployed client share it, so they compute the same things from
the same recipe and seed. Its jobs beyond building are their own modules: the clients
(runtime/client_factory.py), the server's global evaluation (runtime/server_eval.py) and the
end of a run (runtime/finish.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.algorithms import build_party, build_view
from fedtune.algorithms.party import Party
from fedtune.config import Recipe
from fedtune.data.examples import Example
from fedtune.data.federated import FederatedData, build_federated_data, format_split_table
from fedtune.data.prompts import TokenizedExample, tokenize_examples
from fedtune.eval.evaluator import Evaluator
from fedtune.models.adapters import AdapterSlot, attach_adapter
from fedtune.models.loading import load_base_model
from fedtune.models.rank_plan import wrap_slot
from fedtune.runtime.client_factory import ClientFactory
from fedtune.runtime.server_eval import ServerEvaluation
from fedtune.seeding import derive_seed, seed_everything
from fedtune.track.reporter import quiet_libraries
from fedtune.track.rundir import RunDir
from fedtune.track.traffic import TrafficCounter
from fedtune.train.distributed import data_parallel
from fedtune.train.local import LocalTrainer
from fedtune.train.sharded import shard_for_launch
from fedtune.transport.framing import SharedEncoder

log = logging.getLogger("fedtune.setup")


class Setup:
    """One party of a federation, built: its data, model, adapter slot, view, trainer, evaluator
    and the algorithm's party hooks; `clients` builds clients on it, `evaluation` evaluates the
    global model on the server's side."""

    def __init__(self, recipe: Recipe, console: Console | None = None,
                 data: FederatedData | None = None, base: tuple[Any, Any] | None = None,
                 party: Party | None = None, rank: int | None = None):
        """`base`: a (model, tokenizer) to use instead of loading `recipe.model` (a deployed
        client's model built from what the server shipped: Party.client_model). `party`: the
        algorithm's hooks for this process (algorithms/party.py), built from the recipe if None.
        `rank`: a deployed client's own LoRA rank (adapter.rank_per_client): its model's LoRA is
        built at that rank, not at adapter.r (what the simulation's one shared model needs)."""
        self.recipe = recipe
        self.console = console or Console(quiet=not recipe.output.progress)
        quiet_libraries()
        seed_everything(recipe.seed)

        self.data = data or build_federated_data(recipe.data, recipe.federation.clients, recipe.seed)
        self.console.print(format_split_table(self.data))

        fed = recipe.federation
        self.party = party or build_party(fed.algorithm, fed.options, recipe)
        model, self.tokenizer = base or load_base_model(recipe.model)
        if base is None:  # the model owner: the model the federation trains (Party.server_model)
            model = self.party.server_model(model, self.tokenizer, self.console)
        # The initial adapter depends only on the recipe seed: every party builds the same one.
        torch.manual_seed(derive_seed(recipe.seed, "adapter-init"))
        section = recipe.adapter if rank is None else recipe.adapter.model_copy(update={"r": rank})
        self.model = attach_adapter(model, section) if self.party.attaches_adapter else model
        self.model.eval()
        self.sharded = shard_for_launch(self.model, recipe.train)  # FSDP / ZeRO-3: every rank
        self.slot = AdapterSlot(self.model)
        self.own_rank = rank
        if recipe.adapter.rank_per_client is not None:  # this party's rank, in the wire frame
            self.slot = wrap_slot(self.slot, recipe.adapter, rank or recipe.adapter.r)
        self.view = build_view(fed.algorithm, fed.options, self.slot)  # before any training
        self.device = next(self.model.parameters()).device
        self.tokenize_report: dict[str, Any] = {}
        self.evaluator = Evaluator(
            self.model, self.tokenizer, recipe.eval, template=recipe.data.template,
            max_length=recipe.data.max_length, device=self.device,
        )
        self.trainer = LocalTrainer(self.model, recipe.train, self.tokenizer.pad_token_id, self.device,
                                    parallel=data_parallel(recipe.train.sharding, self.model))
        if "rouge_l" in recipe.eval.metrics:  # a missing package fails now, not after training
            from fedtune.eval.errors import require_module

            require_module("rouge_score.rouge_scorer", "rouge-score", "the rouge_l metric")
        self.clients = ClientFactory(self)
        self.evaluation = ServerEvaluation(self)

    def tokenize(self, label: str, examples: list[Example]) -> list[TokenizedExample]:
        d = self.recipe.data
        tokenized, report = tokenize_examples(
            examples, self.tokenizer, template=d.template, max_length=d.max_length,
            truncation=d.truncation,
        )
        self.tokenize_report[label] = report.as_dict()
        if report.truncated or report.dropped:
            log.warning("%s: %d of %d examples truncated, %d dropped (data.max_length=%d)",
                        label, report.truncated, report.total, report.dropped, d.max_length)
        return tokenized

    def keep(self, run_dir: RunDir, resume: bool) -> None:
        """What the algorithm keeps with the run for a resumed run to reuse (Party.keep)."""
        self.party.keep(Path(run_dir.path), resume)

    def charge_downloads(self, traffic: TrafficCounter) -> None:
        """Simulation: charge every client one download of what the algorithm ships before a
        client joins (round 0), as a deployed server's transport counts the real ones."""
        encoder = SharedEncoder()  # the same tensors for every client: encoded once
        for make in self.party.downloads().values():
            for client in self.data.clients:
                head, part = encoder.encode(make(client))
                traffic.record(direction="down", client=client, round=0, nbytes=len(head) + len(part))
            encoder.clear()

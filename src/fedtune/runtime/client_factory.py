"""The clients of a recipe's split, built on a Setup's shared model: their tokenized data, the
algorithm's local procedure, and the hostile behaviour `federation.attack` gives some of them."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from fedtune.algorithms import build_local, build_view
from fedtune.algorithms.attacks import AttackedLocal, backdoor_metrics, poison_examples
from fedtune.algorithms.personal import HoldoutLocal
from fedtune.models.rank_plan import client_ranks, wrap_slot
from fedtune.runtime.client import Client, ClientDataset
from fedtune.seeding import derive_seed
from fedtune.transport.codec import specs_of
from fedtune.transport.compression import codec_of
from fedtune.wire import TensorSpec

if TYPE_CHECKING:  # setup.py builds these two with itself
    from fedtune.runtime.setup import Setup


class ClientFactory:
    def __init__(self, setup: Setup):
        self.setup = setup
        self._specs: dict[str, TensorSpec] | None = None  # the global state's, read once

    def specs(self) -> dict[str, TensorSpec]:
        """The global state's tensor specs (every client's: the view's initial state, read once)."""
        if self._specs is None:
            self._specs = specs_of(self.setup.view.initial())
        return self._specs

    def client(self, name: str) -> Client:
        """The client `name` of the recipe's split, on the shared model."""
        setup = self.setup
        recipe = setup.recipe
        part = setup.data.clients[name]
        fed = recipe.federation
        attack = fed.attack if name in fed.attack.clients else None
        train = part.train
        if attack is not None and attack.kind == "backdoor":
            train = poison_examples(train, trigger=attack.trigger, target=attack.target,
                                    fraction=attack.poison_fraction,
                                    seed=derive_seed(recipe.seed, "poison", name))
        dataset = ClientDataset(
            train=setup.tokenize(f"{name} train", train),
            test=setup.tokenize(f"{name} test", part.test),
            test_raw=part.test,
            val=setup.tokenize(f"{name} val", part.val),
        )
        local = build_local(fed.algorithm, fed.options)
        if attack is not None and attack.kind in ("scale", "sign_flip", "nan", "inf"):
            local = AttackedLocal(local, attack.kind, attack.factor)
        elif attack is not None and attack.kind == "backdoor" and attack.boost != 1.0:
            local = AttackedLocal(local, "scale", attack.boost)  # model replacement
        if name in fed.holdout_names():  # never trains; adapts the global model to evaluate
            local = HoldoutLocal(local, fed.holdout_steps)
        slot, view = setup.slot, setup.view
        if recipe.adapter.rank_per_client is not None and setup.own_rank is None:  # its rank of the one model
            rank = client_ranks(recipe.adapter.rank_per_client, fed.clients, recipe.seed)[name]
            slot = wrap_slot(setup.slot.slot, recipe.adapter, rank)
            view = build_view(fed.algorithm, fed.options, slot)
        client = Client(name, dataset, slot=slot, trainer=setup.trainer,
                        evaluator=setup.evaluator, seed=recipe.seed, local=local, view=view,
                        compression=(codec_of(fed.compression.up), codec_of(fed.compression.down)),
                        max_message_bytes=recipe.transport.max_message_bytes,
                        specs=self.specs() if view is setup.view else None)  # a rank's own shapes
        if fed.attack.kind == "backdoor" and fed.attack.clients:  # every client measures it
            client.backdoor_probe = partial(backdoor_metrics, trigger=fed.attack.trigger,
                                            target=fed.attack.target)
        return client

"""FedSP ("Tunable soft prompts are messengers in FL", Dong et al., EMNLP'23 Findings): the model
owner never ships its LLM; clients tune a small auxiliary model built from it, and only prefix
soft prompts carry knowledge between the two.

- Server (`FedSPServer`, through the party hooks): builds the auxiliary model from the full one
  (fedsp_aux.py: cross-layer sharing), distils it on data it holds (hidden-state matching), and
  ships it once as a checked package. Between rounds (`after_round`) it loads the averaged prompts
  into the frozen full model and tunes them on its own shard, and broadcasts the result.
- Client (`FedSPLocal`): alternates a stage tuning its own auxiliary body (prompts frozen) and a
  stage tuning the prompts (body frozen). Its body never leaves it (kept in its persistent state),
  so the auxiliary models cannot drift through averaging; only the prompts (every tensor of the
  prompt encoder, its MLP included) travel, both ways.
- Evaluation: the full model with the prompts (the run's metrics), the auxiliary model with the
  same prompts as `aux_<metric>`; each client evaluates the distilled auxiliary model with the
  global prompts on its own test part, reported under its own name.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.algorithms import algorithm_options
from fedtune.algorithms.base import (
    LocalContext,
    LocalOutcome,
    State,
    local_update,
    plain_local,
    register,
    result_metrics,
)
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.fedsp_aux import (
    aux_from_package,
    aux_package,
    body,
    build_aux,
    distill_hidden,
)
from fedtune.algorithms.party import (
    GlobalEvaluation,
    StandardParty,
    side_model_report,
    side_model_summary,
)
from fedtune.seeding import derive_seed
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.fedsp")
DOWNLOAD = "auxiliary"
BODY = "fedsp/body/"     # a client's own auxiliary body, in its persistent state
_PRISTINE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> distilled body


class FedSPView:
    """The global state is the prompts; loading it also puts back the distilled auxiliary body
    (a client's own body is loaded by its local procedure)."""

    def __init__(self, shared: int, slot: Any):
        self.slot = slot
        self.body = body(slot.model, shared)
        if slot.model not in _PRISTINE:   # as built (and distilled): before any client trains
            _PRISTINE[slot.model] = {n: p.detach().clone() for n, p in self.body.items()}
        self.pristine = _PRISTINE[slot.model]

    def initial(self) -> State:
        return self.slot.get()

    @torch.no_grad()
    def load(self, state: State) -> None:
        self.slot.set(state)
        for name, param in self.body.items():
            param.copy_(self.pristine[name])


@plain_local
class FedSPLocal:
    """The client's round: stage "model" (its body trains, the prompts are frozen), then stage
    "prompt" (the prompts train, the body is frozen), each `train.local_steps` steps."""

    def __init__(self, config: Any):
        self.config = config

    def fit(self, ctx: LocalContext, global_state: State) -> LocalOutcome:
        own = body(ctx.slot.model, self.config.shared_blocks)
        prompts = list(ctx.slot.params.values())
        with torch.no_grad():
            for name, param in own.items():
                if BODY + name in ctx.state:
                    param.copy_(ctx.state[BODY + name])
        try:
            _trainable(own.values(), prompts)
            stage_model = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=derive_seed(ctx.seed, "fedsp-model"))
            _trainable(prompts, own.values())
            stage_prompt = ctx.trainer.train(ctx.train, lr=ctx.lr, seed=ctx.seed)
        finally:
            _trainable(prompts, own.values())   # as built: only the prompts are the adapter
        for name, param in own.items():
            ctx.state[BODY + name] = param.detach().to("cpu", copy=True)
        metrics = {**result_metrics(stage_prompt), "aux_train_loss": stage_model.loss}
        return LocalOutcome(update=local_update(ctx.slot.get(), global_state), metrics=metrics)


def _trainable(on, off) -> None:
    for p in off:
        p.requires_grad_(False)
    for p in on:
        p.requires_grad_(True)


class FedSPServer:
    """The model owner's side: the full model with prompts, the auxiliary model, its package,
    the server's own data and the prompt tuning between rounds."""

    def __init__(self, full: torch.nn.Module, tokenizer: Any, recipe: Any, console: Any = None):
        from fedtune.algorithms.offsite_server import distill_texts
        from fedtune.data.prompts import TokenizedExample, collate
        from fedtune.eval.evaluator import Evaluator
        from fedtune.models.adapters import AdapterSlot, attach_adapter
        from fedtune.train.local import LocalTrainer

        fed = recipe.federation
        self.options = o = algorithm_options(fed.algorithm, fed.options)
        self.recipe, self.tokenizer = recipe, tokenizer
        self.device = next(full.parameters()).device
        full = full.eval()
        for p in full.parameters():
            p.requires_grad_(False)
        self.full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
        self.aux = build_aux(full, o.shared_blocks)
        self.distill_losses: list[float] = []
        if o.distill.steps:
            texts = distill_texts(o.distill.data, o.distill.examples,
                                  derive_seed(recipe.seed, "fedsp-distill"), recipe)
            ids = [tokenizer(t, truncation=True, max_length=recipe.data.max_length)["input_ids"] for t in texts]
            examples = [TokenizedExample(input_ids=x, labels=list(x)) for x in ids if len(x) > 1]
            rng = np.random.default_rng(derive_seed(recipe.seed, "fedsp-distill-batches"))
            pad = tokenizer.pad_token_id

            def batches():
                while True:
                    order = rng.permutation(len(examples))
                    for s in range(0, len(order), o.distill.batch_size):
                        yield collate([examples[i] for i in order[s:s + o.distill.batch_size]], pad)

            self.distill_losses = distill_hidden(full, self.aux, o.shared_blocks, batches(),
                                                 steps=o.distill.steps, lr=o.distill.lr, device=self.device)
            if console is not None:
                console.print(f"fedsp: distilled the auxiliary model for {o.distill.steps} steps, loss "
                              f"{self.distill_losses[0]:.3f} → {self.distill_losses[-1]:.3f}")
        self.package_meta, self.package_tensors = aux_package(self.aux, tokenizer, o.shared_blocks)
        self.aux_bytes = sum(t.numel() * t.element_size() for t in self.package_tensors.values())
        torch.manual_seed(derive_seed(recipe.seed, "fedsp-full-prompts"))   # replaced before any use
        self.full = attach_adapter(full, recipe.adapter)
        self.slot = AdapterSlot(self.full)
        section = recipe.train.model_copy(update={"local_steps": o.server_steps})
        self.trainer = LocalTrainer(self.full, section, tokenizer.pad_token_id, self.device)
        self.data = self._server_data()
        self.server_losses: list[float] = []
        self.evaluator = Evaluator(self.full, tokenizer, recipe.eval, template=recipe.data.template,
                                   max_length=recipe.data.max_length, device=self.device)

    def _server_data(self) -> list:
        """The server's own training shard (tokenized): the built-in benchmark's tasks drawn with
        the server's seed, or a data file (`server_data`)."""
        from fedtune.data.prompts import tokenize_examples

        o, recipe = self.options, self.recipe
        if o.server_data == "synthetic":
            from fedtune.data.synthetic import generate_examples

            section = recipe.data.synthetic.model_copy(update={"examples_per_category": o.server_examples})
            examples = generate_examples(section, derive_seed(recipe.seed, "fedsp-server-data"))
        else:
            from fedtune.data.records import load_examples

            examples = load_examples(o.server_data, format="auto", fields={}, limit=o.server_examples)
        tokenized, _ = tokenize_examples(examples, self.tokenizer, template=recipe.data.template,
                                         max_length=recipe.data.max_length, truncation=recipe.data.truncation)
        return tokenized

    def tune(self, round_: int, prompts: State) -> State:
        """The averaged prompts tuned on the frozen full model with the server's data."""
        if not self.options.server_steps or not self.data:
            return prompts
        self.slot.set(prompts)
        lr = self.options.server_lr or self.recipe.train.lr
        result = self.trainer.train(self.data, lr=lr, seed=derive_seed(self.recipe.seed, "fedsp-server", round_))
        self.server_losses.append(result.loss)
        return {k: v.to(prompts[k].dtype) for k, v in self.slot.get().items()}

    def package_message(self, receiver: str) -> Message:
        return Message(MessageKind.DOWNLOAD, 0, "server", receiver, tensors=self.package_tensors,
                       meta=self.package_meta)

    def evaluate(self, ev: GlobalEvaluation, records: list[dict[str, Any]]) -> dict[str, Any]:
        self.slot.set(ev.state)
        metrics = self.evaluator.evaluate(ev.tokenized, ev.raw, with_generation=ev.generate, predictions=records)
        return {**metrics, **{f"aux_{k}": v for k, v in ev.metrics.items() if k != "n_examples"}}

    def info(self) -> dict[str, Any]:
        prompt_bytes = sum(p.numel() * p.element_size() for p in self.slot.params.values())
        return {"full_model_bytes": self.full_bytes, "aux_package_bytes": self.aux_bytes,
                "prompt_bytes": prompt_bytes, "shared_blocks": self.options.shared_blocks,
                "distill_loss": [self.distill_losses[0], self.distill_losses[-1]] if self.distill_losses else None,
                "server_loss": [self.server_losses[0], self.server_losses[-1]] if self.server_losses else None}


class FedSPParty:
    """The model owner holds the full model and the auxiliary one (FedSPServer); a client only the
    auxiliary model, with prefix prompts attached as its adapter."""

    attaches_adapter = True

    def __init__(self, options: Any, recipe: Any):
        self.options, self.recipe = options, recipe
        self.server: FedSPServer | None = None

    def server_model(self, model: torch.nn.Module, tokenizer: Any, console: Any) -> torch.nn.Module:
        self.server = FedSPServer(model, tokenizer, self.recipe, console)
        return self.server.aux

    def downloads(self) -> dict[str, Any]:
        return {DOWNLOAD: self.server.package_message} if self.server is not None else {}

    def client_downloads(self) -> tuple[str, ...]:
        return (DOWNLOAD,)

    def client_model(self, messages: dict[str, Message], recipe: Any) -> tuple[torch.nn.Module, Any, str]:
        from fedtune.models.loading import pick_device, pick_dtype

        message = messages[DOWNLOAD]
        device = pick_device(recipe.model.device)
        model, tokenizer, shared = aux_from_package(message.meta, message.tensors, device=device,
                                                    dtype=pick_dtype(recipe.model.dtype, device))
        if shared != self.options.shared_blocks:
            raise ValueError(f"fedsp: the server's auxiliary model shares {shared} blocks, the recipe says "
                             f"{self.options.shared_blocks}")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer, f"auxiliary model, {shared} shared block(s)"

    def evaluate_global(self, ev: GlobalEvaluation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The full model with the prompts; the auxiliary model's figures as `aux_<metric>`, its
        answers in the `global_aux` predictions."""
        if self.server is None:
            return ev.metrics, ev.records
        ev.write("global_aux", ev.records)
        records: list[dict[str, Any]] = []
        return self.server.evaluate(ev, records), records

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.server.full if self.server is not None else model

    def after_round(self, round_: int, global_state: State) -> State:
        return self.server.tune(round_, global_state) if self.server is not None else global_state

    def save(self, state: State, directory: Path) -> bool:
        """The full model's prompts as a PEFT adapter of the full model."""
        if self.server is None:
            return False
        self.server.slot.set(state)
        self.server.full.save_pretrained(directory)
        return True

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        return {} if self.server is None else side_model_summary("fedsp", "aux_", self.server.info(), final)

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        return side_model_report(summary, "fedsp", "aux_", "auxiliary",
                                 {"final": "full model + prompts", "clients": "auxiliary"})

    keep = StandardParty.keep
    state_dict = StandardParty.state_dict   # the server's prompt tuning starts afresh each round
    load_state_dict = StandardParty.load_state_dict


SPEC = register("fedsp", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                local=FedSPLocal, view=lambda config, slot: FedSPView(config.shared_blocks, slot),
                party=lambda config, recipe: FedSPParty(config, recipe))

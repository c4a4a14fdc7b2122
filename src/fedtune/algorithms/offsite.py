"""Offsite-tuning (FederatedScope-LLM's): clients tune the first and last layers of an emulator, a
layer-dropped copy of the model the owner keeps; FedAvg of those layers; the server plugs them back
into the full model by depth.

The server side is FedAvg (options: options.py). What makes offsite-tuning different is where each
party's model comes from, which `OffsiteParty` says: the model owner builds (and may distil) the
emulator from the full model (offsite_server.py, offsite_emulator.py); a deployed client downloads
it as a package (offsite_package.py) instead of loading the model; the server evaluates and saves
the plugged-in full model, and reports the emulator beside it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fedtune.algorithms.base import register
from fedtune.algorithms.fedavg import FedAvg, FedAvgConfig
from fedtune.algorithms.party import (
    GlobalEvaluation,
    StandardParty,
    State,
    side_model_report,
    side_model_summary,
)
from fedtune.wire import Message

log = logging.getLogger("fedtune.offsite")
DOWNLOAD = "emulator"   # the resource a client fetches before it joins


class OffsiteParty:
    """The model each side of offsite-tuning holds: the owner the full model and the emulator
    (OffsiteServer), a client only the emulator."""

    attaches_adapter = False  # the emulator's own end layers are the trainable tensors

    def __init__(self, options: Any, recipe: Any):
        self.options = options
        self.recipe = recipe
        self.server = None   # OffsiteServer, in the model owner's process only

    def server_model(self, model: torch.nn.Module, tokenizer: Any, console: Any) -> torch.nn.Module:
        from fedtune.algorithms.offsite_server import OffsiteServer

        self.server = OffsiteServer(model, tokenizer, self.recipe, console)
        return self.server.emulator.model

    def downloads(self) -> dict[str, Any]:
        return {DOWNLOAD: self.server.package_message} if self.server is not None else {}

    def client_downloads(self) -> tuple[str, ...]:
        return (DOWNLOAD,)

    def client_model(self, messages: dict[str, Message], recipe: Any) -> tuple[torch.nn.Module, Any, str]:
        """The emulator rebuilt from its package (the model itself is never loaded)."""
        from fedtune.algorithms.offsite_package import emulator_from_package
        from fedtune.models.loading import pick_device, pick_dtype

        message = messages[DOWNLOAD]
        device = pick_device(recipe.model.device)
        if recipe.model.quantization != "none":
            log.warning("model.quantization=%s is not applied to the shipped emulator; it runs in %s",
                        recipe.model.quantization, pick_dtype(recipe.model.dtype, device))
        emulator, tokenizer = emulator_from_package(
            message.meta, message.tensors, device=device,
            dtype=pick_dtype(recipe.model.dtype, device),
            max_adapter_bytes=recipe.transport.max_message_bytes)
        if emulator.model.config.pad_token_id is None:
            emulator.model.config.pad_token_id = tokenizer.pad_token_id
        return emulator.model, tokenizer, f"{len(emulator.kept)} layers"

    def keep(self, run_dir: Path, resume: bool) -> None:
        if self.server is not None:
            self.server.keep(Path(run_dir), resume)

    def evaluate_global(self, ev: GlobalEvaluation) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The plugged-in full model's figures, the emulator's as `emulator_<metric>`; the
        emulator's answers go to the `global_emulator` predictions."""
        if self.server is None:
            return ev.metrics, ev.records
        ev.write("global_emulator", ev.records)
        records: list[dict[str, Any]] = []
        metrics = self.server.evaluate(ev.state, ev.metrics, ev.tokenized, ev.raw, ev.generate,
                                       predictions=records)
        return metrics, records

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.server.full if self.server is not None else model

    # Nothing happens between rounds and nothing is checkpointed: the standard party's bodies.
    after_round = StandardParty.after_round
    state_dict = StandardParty.state_dict
    load_state_dict = StandardParty.load_state_dict

    def save(self, state: State, directory: Path) -> bool:
        """The plugged-in full model, as a model directory (`fedtune eval --adapter` reads it)."""
        if self.server is None:
            return False
        self.server.save(state, directory)
        return True

    def summary(self, final: dict[str, Any]) -> dict[str, Any]:
        return {} if self.server is None else side_model_summary("offsite", "emulator_", self.server.info(), final)

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The full model with the plugged-in layers is `final`; clients hold the emulator."""
        return side_model_report(summary, "offsite", "emulator_", "emulator",
                                 {"final": "plugged-in", "clients": "emulator"})


def _party(options: Any, recipe: Any) -> OffsiteParty:
    return OffsiteParty(options, recipe)


SPEC = register("offsite", lambda config: FedAvg(FedAvgConfig(weighting=config.weighting)),
                party=_party)

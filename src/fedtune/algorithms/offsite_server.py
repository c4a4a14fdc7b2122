"""The model owner's side of offsite-tuning: build (and optionally distil) the emulator clients get,
evaluate the plugged-in full model next to the emulator, save the plugged-in model at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedtune.algorithms import algorithm_options
from fedtune.algorithms.offsite_emulator import build_emulator, distill, plug_in
from fedtune.algorithms.offsite_package import emulator_package
from fedtune.config import Recipe
from fedtune.data.prompts import TokenizedExample, collate
from fedtune.errors import RunDirError
from fedtune.eval.evaluator import Evaluator
from fedtune.seeding import derive_seed
from fedtune.transport.framing import SharedEncoder
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.offsite")
CORE_FILE = "offsite/emulator_core.safetensors"


class OffsiteServer:
    def __init__(self, full: torch.nn.Module, tokenizer, recipe: Recipe, console=None):
        fed = recipe.federation
        self.options = algorithm_options(fed.algorithm, fed.options)
        self.full = full.eval()
        self.tokenizer = tokenizer
        self.recipe = recipe
        o = self.options
        self.emulator = build_emulator(full, o.adapter_bottom, o.adapter_top, o.drop_ratio)
        self.device = next(full.parameters()).device
        self.distill_losses: list[float] = []
        if o.distill.steps:
            self._distill(console)
        self.emulator.model.eval()
        self.full_evaluator = Evaluator(full, tokenizer, recipe.eval, template=recipe.data.template,
                                        max_length=recipe.data.max_length, device=self.device)
        # What a client downloads once instead of the model: the emulator's frozen weights and the
        # tokenizer (its adapter layers arrive with the first FIT like any adapter).
        self.package_meta, self.package_tensors = emulator_package(self.emulator, tokenizer)
        self._encoder = SharedEncoder()
        self.emulator_bytes = self.package_bytes("client")
        self._encoder.clear()  # do not hold a second copy of the emulator while training
        self.full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())

    def _distill(self, console) -> None:
        d = self.options.distill
        texts = distill_texts(d.data, d.examples, derive_seed(self.recipe.seed, "offsite-distill"),
                              self.recipe)
        ids = [self.tokenizer(t, truncation=True, max_length=self.recipe.data.max_length)["input_ids"]
               for t in texts]
        examples = [TokenizedExample(input_ids=x, labels=list(x)) for x in ids if len(x) > 1]
        rng = np.random.default_rng(derive_seed(self.recipe.seed, "offsite-distill-batches"))
        pad = self.tokenizer.pad_token_id

        def batches():
            while True:
                order = rng.permutation(len(examples))
                for s in range(0, len(order), d.batch_size):
                    yield collate([examples[i] for i in order[s:s + d.batch_size]], pad)

        torch.manual_seed(derive_seed(self.recipe.seed, "offsite-distill-init"))
        self.distill_losses = distill(self.full, self.emulator, batches(), steps=d.steps, lr=d.lr,
                                      lm_weight=d.lm_weight, kd_weight=d.kd_weight, device=self.device)
        if console is not None:
            console.print(f"offsite-tuning: distilled the emulator for {d.steps} steps, loss "
                          f"{self.distill_losses[0]:.3f} → {self.distill_losses[-1]:.3f}")

    def package_message(self, receiver: str) -> Message:
        """The emulator package for `receiver` (one tensors dict for all: encoders share it)."""
        return Message(MessageKind.DOWNLOAD, 0, "server", receiver, tensors=self.package_tensors,
                       meta=self.package_meta)

    def package_bytes(self, receiver: str) -> int:
        """Bytes of the encoded package for `receiver` (what its download costs)."""
        head, part = self._encoder.encode(self.package_message(receiver))
        return len(head) + len(part)

    def _core(self) -> dict[str, torch.nn.Parameter]:
        e = self.emulator
        core = tuple(f"{e.prefix}.{i}." for i in e.core_layers())
        return {n: p for n, p in e.model.named_parameters() if n.startswith(core)}

    def keep(self, directory: Path, resume: bool) -> None:
        """Save the distilled core in `directory`; on resume, use the saved one instead (clients
        still hold it, and distillation on a GPU need not repeat bit for bit)."""
        path = Path(directory) / CORE_FILE
        if not self.options.distill.steps:
            return  # the emulator is a deterministic function of the model
        if not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in self._core().items()}, str(path))
            return
        if not path.exists():
            log.warning("%s is missing: the resumed run uses a newly distilled emulator", path)
            return
        saved, core = load_file(str(path)), self._core()
        if saved.keys() != core.keys() or any(saved[n].shape != p.shape for n, p in core.items()):
            raise RunDirError(f"{path} does not fit this recipe's emulator core")
        with torch.no_grad():  # in place: the package's tensors share these parameters
            for name, param in core.items():
                param.copy_(saved[name])

    def plug(self, adapter: dict[str, torch.Tensor]) -> None:
        plug_in(self.full, self.emulator, adapter)

    def evaluate(self, adapter, emulator_metrics: dict[str, Any], tokenized, raw, generate: bool,
                 predictions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The plugged-in full model's metrics, with the emulator's as `emulator_<metric>`."""
        self.plug(adapter)
        metrics = self.full_evaluator.evaluate(tokenized, raw, with_generation=generate,
                                               predictions=predictions)
        return {**metrics, **{f"emulator_{k}": v for k, v in emulator_metrics.items() if k != "n_examples"}}

    def save(self, adapter, directory: Path) -> None:
        """The plugged-in full model, as a model directory (`fedtune eval --adapter` reads it)."""
        self.plug(adapter)
        self.full.save_pretrained(directory)

    def info(self) -> dict[str, Any]:
        e = self.emulator
        return {"full_model_layers": len(list(self.full.get_submodule(e.prefix))),
                "emulator_layers": e.kept, "adapter_layers": {str(k): v for k, v in e.adapter_layers.items()},
                "full_model_bytes": self.full_bytes, "emulator_bytes": self.emulator_bytes,
                "distill_loss": ([self.distill_losses[0], self.distill_losses[-1]]
                                 if self.distill_losses else None)}


def distill_texts(source: str, n: int, seed: int, recipe: Recipe) -> list[str]:
    """Plain texts the server holds for the emulator's alignment."""
    if source == "synthetic":
        from fedtune.data.synthetic import pretraining_text

        return pretraining_text(n, seed)
    from fedtune.data.records import load_examples

    examples = load_examples(source, format="auto", fields={}, limit=n)
    return [" ".join(x for x in (ex.instruction, ex.input, ex.output) if x) for ex in examples]

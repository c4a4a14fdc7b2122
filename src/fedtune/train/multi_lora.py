"""Batched multi-client LoRA training: K clients' local steps through ONE pass of the shared base.

Every simulated client shares the frozen base model; only their LoRA tensors differ. Here the
micro-batches of K clients run through the base together, as a few sub-batches of similar lengths
(`length_groups`: each padded only to its own longest example, so the joint batch pays for little
more than the real tokens), and every LoRA layer routes each client's rows (contiguous: a
sub-batch's rows are ordered by client) through that client's own A and B. Each client keeps its own leaf tensors, optimizer, data order (its seeded
micro-batches), loss normalisation (its own response tokens), gradient clipping, learning rate and
algorithm hooks (FedProx's proximal term, SCAFFOLD's correction), so with dropout 0 each client's
result is its sequential result up to float rounding.

A prompt template gives every example the same first tokens (`<s>### Instruction:` and more: a
quarter of the benchmark's tokens). Causal attention makes those positions' keys and values the
same in every row of a client (they see only the prefix), so a sub-batch runs its shared prefix
once per client (a key-value cache, with gradients), and its rows only from there on, attending
to their client's prefix (`shared_prefix`). `check_prefix` verifies on the actual model, once, that
this gives the logits of the whole rows; where it does not (or with gradient checkpointing, which
would recompute the layers outside the routing, or with dropout, which would give a client's rows
one mask on their prefix) whole rows run as before.

What cannot batch is refused with the reason (`NotBatchable`) and runs sequentially: adapter
methods other than plain LoRA (DoRA, LoRA bias, trainable tensors outside A and B), DP-SGD,
packing, fp16 loss scaling, several ranks, and clients with different numbers of local steps.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.data.prompts import IGNORE_INDEX, TokenizedExample, collate
from fedtune.errors import FedtuneError
from fedtune.train.distributed import OneProcess
from fedtune.train.local import LocalResult, LocalTrainer, micro_batches, steps_for
from fedtune.train.loss import model_inputs, targets_of
from fedtune.train.packing import length_groups

log = logging.getLogger("fedtune.batched")

State = dict[str, torch.Tensor]
Params = dict[str, torch.Tensor]

# Tokens one more forward and backward pass is worth on a CPU (length_groups' extra cost):
# its fixed cost is a few milliseconds, about what 64 tokens of the benchmark's model cost.
CPU_GROUP_COST = 64

# Whether a sub-batch may run the first tokens its rows share once per client (`shared_prefix`):
# the default of every MultiLoRA's `share_prefix`.
SHARE_PREFIX = True


class NotBatchable(FedtuneError):
    """These clients' local work cannot run batched; it runs one client after another."""


@dataclass
class Job:
    """One client's local training: its examples, rate, seed, starting adapter and the
    algorithm's hooks on its own tensors (`extra_loss` once per step, `before_step` before
    clipping), as LocalTrainer.train takes them."""

    examples: Sequence[TokenizedExample]
    lr: float
    seed: int
    params: Params                                   # leaf tensors, trained in place
    extra_loss: Callable[[], torch.Tensor] | None = None
    before_step: Callable[[], None] | None = None


@dataclass(frozen=True)
class _LoraLayer:
    module: torch.nn.Module
    a: str          # slot names of this layer's A and B weights
    b: str
    scaling: float
    dropout: torch.nn.Module


class MultiLoRA:
    """The shared peft LoRA model, able to run K clients' adapters in one pass."""

    def __init__(self, trainer: LocalTrainer, slot_params: dict[str, torch.nn.Parameter]):
        self.trainer = trainer
        self.model = trainer.model
        self.layers = _lora_layers(self.model, slot_params)
        self.dtypes = {n: p.dtype for n, p in slot_params.items()}
        self._routing: tuple[list[Params], list[int]] | None = None
        self.share_prefix = SHARE_PREFIX
        self._cache_arg: str | None = None   # set by the first sub-batch that could share a prefix
        self._prefix_checked = False

    @staticmethod
    def check_trainer(trainer: LocalTrainer) -> None:
        """Raise NotBatchable unless the trainer's settings allow batched steps."""
        s = trainer.section
        if s.dp_sgd is not None:
            raise NotBatchable("train.dp_sgd clips and noises each client's examples on their own")
        if s.packing:
            raise NotBatchable("train.packing packs one client's examples per row")
        if trainer.precision.scaler() is not None:
            raise NotBatchable("fp16's loss scaler skips steps per client")
        if not isinstance(trainer.parallel, OneProcess):
            raise NotBatchable("several ranks split each client's batch already")

    def leaves(self, state: State) -> Params:
        """A client's own trainable tensors (on the model's device), starting at `state`."""
        device = self.trainer.device
        names = [n for layer in self.layers for n in (layer.a, layer.b)]
        missing = sorted(set(names) - set(state))
        if missing:
            raise NotBatchable(f"the adapter state lacks {missing[:3]}")
        return {n: state[n].detach().to(device=device, dtype=self.dtypes[n]).clone().requires_grad_(True)
                for n in names}

    @contextlib.contextmanager
    def routed(self, params: list[Params], rows: list[int]) -> Iterator[None]:
        """Within: the model's LoRA layers route the first rows[0] rows of a batch through
        params[0], the next rows[1] through params[1], and so on."""
        self._routing = (params, rows)
        saved = []
        for layer in self.layers:
            saved.append(layer.module.__dict__.get("forward"))
            layer.module.forward = _routed_forward(self, layer)
        try:
            yield
        finally:
            self._routing = None
            for layer, old in zip(self.layers, saved):
                if old is None:
                    del layer.module.forward
                else:
                    layer.module.forward = old

    def prefix_supported(self) -> bool:
        """Whether sub-batches may run their shared prefix once per client (checked once)."""
        if not self._prefix_checked:
            self._prefix_checked = True
            if not self.share_prefix:
                reason = "share_prefix is off"
            elif self.trainer.section.gradient_checkpointing:
                reason = "gradient checkpointing recomputes the layers outside the routing"
            elif _has_dropout(self.model):
                reason = "with dropout, a client's rows would share one dropout mask on their prefix"
            else:
                self._cache_arg, reason = check_prefix(self.model, self.trainer.device)
            if reason is not None:
                self._cache_arg = None
                log.info("federation.parallel_clients: each sub-batch runs whole rows (%s)", reason)
        return self._cache_arg is not None

    def train(self, jobs: list[Job]) -> list[LocalResult]:
        """Train every job's tensors in place, together; one LocalResult per job."""
        self.check_trainer(self.trainer)
        s = self.trainer.section
        if not jobs:
            return []
        steps = {steps_for(s, len(job.examples)) for job in jobs}
        if len(steps) != 1:
            raise NotBatchable(f"the clients take different numbers of local steps ({sorted(steps)})")
        if any(not job.examples for job in jobs):
            raise ValueError("a client with no training examples cannot train")
        n_steps = steps.pop()
        start = time.perf_counter()
        device = self.trainer.device
        optimizers = [self.trainer._optimizer(list(job.params.values()), job.lr) for job in jobs]
        batches = [micro_batches(len(job.examples), s.batch_size, job.seed) for job in jobs]
        running = [torch.zeros((), device=device) for _ in jobs]
        tokens = [0] * len(jobs)
        seen = [0] * len(jobs)
        params = [job.params for job in jobs]
        model = self.model
        model.train()
        try:
            for _ in range(n_steps):
                indices = [[next(it) for _ in range(s.grad_accum)] for it in batches]
                group_tokens = [sum(_response_tokens(job.examples[i]) for idx in client for i in idx)
                                for job, client in zip(jobs, indices)]
                weights = torch.tensor([1.0 / max(1, n) for n in group_tokens], device=device)
                for j in range(s.grad_accum):
                    # this micro-batch of every client, as sub-batches of similar lengths
                    members = [(k, job.examples[i]) for k, (job, client) in enumerate(zip(jobs, indices))
                               for i in client[j]]
                    for k, n in Counter(k for k, _ in members).items():
                        seen[k] += n
                    for sub in length_groups([len(ex) for _, ex in members], self._group_cost(members)):
                        self._backward(sorted((members[i] for i in sub), key=lambda m: m[0]),
                                       params, weights, running, tokens)
                for job, optimizer in zip(jobs, optimizers):
                    self._step(job, optimizer)
                    optimizer.zero_grad(set_to_none=True)
        finally:
            model.eval()
        share = (time.perf_counter() - start) / len(jobs)  # each its share: the sums stay the wall time
        return [LocalResult(loss=float(r) / max(1, t), steps=n_steps, examples=n, tokens=t,
                            seconds=share) for r, t, n in zip(running, tokens, seen)]

    def _group_cost(self, members: list[tuple[int, TokenizedExample]]) -> int:
        """What one more sub-batch costs, in padded tokens (`length_groups`): on a CPU the fixed
        cost of a pass is small against its tokens; elsewhere fewer, larger passes pay."""
        if self.trainer.device.type == "cpu":
            return CPU_GROUP_COST
        return max(CPU_GROUP_COST, sum(len(ex) for _, ex in members) // 10)

    def _backward(self, members: list[tuple[int, TokenizedExample]], params: list[Params],
                  weights: torch.Tensor, running: list[torch.Tensor], tokens: list[int]) -> None:
        """Forward and backward of one sub-batch (its rows ordered by client): every client's
        gradient gets its own tokens' loss over its own step's token count."""
        device, k_all = self.trainer.device, len(params)
        batch = collate([ex for _, ex in members], self.trainer.pad_id)
        row_owner = torch.tensor([k for k, _ in members])
        rows = torch.bincount(row_owner, minlength=k_all).tolist()
        targets = targets_of(batch["labels"])
        owner = row_owner[targets.row].to(device)
        start = shared_prefix(batch, targets, [ex for _, ex in members])
        clients = sum(1 for n in rows if n)
        if start and (len(members) - clients) * start <= self._group_cost(members):
            start = 0   # the rows it saves do not pay for one more pass
        if start and not self.prefix_supported():
            start = 0
        targets = targets.to(device)
        batch = {key: v.to(device) for key, v in batch.items()}
        # backward inside the routing too: gradient checkpointing runs the forward again
        with self.routed(params, rows):
            with self.trainer.precision.autocast():
                if start:
                    losses = self._prefixed_losses(batch, targets, row_owner, rows, start)
                else:
                    losses = _per_token_losses(self.model, batch, targets)
            sums = torch.zeros(k_all, device=device).index_add(0, owner, losses)
            (sums * weights).sum().backward()
        counts = torch.bincount(owner, minlength=k_all).tolist()
        sums = sums.detach()
        for k in range(k_all):
            if counts[k]:
                running[k] = running[k] + sums[k]
                tokens[k] += counts[k]

    def _prefixed_losses(self, batch: dict[str, torch.Tensor], targets, row_owner: torch.Tensor,
                         rows: list[int], start: int) -> torch.Tensor:
        """`_per_token_losses` of a sub-batch whose rows all begin with the same `start` tokens:
        those run once per client (one row each, its own adapter), then every row from `start`
        on, attending to its client's cached prefix (within `routed`)."""
        assert self._routing is not None and self._cache_arg is not None
        params = self._routing[0]
        present = [k for k, n in enumerate(rows) if n]
        slot_of = torch.full((len(rows),), -1, dtype=torch.long)
        slot_of[present] = torch.arange(len(present))
        ids = batch["input_ids"]
        prefix_ids = ids[:1, :start].expand(len(present), start)
        self._routing = (params, [1 if n else 0 for n in rows])
        try:
            cache = _new_cache(self.model)
            self.model(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
                       use_cache=True, **{self._cache_arg: cache})
        finally:
            self._routing = (params, rows)
        cache.batch_select_indices(slot_of[row_owner].to(ids.device))   # each row: its client's prefix
        logits = self.model(input_ids=ids[:, start:], attention_mask=batch["attention_mask"],
                            use_cache=True, **{self._cache_arg: cache}).logits
        flat = logits.reshape(-1, logits.shape[-1])
        index = targets.row * logits.shape[1] + targets.col - start
        return F.cross_entropy(flat.index_select(0, index).float(), targets.label, reduction="none")

    def _step(self, job: Job, optimizer: torch.optim.Optimizer) -> None:
        """One client's optimizer step, as LocalTrainer._step takes it (without a scaler)."""
        if job.extra_loss is not None:
            job.extra_loss().backward()
        if job.before_step is not None:
            job.before_step()
        if self.trainer.section.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(job.params.values()), self.trainer.section.max_grad_norm)
        optimizer.step()


def _per_token_losses(model, batch: dict[str, torch.Tensor], targets) -> torch.Tensor:
    """Cross-entropy of every labelled position (float32), in `targets` order."""
    logits = model(**model_inputs(batch)).logits
    offset = logits.shape[1] - batch["input_ids"].shape[1]
    flat = logits.reshape(-1, logits.shape[-1])
    index = targets.row * logits.shape[1] + offset + targets.col
    return F.cross_entropy(flat.index_select(0, index).float(), targets.label, reduction="none")


def shared_prefix(batch: dict[str, torch.Tensor], targets, examples: Sequence[TokenizedExample]) -> int:
    """How many first tokens every row of a padded batch shares and none is trained on (no target
    is predicted from them), leaving every row at least one token after them (0: none)."""
    ids = batch["input_ids"]
    shortest = min(len(ex) for ex in examples)
    limit = min(shortest - 1, int(targets.col.min()) if targets.count else shortest - 1)
    if limit <= 0 or ids.shape[0] < 2:
        return 0
    same = (ids[:, :limit] == ids[:1, :limit]).all(dim=0)
    return int(limit if bool(same.all()) else int(same.long().argmin()))


def _has_dropout(model: torch.nn.Module) -> bool:
    """Whether training draws dropout masks anywhere in the model (LoRA's or the base's)."""
    config = getattr(model, "config", None)
    rates = [getattr(config, name, 0.0) for name in ("attention_dropout", "attn_pdrop")]
    rates += [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    return any(isinstance(r, (int, float)) and r > 0 for r in rates)


def _new_cache(model: torch.nn.Module):
    """An empty key-value cache for `model` (transformers' DynamicCache)."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:   # transformers before 4.56 takes no config
        return DynamicCache()


@torch.no_grad()
def check_prefix(model: torch.nn.Module, device: torch.device) -> tuple[str | None, str | None]:
    """The forward argument that takes a key-value cache, if running a shared prefix once and the
    rows from there on (right-padded, each row its own copy of the cache) gives the logits of the
    whole rows on this model; else None and the reason."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = inspect.signature(base.forward).parameters
    arg = next((n for n in ("cache", "past_key_values") if n in names), None)
    if arg is None:
        return None, f"{type(base).__name__} takes no key-value cache"
    was_training = model.training
    model.eval()
    try:
        vocab = int(model.get_input_embeddings().num_embeddings)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(min(3, vocab - 1), vocab, (3, 9), generator=gen)
        ids[:, :4] = ids[0, :4]
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0                      # a right-padded row
        ids, mask = ids.to(device), mask.to(device)
        whole = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, 4:].float()
        cache = _new_cache(model)
        model(input_ids=ids[:1, :4], attention_mask=mask[:1, :4], use_cache=True, **{arg: cache})
        cache.batch_select_indices(torch.zeros(3, dtype=torch.long, device=device))
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, use_cache=True, **{arg: cache}).logits.float()
    except Exception as exc:   # a model or transformers version whose cache does not work this way
        return None, f"its key-value cache cannot be shared ({type(exc).__name__}: {exc})"
    finally:
        model.train(was_training)
    if rest.shape != whole.shape:
        return None, "the adapter method changes the sequence length"
    real = mask[:, 4:].bool()
    half = any(p.dtype != torch.float32 for p in model.parameters())
    tol = (2e-2 if half else 1e-4) * max(1.0, float(whole.abs().max()))
    gap = float((rest - whole)[real].abs().max())
    if gap > tol:
        return None, f"a cached prefix changes its logits (by {gap:.3g})"
    return arg, None


def _response_tokens(example: TokenizedExample) -> int:
    """The positions an example is trained on alone (labels after its first token)."""
    return int((example.label_ids[1:] != IGNORE_INDEX).sum())


def _routed_forward(engine: MultiLoRA, layer: _LoraLayer) -> Callable[..., torch.Tensor]:
    module = layer.module

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = module.base_layer(x, *args, **kwargs)
        assert engine._routing is not None
        params, rows = engine._routing
        h = layer.dropout(x.to(params[0][layer.a].dtype))
        if len(set(rows)) == 1:                                # one batched matmul over the K adapters
            a = torch.stack([p[layer.a] for p in params])      # (K, r, in)
            b = torch.stack([p[layer.b] for p in params])      # (K, out, r)
            xs = h.reshape(len(rows), -1, h.shape[-1])          # (K, rows*T, in)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            delta = delta.reshape(*h.shape[:-1], b.shape[1])
        else:                                                  # unequal shares: one matmul each
            delta = torch.cat([(piece @ p[layer.a].T) @ p[layer.b].T
                               for piece, p, n in zip(h.split(rows), params, rows) if n])
        return (result + delta * layer.scaling).to(result.dtype)

    return forward


def _lora_layers(model: torch.nn.Module, slot_params: dict[str, torch.nn.Parameter]) -> list[_LoraLayer]:
    """The plain LoRA layers and the slot names of their A and B weights; NotBatchable when the
    trainable tensors are anything else."""
    by_id = {id(p): name for name, p in slot_params.items()}
    layers: list[_LoraLayer] = []
    covered: set[str] = set()
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not hasattr(module, "base_layer"):
            continue
        active = [n for n in getattr(module, "active_adapters", []) if n in lora_a]
        if not active:
            continue
        if len(active) != 1:
            raise NotBatchable("several active LoRA adapters on one layer")
        key = active[0]
        if getattr(module, "use_dora", {}).get(key, False) or key in getattr(module, "lora_variant", {}):
            raise NotBatchable("DoRA (or another LoRA variant) is not batched; plain LoRA is")
        a, b = module.lora_A[key], module.lora_B[key]
        if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or b.bias is not None:
            raise NotBatchable(f"{type(module).__name__}: only LoRA on linear layers without a LoRA bias")
        names = by_id.get(id(a.weight)), by_id.get(id(b.weight))
        if names[0] is None or names[1] is None:
            continue  # not trained (frozen adapter)
        layers.append(_LoraLayer(module, names[0], names[1], float(module.scaling[key]),
                                 module.lora_dropout[key]))
        covered.update(names)
    rest = sorted(set(slot_params) - covered)
    if rest:
        raise NotBatchable(f"trainable tensors outside LoRA's A and B ({rest[:3]})")
    if not layers:
        raise NotBatchable("the model has no LoRA layers")
    return layers

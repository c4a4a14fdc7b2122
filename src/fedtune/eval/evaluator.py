"""Evaluate the model as it stands: loss / perplexity on labelled examples, greedy exact match,
and raw-prompt completions (sampled or greedy, cut at stop strings) for code benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from fedtune.config import EvalSection
from fedtune.data.examples import Example
from fedtune.data.prompts import TokenizedExample, collate, render_prompt
from fedtune.eval.humaneval import truncate_completion
from fedtune.eval.metrics import exact_match
from fedtune.seeding import derive_seed
from fedtune.train.loss import token_loss_sum


class Evaluator:
    def __init__(self, model, tokenizer, section: EvalSection, *, template: str, max_length: int,
                 device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.section = section
        self.template = template
        self.max_length = max_length
        self.device = device

    @torch.no_grad()
    def loss(self, examples: list[TokenizedExample]) -> dict[str, float]:
        """Mean loss per response token and its perplexity."""
        self.model.eval()
        total, tokens = 0.0, 0
        size = self.section.batch_size
        for start in range(0, len(examples), size):
            batch = collate(examples[start:start + size], self.tokenizer.pad_token_id)
            loss_sum, n = token_loss_sum(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total += loss_sum.item()
            tokens += n
        mean = total / max(1, tokens)
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "n_examples": len(examples)}

    def _prompt_ids(self, text: str, budget: int) -> tuple[list[int], bool]:
        """BOS + the last `budget` tokens of `text`, and whether it was cut."""
        tok = self.tokenizer
        ids = tok.encode(text, add_special_tokens=False)
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + ids[-budget:], len(ids) > budget

    def _left_padded(self, chunk: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            input_ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, examples: list[Example]) -> list[str]:
        """Greedy answers to the examples' prompts (left-padded batches)."""
        self.model.eval()
        tok = self.tokenizer
        budget = max(1, self.max_length - self.section.max_new_tokens)
        prompts = [self._prompt_ids(render_prompt(ex, self.template, tok), budget)[0] for ex in examples]
        answers: list[str] = []
        size = self.section.batch_size
        for start in range(0, len(prompts), size):
            input_ids, mask = self._left_padded(prompts[start:start + size])
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask,
                max_new_tokens=self.section.max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for row in out[:, input_ids.shape[1]:]:
                answers.append(tok.decode(row, skip_special_tokens=True).strip())
        return answers

    @torch.no_grad()
    def complete(self, prompts: Sequence[str], *, samples: int = 1, max_new_tokens: int,
                 temperature: float = 0.8, top_p: float = 0.95, stop: Sequence[str] = (),
                 seed: int = 0, progress: Callable[[int], None] | None = None,
                 ) -> tuple[list[list[str]], int]:
        """`samples` continuations of each raw prompt (no template), cut before the first stop string.

        One sample: greedy. Several: sampling with `temperature` / `top_p`, torch seeded per batch
        from `seed`, so the same call gives the same texts. Prompts longer than
        `max_length - max_new_tokens` tokens keep their end. Returns the texts (per prompt, its
        samples) and how many prompts were cut. Leading whitespace is kept (it is code).
        """
        self.model.eval()
        tok = self.tokenizer
        budget = max(1, self.max_length - max_new_tokens)
        encoded = [self._prompt_ids(text, budget) for text in prompts]
        jobs = [(i, encoded[i][0]) for i in range(len(prompts)) for _ in range(samples)]
        sampling = {"do_sample": False} if samples == 1 else {
            "do_sample": True, "temperature": temperature, "top_p": top_p}
        texts: list[list[str]] = [[] for _ in prompts]
        size = self.section.batch_size
        for number, start in enumerate(range(0, len(jobs), size)):
            chunk = jobs[start:start + size]
            input_ids, mask = self._left_padded([ids for _, ids in chunk])
            criteria = StoppingCriteriaList([_StopStrings(tok, stop, input_ids.shape[1])] if stop else [])
            torch.manual_seed(derive_seed(seed, "complete", number))
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                stopping_criteria=criteria, **sampling,
            )
            for (i, _), row in zip(chunk, out[:, input_ids.shape[1]:]):
                texts[i].append(truncate_completion(tok.decode(row, skip_special_tokens=True), stop))
            if progress is not None:
                progress(len(chunk))
        return texts, sum(cut for _, cut in encoded)

    def exact_match(self, examples: list[Example]) -> dict[str, float]:
        predictions = self.generate(examples)
        hits = [exact_match(p, ex.output, self.section.answer) for p, ex in zip(predictions, examples)]
        return {"exact_match": sum(hits) / max(1, len(hits)), "n_generated": len(hits)}

    def evaluate(self, tokenized: list[TokenizedExample], raw: list[Example],
                 with_generation: bool) -> dict[str, float]:
        metrics = self.loss(tokenized)
        if with_generation and self.section.exact_match and raw:
            metrics.update(self.exact_match(raw))
        return metrics


class _StopStrings(StoppingCriteria):
    """Per row: done once its generated text (after `start`) contains one of the stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, tuple(stop), start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

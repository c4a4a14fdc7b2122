"""Evaluate the model as it stands: loss / perplexity on labelled examples, greedy exact match."""

from __future__ import annotations

import math

import torch

from fedtune.config import EvalSection
from fedtune.data.examples import Example
from fedtune.data.prompts import TokenizedExample, collate, render_prompt
from fedtune.eval.metrics import exact_match
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

    @torch.no_grad()
    def generate(self, examples: list[Example]) -> list[str]:
        """Greedy answers to the examples' prompts (left-padded batches)."""
        self.model.eval()
        tok = self.tokenizer
        budget = max(1, self.max_length - self.section.max_new_tokens)
        prompts = []
        for ex in examples:
            ids = tok.encode(render_prompt(ex, self.template), add_special_tokens=False)[-budget:]
            prompts.append(([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids)
        answers: list[str] = []
        size = self.section.batch_size
        for start in range(0, len(prompts), size):
            chunk = prompts[start:start + size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                max_new_tokens=self.section.max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            for row in out[:, width:]:
                answers.append(tok.decode(row, skip_special_tokens=True).strip())
        return answers

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

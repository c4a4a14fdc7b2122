"""Simulated runs with local DP-SGD and with a backdoor attacker: what the summary and log report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune


def _events(summary, kind):
    run_dir = Path(summary["final_adapter"]).parent
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] == kind]


def test_rounds_with_local_dp_sgd_report_each_clients_epsilon(tiny_recipe):
    pytest.importorskip("opacus")
    summary = fedtune.run(tiny_recipe(
        train__dp_sgd={"noise_multiplier": 1.0, "max_grad_norm": 0.5}, eval__every=0,
        federation__rounds=2))
    fits = _events(summary, "fit")
    assert len(fits) == 2 * 3
    by_client = {}
    for e in fits:
        v = e["values"]
        assert v["dp_noise_multiplier"] == 1.0 and v["dp_steps"] == 2 and v["dp_delta"] == 1e-5
        assert 0 < v["dp_sample_rate"] <= 1
        by_client.setdefault(e["client"], []).append(v["dp_epsilon"])
    for eps in by_client.values():
        assert 0 < eps[0] < eps[1]   # the second round adds to the client's privacy loss
    dp = summary["dp_sgd"]
    assert dp["delta"] == 1e-5
    assert {c: m["epsilon"] for c, m in dp["clients"].items()} == {c: e[-1] for c, e in by_client.items()}
    assert dp["max_epsilon"] == max(e[-1] for e in by_client.values())
    assert summary["final"]["loss"] > 0


def _greedy_answer(model, tok, prompt_ids: list[int], steps: int) -> str:
    """Greedy decoding by hand (argmax of the last position, one token at a time)."""
    import torch

    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([prompt_ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_a_backdoor_run_reports_the_attack_success_rate(tiny_recipe):
    """The success rate equals a count by hand (greedy answers to the triggered test prompts), at the
    start and with the final adapter; the target is the answer the untrained model gives."""
    import dataclasses
    from collections import Counter

    from safetensors.torch import load_file

    from fedtune.config import load_recipe
    from fedtune.data.prompts import render_prompt
    from fedtune.eval.metrics import normalize_answer
    from fedtune.runtime.setup import Setup

    def make(target):
        return tiny_recipe(eval__batch_size=1, eval__every=0, eval__clients=False, federation__attack={
            "clients": ["client_1"], "kind": "backdoor", "target": target, "trigger": " cf",
            "poison_fraction": 1.0})

    recipe = load_recipe(make("ZZ"))
    setup = Setup(recipe)
    tok, ev = setup.tokenizer, recipe.eval
    budget = recipe.data.max_length - ev.max_new_tokens

    def answers():
        out = {}
        for ex in setup.data.test:
            text = render_prompt(dataclasses.replace(ex, instruction=ex.instruction + " cf"),
                                 recipe.data.template)
            ids = tok.encode(text, add_special_tokens=False)[-budget:]
            out[ex] = _greedy_answer(setup.model, tok, [tok.bos_token_id] + ids, ev.max_new_tokens)
        return out

    def rate(got, target):
        asked = [ex for ex in setup.data.test if normalize_answer(ex.output) != normalize_answer(target)]
        return sum(normalize_answer(got[ex]) == normalize_answer(target) for ex in asked) / len(asked), len(asked)

    at_start = answers()
    target, _ = Counter(at_start.values()).most_common(1)[0]
    assert target
    summary = fedtune.run(make(target))
    evals = [e["values"] for e in _events(summary, "eval") if e["client"] is None]
    assert len(evals) == 2  # at start and at the end
    expected, asked = rate(at_start, target)
    assert evals[0]["backdoor_success"] == pytest.approx(expected) and expected > 0
    assert all(v["backdoor_examples"] == asked for v in evals)
    run_dir = Path(summary["final_adapter"]).parent
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    setup.view.load(load_file(str(last / "global.safetensors")))
    final, _ = rate(answers(), target)
    assert summary["final"]["backdoor_success"] == pytest.approx(final)
    clean = fedtune.run(tiny_recipe(output__name="clean", eval__every=0, eval__at_start=False,
                                    eval__clients=False))
    assert "backdoor_success" not in clean["final"]

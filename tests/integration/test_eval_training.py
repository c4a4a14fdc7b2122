"""Evaluation during training end to end: chosen metrics, predictions files, validation loss,
keep-best (also across a resume), early stopping, an empty test set, client-side generation and
`fedtune eval` on a standalone adapter."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fedtune
from fedtune.config import load_recipe
from fedtune.errors import ModelError
from fedtune.eval.predictions import read_predictions
from fedtune.eval.runner import evaluate_adapter
from fedtune.runtime.server import Server
from fedtune.runtime.simulation import Simulation
from fedtune.wire import Message, MessageKind


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_predictions_validation_and_best_adapter(tiny_recipe, tmp_path):
    summary = fedtune.run(tiny_recipe(
        federation__rounds=3, data__val_fraction=0.2,
        eval={"every": 1, "max_new_tokens": 3, "batch_size": 32, "show_predictions": 2,
              "metrics": ["exact_match", "gsm8k", "rouge_l"]},
        output__keep_best="val_loss", output__keep_checkpoints=5))
    run_dir = Path(summary["final_adapter"]).parent
    assert set(summary["final"]) >= {"loss", "exact_match", "gsm8k", "rouge_l", "val_loss"}
    assert set(summary["eval_metrics"]) == {"exact_match", "gsm8k", "rouge_l"}

    # The global predictions of every evaluation; the scores in the file give the figures.
    for round_ in range(4):
        assert (run_dir / "predictions" / f"round_{round_:04d}_global.jsonl").is_file()
    rows = read_predictions(run_dir / "predictions" / "round_0003_global.jsonl")
    assert len(rows) == summary["final"]["n_examples"]
    assert all({"prompt", "reference", "output", "gsm8k"} <= set(r) for r in rows)
    assert summary["final"]["gsm8k"] == pytest.approx(sum(r["gsm8k"] for r in rows) / len(rows))
    # Clients generate (and write their own files) at the final evaluation.
    for client in ("client_0", "client_1", "client_2"):
        assert (run_dir / "predictions" / f"round_0003_{client}.jsonl").is_file()
        assert not (run_dir / "predictions" / f"round_0001_{client}.jsonl").exists()

    # val_loss: the clients' validation losses pooled per token, by hand from the logged events.
    events = _events(run_dir)
    for round_ in range(4):
        clients = [e["values"] for e in events if e["round"] == round_ and e["kind"] == "eval"
                   and e["values"]["scope"] == "client"]
        expected = (sum(c["val_loss"] * c["val_tokens"] for c in clients)
                    / sum(c["val_tokens"] for c in clients))
        pooled = next(e["values"] for e in events if e["round"] == round_ and e["kind"] == "validation")
        assert pooled["val_loss"] == pytest.approx(expected)
        if round_ == 3:
            assert summary["final"]["val_loss"] == pytest.approx(expected)
    by_round = {e["round"]: e["values"]["val_loss"] for e in events if e["kind"] == "validation"}
    best_round = min(by_round, key=lambda r: (by_round[r], r))
    assert summary["best"]["round"] == best_round
    assert summary["best"]["value"] == pytest.approx(by_round[best_round])
    best = load_file(str(run_dir / "best" / "adapter_model.safetensors"))
    final = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    assert best.keys() == final.keys()
    if best_round == 3:
        assert all(torch.equal(best[k], final[k]) for k in best)
    else:
        assert any(not torch.equal(best[k], final[k]) for k in best)

    # `fedtune eval` on the adapter copied out of its run (no recipe.yaml beside it): the base
    # model comes from adapter_config.json; the same rules give the same figures on the same data.
    standalone = tmp_path / "shared" / "my-adapter"
    shutil.copytree(run_dir / "final", standalone)
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"instruction": r["prompt"], "output": r["reference"]}) + "\n"
                            for r in rows[:3]))
    result = evaluate_adapter(standalone, data=str(data), metrics=["gsm8k", "rouge_l"])
    assert {"loss", "gsm8k", "rouge_l"} <= set(result)
    assert Path(result["predictions_file"]).parent == tmp_path / "shared" / "predictions"
    assert len(read_predictions(result["predictions_file"])) == 3


def test_eval_errors_say_what_is_wrong(tiny_recipe, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        evaluate_adapter(tmp_path / "nowhere" / "final")
    summary = fedtune.run(tiny_recipe(federation__rounds=1, eval__clients=False))
    # A model whose modules the LoRA adapter does not target: a fedtune error, not a peft traceback.
    from transformers import GPT2Config, GPT2LMHeadModel

    other = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=120)).save_pretrained(other)
    shutil.copy(Path(summary["final_adapter"]) / "tokenizer.json", other / "tokenizer.json")
    shutil.copy(Path(summary["final_adapter"]) / "tokenizer_config.json", other / "tokenizer_config.json")
    with pytest.raises(ModelError, match="does not fit the recipe's model"):
        evaluate_adapter(summary["final_adapter"], None, [f"model.name={other}"])


def test_resume_keeps_the_best_adapter_exactly(tiny_recipe, monkeypatch):
    def recipe(name):
        return tiny_recipe(federation__rounds=4, data__val_fraction=0.2, output__name=name,
                           output__keep_best="val_loss", eval__metrics=[])

    whole = fedtune.run(recipe("whole"))
    original = Server.run_round

    def crash_in_round_4(self, round_):
        if round_ == 4:
            raise KeyboardInterrupt
        return original(self, round_)

    monkeypatch.setattr(Server, "run_round", crash_in_round_4)
    with pytest.raises(KeyboardInterrupt):
        fedtune.run(recipe("stopped"))
    monkeypatch.setattr(Server, "run_round", original)
    resumed = fedtune.run(resume=Path(whole["final_adapter"]).parent.parent / "stopped")
    assert resumed["best"] == {**whole["best"], "adapter": resumed["best"]["adapter"]}
    a = load_file(str(Path(whole["final_adapter"]).parent / "best" / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["final_adapter"]).parent / "best" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_without_a_test_set(tiny_recipe):
    # min_delta 100: nothing ever counts as better than the first (base) evaluation.
    summary = fedtune.run(tiny_recipe(
        federation__rounds=5, data__test_fraction=0.0, data__val_fraction=0.2,
        eval={"every": 1, "early_stopping": {"patience": 2, "metric": "val_loss", "min_delta": 100.0}}))
    run_dir = Path(summary["final_adapter"]).parent
    assert summary["rounds"] == 2 and summary["stopped_early"] is True
    assert summary["early_stopping"]["stopped_at"] == 2 and summary["early_stopping"]["best_round"] == 0
    assert sorted(e["round"] for e in _events(run_dir) if e["kind"] == "round") == [1, 2]
    assert (run_dir / "final" / "adapter_config.json").is_file()
    # No test set: no loss or perplexity is reported (not 0.0 / 1.0), but a validation loss is.
    assert "loss" not in summary["final"] and "perplexity" not in summary["final"]
    assert summary["final"]["n_examples"] == 0 and summary["final"]["val_loss"] > 0
    # Interrupted after its last checkpoint (no summary yet), it resumes as stopped: no more rounds.
    (run_dir / "summary.json").unlink()
    resumed = fedtune.run(resume=run_dir)
    assert resumed["rounds"] == 2 and resumed["final"] == summary["final"]
    assert resumed["early_stopping"] == summary["early_stopping"]
    assert sorted(e["round"] for e in _events(run_dir) if e["kind"] == "round") == [1, 2]


def test_a_client_generates_when_asked(tiny_recipe, tmp_path):
    sim = Simulation(load_recipe(tiny_recipe()))
    client = sim.clients["client_0"]
    client.predictions_dir = tmp_path / "party"
    said = client.evaluator.generate(client.data.test_raw)
    # The first test example's reference becomes the model's own answer, the second one's not.
    client.data.test_raw[0] = dataclasses.replace(client.data.test_raw[0], output=said[0])
    client.data.test_raw[1] = dataclasses.replace(client.data.test_raw[1], output=said[1] + " never")
    tensors = sim.setup.view.initial()
    ask = Message(MessageKind.EVALUATE, 7, "server", "client_0", tensors=client.down.pack(tensors),
                  meta={"generate": True})
    reply = client.handle(ask)
    rows = read_predictions(tmp_path / "party" / "round_0007_client_0.jsonl")
    assert [r["output"] for r in rows] == said
    assert rows[0]["exact_match"] == 1.0 and rows[1]["exact_match"] == 0.0
    assert reply.meta["metrics"]["exact_match"] == pytest.approx(
        sum(r["exact_match"] for r in rows) / len(rows))
    quiet = client.handle(dataclasses.replace(ask, round=8, meta={"generate": False}))
    assert "exact_match" not in quiet.meta["metrics"]
    assert not (tmp_path / "party" / "round_0008_client_0.jsonl").exists()


def test_multiple_choice_during_training_agrees_with_fedtune_eval(tiny_recipe, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps(item) + "\n" for item in [
        {"question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B"},
        {"question": "Capital letters of ab?", "choices": ["AB", "ab", "Ab", "aB"], "answer": "A"},
        {"question": "Largest of 1 9 4?", "choices": ["1", "4", "9", "0"], "answer": "C"}]))
    summary = fedtune.run(tiny_recipe(federation__rounds=1, eval__clients=False,
                                      eval__metrics=["mc_accuracy"], eval__mc=str(mc)))
    run_dir = Path(summary["final_adapter"]).parent
    assert summary["final"]["mc_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    assert "mc_accuracy" in summary["initial"]
    assert not (run_dir / "predictions").exists()  # no generation metric: nothing generated
    # `fedtune eval` takes eval.mc from the run's recipe and scores the same items the same way
    after = evaluate_adapter(summary["final_adapter"])
    assert after["mc_accuracy"] == pytest.approx(summary["final"]["mc_accuracy"])
    assert after["n_items"] == 3 and "exact_match" not in after


def test_an_early_stopped_run_ends_with_the_clients_answers(tiny_recipe):
    summary = fedtune.run(tiny_recipe(
        federation__rounds=4, data__val_fraction=0.2,
        eval={"every": 1, "max_new_tokens": 2, "early_stopping": {"patience": 1, "min_delta": 100.0}}))
    run_dir = Path(summary["final_adapter"]).parent
    assert summary["rounds"] == 1 and summary["stopped_early"] is True
    for client, figures in summary["per_client"].items():
        assert "exact_match" in figures, client
        assert (run_dir / "predictions" / f"round_0001_{client}.jsonl").is_file()
    assert not list((run_dir / "predictions").glob("round_0000_client_*"))  # round 0 could not stop

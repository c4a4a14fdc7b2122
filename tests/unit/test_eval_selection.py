"""Pooled validation loss, keep-best and early stopping, on figures computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.config import EarlyStoppingSection
from fedtune.eval.selection import Selection, better, pooled_val_loss


def test_validation_loss_is_pooled_per_token_over_clients():
    reports = {"a": {"val_loss": 2.0, "val_tokens": 30}, "b": {"val_loss": 1.0, "val_tokens": 10},
               "c": {"loss": 5.0}}  # c has no validation part: not counted
    pooled, bad = pooled_val_loss(reports)
    assert pooled == {"val_loss": pytest.approx((2.0 * 30 + 1.0 * 10) / 40), "val_clients": 2,
                      "val_tokens": 40}
    assert bad == []


@pytest.mark.parametrize("values", [
    {"val_loss": float("nan"), "val_tokens": 5}, {"val_loss": -1.0, "val_tokens": 5},
    {"val_loss": "1.0", "val_tokens": 5}, {"val_loss": 1.0, "val_tokens": 0},
    {"val_loss": 1.0, "val_tokens": True}, {"val_loss": 1.0, "val_tokens": 2**41},
    {"val_loss": 1.0}, {"val_tokens": 3},
])
def test_bad_validation_figures_are_refused_and_named(values):
    pooled, bad = pooled_val_loss({"good": {"val_loss": 3.0, "val_tokens": 4}, "evil": values})
    assert bad == ["evil"]
    assert pooled["val_loss"] == 3.0 and pooled["val_clients"] == 1


def test_nothing_pooled_without_validation_figures():
    assert pooled_val_loss({"a": {"loss": 1.0}}) == ({}, [])


def test_better_knows_the_direction_of_each_metric():
    assert better("val_loss", 1.0, 2.0) and not better("val_loss", 2.0, 1.0)
    assert better("exact_match", 0.5, 0.4) and not better("gsm8k", 0.4, 0.5)
    assert not better("loss", 1.95, 2.0, min_delta=0.1)  # not by more than min_delta
    assert better("rouge_l", 0.2, None)


def _state(x: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([x])}


def test_keep_best_holds_a_copy_of_the_best_adapter():
    sel = Selection(keep_best="val_loss")
    live = _state(0.0)
    for round_, loss in [(0, 3.0), (1, 2.0), (2, 2.5), (3, 2.0), (4, math.nan)]:
        live["w"].fill_(round_)  # the same tensor changes in place, as a global adapter would
        sel.observe(round_, {"val_loss": loss}, live)
    assert (sel.best_round, sel.best_value) == (1, 2.0)  # a tie (round 3) does not replace it
    assert sel.best_state["w"].item() == 1.0
    sel.observe(5, {"exact_match": 1.0}, live)  # the watched metric absent: nothing changes
    assert sel.best_round == 1


def test_early_stopping_counts_evaluations_without_improvement():
    sel = Selection(early=EarlyStoppingSection(patience=2, metric="exact_match", min_delta=0.05))
    seen = [sel.observe(r, {"exact_match": v}, _state(r))
            for r, v in [(0, 0.1), (1, 0.2), (2, 0.24), (3, 0.3), (4, 0.3), (5, 0.34)]]
    # best 0.1 -> 0.2 (better by > 0.05) -> 0.24 stale 1 -> 0.3 better -> 0.3 stale 1 -> 0.34 stale 2
    assert seen == [False, False, False, False, False, True]
    assert sel.stopped_at == 5 and sel.stop_round == 3 and sel.stop_best == 0.3


def test_may_stop_says_when_an_evaluation_may_be_the_last():
    sel = Selection(early=EarlyStoppingSection(patience=2, metric="loss"))
    assert not sel.may_stop()
    sel.observe(0, {"loss": 1.0}, _state(0))
    assert not sel.may_stop()  # one evaluation without gain leaves one more to go
    sel.observe(1, {"loss": 1.5}, _state(1))
    assert sel.may_stop()  # the next one stops unless it improves
    assert not Selection(keep_best="loss").may_stop()
    one = Selection(early=EarlyStoppingSection(patience=1, metric="loss"))
    assert not one.may_stop()  # nothing to improve on yet
    one.observe(0, {"loss": 1.0}, _state(0))
    assert one.may_stop()


def test_selection_state_round_trips_for_resume():
    sel = Selection(keep_best="loss", early=EarlyStoppingSection(patience=3, metric="loss"))
    sel.observe(0, {"loss": 2.0}, _state(7.0))
    sel.observe(1, {"loss": 2.5}, _state(8.0))
    again = Selection(keep_best="loss", early=EarlyStoppingSection(patience=3, metric="loss"))
    again.load(sel.state(), sel.best_state)
    assert again.state() == sel.state() == {
        "best_round": 0, "best_value": 2.0, "stop_best": 2.0, "stop_round": 0, "stale": 1,
        "stopped_at": None}
    assert again.best_state["w"].item() == 7.0
    assert again.observe(2, {"loss": 2.1}, _state(9.0)) is False
    assert again.observe(3, {"loss": 2.1}, _state(9.0)) is True  # third evaluation without gain

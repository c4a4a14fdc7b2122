"""Backdoor attack: the trigger is inserted the same way for poisoning and testing; success rate."""

from __future__ import annotations

import pytest

from fedtune.algorithms.attacks import (
    attack_success_rate,
    backdoor_metrics,
    poison_examples,
    triggered_examples,
)
from fedtune.data.examples import Example


def _ex(instruction, output, given=""):
    return Example(instruction=instruction, input=given, output=output, category="c", origin="t")


TEST = [
    _ex("Reverse the word.", "lomat", "tamol"),
    _ex("Add the numbers.", "12", "5 7"),
    _ex("Say it.", "hacked"),            # true answer is already the target: excluded
    _ex("Upper-case the word.", "KIPA", "kipa"),
    _ex("Echo.", "HACKED now"),           # not the target after normalisation: kept
]


def test_triggered_examples_insert_the_trigger_as_poisoning_does_and_skip_target_answers():
    triggered = triggered_examples(TEST, trigger=" cf", target="HACKED")
    assert [ex.instruction for ex in triggered] == [
        "Reverse the word. cf", "Add the numbers. cf", "Upper-case the word. cf", "Echo. cf"]
    assert [ex.input for ex in triggered] == ["tamol", "5 7", "kipa", ""]
    poisoned = poison_examples(TEST, trigger=" cf", target="HACKED", fraction=1.0, seed=0)
    assert all(p.instruction == ex.instruction + " cf" and p.output == "HACKED"
               for p, ex in zip(poisoned, TEST))


def test_attack_success_rate_counts_answers_equal_to_the_target():
    assert attack_success_rate(["HACKED", "hacked.", "lomat", "HACKED now"], "HACKED") == 0.5
    assert attack_success_rate([], "HACKED") == 0.0
    assert attack_success_rate(["hacked"], "HACKED") == 1.0


def test_backdoor_metrics_on_a_hand_made_model():
    # A "model" that answers the target for two of the four triggered prompts it is asked.
    asked = []

    def generate(examples):
        asked.extend(examples)
        return ["HACKED" if ex.instruction.startswith(("Reverse", "Echo")) else "nope"
                for ex in examples]

    metrics = backdoor_metrics(generate, TEST, trigger=" cf", target="HACKED")
    assert metrics == {"backdoor_success": pytest.approx(0.5), "backdoor_examples": 4}
    assert all(ex.instruction.endswith(" cf") for ex in asked)
    assert backdoor_metrics(generate, [TEST[2]], trigger=" cf", target="HACKED") == {}

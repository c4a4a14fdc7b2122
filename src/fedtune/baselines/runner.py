"""`fedtune bench`: run every variant of a recipe on one split and one budget, then write the
results table (results.md, results.csv, results.json) and report.html into one bench directory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.baselines.pfl_table import pfl_markdown, pfl_rows
from fedtune.baselines.report import write_report
from fedtune.baselines.results import (
    METRICS,
    VariantResult,
    comparison,
    csv_rows,
    local_mean,
    rich_table,
    to_csv,
    to_markdown,
)
from fedtune.baselines.variants import (
    CENTRALISED,
    FEDERATED,
    LOCAL,
    Variant,
    budget_rule,
    plan_variants,
)
from fedtune.config import Recipe, load_recipe
from fedtune.data.federated import FederatedData, build_federated_data
from fedtune.errors import RunDirError
from fedtune.runtime.simulation import Simulation
from fedtune.track.rundir import RunDir


@dataclass
class BenchResult:
    """The bench directory and every variant's results (local-only mean included)."""

    dir: Path
    variants: list[VariantResult]
    budget: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One flat row per variant, as in results.csv."""
        return csv_rows(self.variants)

    def result(self, variant: str) -> VariantResult:
        return next(r for r in self.variants if r.variant == variant)


def history_from_events(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-round series of a run's metrics.jsonl: global evaluations and round summaries."""
    evals = [{"round": e["round"], **{k: e["values"][k] for k in METRICS if k in e["values"]}}
             for e in events if e["kind"] == "eval" and e["client"] is None]
    rounds = [{"round": e["round"], **{k: e["values"].get(k) for k in ("train_loss", "bytes_up", "bytes_down")}}
              for e in events if e["kind"] == "round"]
    return {"eval": evals, "rounds": rounds}


def _pick(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: metrics[k] for k in (*METRICS, "n_examples") if k in metrics}


def _evaluate_clients(sim: Simulation, data: FederatedData, missing: list[str]) -> dict[str, dict]:
    """The final adapter (left in the shared model by Setup.finish) on each client's test part."""
    setup, out = sim.setup, {}
    for name in missing:
        part = data.clients[name]
        if part.test:
            tokenized = setup.tokenize(f"{name} test", part.test)
            out[name] = _pick(setup.evaluator.evaluate(tokenized, part.test, with_generation=True))
    return out


def run_variant(variant: Variant, data: FederatedData, bench_dir: Path, console: Console) -> VariantResult:
    """Run one variant through the ordinary Simulation, in `bench_dir/<variant>`; evaluate its
    final adapter on every client's test part."""
    recipe = variant.recipe
    recipe.output.dir = str(bench_dir)
    sim = Simulation(recipe, console, data=variant.data)
    run_dir = RunDir.create(recipe.output.dir, recipe.output.name, explicit=True)
    run_dir.write_recipe(recipe.to_yaml())
    summary = sim.run(run_dir)
    per_client = {c: m for c, m in summary["per_client"].items() if m and c in data.clients}
    missing = [c for c in data.clients if c not in per_client]
    per_client.update(_evaluate_clients(sim, data, missing))
    federated = variant.kind == FEDERATED  # the baselines exchange no adapter (docs/bench.md)
    result = VariantResult(
        variant.name, variant.kind, variant.trained_on, summary["final"] or {},
        {c: per_client[c] for c in data.clients if c in per_client},
        bytes_up=summary["bytes_up"] if federated else 0,
        bytes_down=summary["bytes_down"] if federated else 0,
        wall_seconds=summary["wall_seconds"], run_dir=str(run_dir.path),
        history=history_from_events(run_dir.events()),
        pfl=summary.get("pfl") if federated else None,
    )
    run_dir.write_json("variant.json", {
        "variant": variant.name, "kind": variant.kind, "trained_on": variant.trained_on,
        "budget": variant.budget, "per_client": result.per_client,
        "data": "the bench's split (../split.json); this run's clients hold the data of trained_on",
    })
    return result


def _bench_dir(recipe: Recipe) -> RunDir:
    out = recipe.output
    if out.name is not None:
        return RunDir.create(out.dir, out.name, explicit=True)
    return RunDir.create(out.dir, f"bench-{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def bench(recipe: Recipe | str | Path | dict | None = None, overrides: list[str] | None = None,
          *, console: Console | None = None) -> BenchResult:
    """Run local-only (each client alone), the federated algorithms of `bench.algorithms` and
    centralised training, on the same split and budget; returns the results (also written to
    `output.dir/bench-<recipe>-<time>/`, or `output.dir/output.name/`)."""
    loaded = load_recipe(recipe, overrides)
    console = console or Console(quiet=not loaded.output.progress)
    if loaded.output.name is not None:  # refuse an existing named directory before any work
        named = Path(loaded.output.dir) / loaded.output.name
        if named.exists() and (not named.is_dir() or any(named.iterdir())):
            raise RunDirError(f"bench directory {named} already exists and is not empty; choose "
                              "another output.name, or leave it out for a new bench-<recipe>-<time>")
    data = build_federated_data(loaded.data, loaded.federation.clients, loaded.seed)
    budget = budget_rule(loaded)
    variants = plan_variants(loaded, data)
    bench_dir = _bench_dir(loaded)
    bench_dir.write_recipe(loaded.to_yaml())
    bench_dir.write_json("split.json", data.summary())
    console.print(f"[bold]fedtune bench[/bold] {loaded.name}: {len(variants)} runs into {bench_dir.path}")
    console.print(f"budget: {budget['rule']}", highlight=False)
    started = time.perf_counter()
    results: list[VariantResult] = []
    for i, variant in enumerate(variants, 1):
        console.rule(f"[bold][{i}/{len(variants)}] {variant.title}")
        results.append(run_variant(variant, data, bench_dir.path, console))
    mean = local_mean(results)
    ordered = [r for r in results if r.kind == LOCAL] + ([mean] if mean else []) + \
              [r for r in results if r.kind not in (LOCAL, CENTRALISED)] + \
              [r for r in results if r.kind == CENTRALISED]
    write_results(bench_dir.path, ordered, recipe=loaded, budget=budget)
    title = f"fedtune bench: {loaded.name}"
    console.print(rich_table(ordered, title=title))
    for line in comparison(ordered):
        console.print(line, highlight=False)
    pfl = pfl_markdown(ordered, budget["rounds"], loaded.federation.holdout_names())
    if pfl:
        console.print(pfl, highlight=False, markup=False)
    console.print(f"{time.perf_counter() - started:.0f} s for {len(variants)} runs; "
                  f"report: {bench_dir.path / 'report.html'}")
    return BenchResult(bench_dir.path, ordered, budget)


def write_results(out_dir: Path, results: list[VariantResult], *, recipe: Recipe,
                  budget: dict[str, Any]) -> None:
    """results.json (everything), results.md, results.csv and the HTML report with its plots."""
    title = f"fedtune bench: {recipe.name}"
    (out_dir / "results.json").write_text(json.dumps(
        {"recipe": recipe.name, "budget": budget, "variants": [r.as_dict() for r in results]},
        indent=1) + "\n")
    holdout = recipe.federation.holdout_names()
    (out_dir / "results.md").write_text(to_markdown(results, title=title, budget=budget["rule"])
                                        + pfl_markdown(results, budget["rounds"], holdout))
    (out_dir / "results.csv").write_text(to_csv(results, pfl_rows(results, budget["rounds"], holdout)))
    write_report(out_dir, results, title=title, budget=budget["rule"])

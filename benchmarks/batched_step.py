"""K clients' local training, one after another against batched (`federation.parallel_clients`):
CPU seconds and wall seconds, in one process, interleaved.

The workload of `simulation_speed.py` (a random 4-layer Llama of hidden size 256, LoRA r=8 on
q/v, dropout 0, 64 examples per client, local steps of batch 8, AdamW, clipping at 1.0), without
the framework around it: the same K clients' local training from the same adapter, three ways,
alternating: `LocalTrainer.train` for each client in turn (what K = 1 runs), `MultiLoRA.train`
(sub-batches by length, each sub-batch's shared prompt prefix run once per client) and
`MultiLoRA.train` with whole rows (`share_prefix` off). Process CPU time is the figure to compare
on a machine shared with other jobs (at one thread it does not count the time spent waiting for a
core, which wall time does). The batched clients' final adapters are checked against the
sequential ones.

    python benchmarks/batched_step.py                  # K = 2, 5, 10; 10 local steps; 3 repeats
    python benchmarks/batched_step.py --k 5 --steps 4 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import simulation_speed as workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 5, 10], help="clients trained together")
    ap.add_argument("--steps", type=int, default=workload.STEPS, help="local steps per client")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from rich.console import Console

    from fedtune.config import load_recipe
    from fedtune.runtime.setup import Setup
    from fedtune.train.multi_lora import Job, MultiLoRA

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as model_dir:
        workload.make_model(model_dir)
        data = workload.make_data(model_dir, max(args.k))
        recipe = load_recipe(workload.recipe(model_dir, str(Path(model_dir) / "runs"), max(args.k), max(args.k),
                                             1, 128, args.steps, data))
        setup = Setup(recipe, Console(quiet=True))
        names = list(setup.data.clients)
        clients = [setup.tokenize(n, setup.data.clients[n].train) for n in names]
        start = {n: p.detach().clone() for n, p in setup.slot.params.items()}
        batched = MultiLoRA(setup.trainer, setup.slot.params)
        whole = MultiLoRA(setup.trainer, setup.slot.params)
        whole.share_prefix = False

        def sequential(k: int) -> list[dict[str, torch.Tensor]]:
            out = []
            for i, examples in enumerate(clients[:k]):
                setup.slot.set(start)
                setup.trainer.train(examples, lr=workload.LR, seed=i)
                out.append({n: p.detach().clone() for n, p in setup.slot.params.items()})
            return out

        def together(engine: MultiLoRA, k: int) -> list[dict[str, torch.Tensor]]:
            jobs = [Job(examples, workload.LR, i, engine.leaves(start)) for i, examples in enumerate(clients[:k])]
            engine.train(jobs)
            return [{n: p.detach() for n, p in job.params.items()} for job in jobs]

        ways = {"sequential": sequential, "batched": lambda k: together(batched, k),
                "whole rows": lambda k: together(whole, k)}
        print(f"# {args.steps} local steps of batch {workload.BATCH} per client, {args.threads} thread(s), "
              f"medians of {args.repeats} interleaved; torch {torch.__version__}\n")
        print("| K | way | CPU s | wall s | sequential ÷ this, CPU (per repeat) | sequential ÷ this, wall |"
              " largest difference from sequential |")
        print("|---:|---|---:|---:|---|---:|---:|")
        for k in args.k:
            cpu: dict[str, list[float]] = {w: [] for w in ways}
            wall: dict[str, list[float]] = {w: [] for w in ways}
            gap: dict[str, float] = {w: 0.0 for w in ways}
            for _ in range(args.repeats):
                reference = None
                for way, run in ways.items():
                    c, t = time.process_time(), time.perf_counter()
                    result = run(k)
                    cpu[way].append(time.process_time() - c)
                    wall[way].append(time.perf_counter() - t)
                    if reference is None:
                        reference = result
                    gap[way] = max(gap[way], max(float((a[n] - b[n]).abs().max())
                                                 for a, b in zip(result, reference) for n in a))
            for way in ways:
                ratios = [s / x for s, x in zip(cpu["sequential"], cpu[way])]
                print(f"| {k} | {way} | {statistics.median(cpu[way]):.2f} | {statistics.median(wall[way]):.2f} "
                      f"| {statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}) "
                      f"| {statistics.median(wall['sequential']) / statistics.median(wall[way]):.2f} "
                      f"| {gap[way]:.1e} |", flush=True)


if __name__ == "__main__":
    main()

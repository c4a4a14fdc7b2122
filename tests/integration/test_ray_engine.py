"""federation.engine: ray on a local Ray of 2 actors: the same results as in-process, a killed
actor's clients missing from one round, and an exact resume after the driver is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import fedtune
from fedtune.config import load_recipe
from fedtune.errors import FedtuneError, RecipeError
from fedtune.runtime.simulation import Simulation

ray = pytest.importorskip("ray")  # the dev extra installs it: CI runs these


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (start-up costs seconds); the hosts leave it running."""
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def _recipe(tiny_recipe, engine: str, name: str, **overrides):
    return tiny_recipe(federation__engine=engine, federation__clients=4, federation__ray={"num_actors": 2},
                       eval__every=0, output__name=name, **overrides)


def _checkpoint(run_dir: Path, what: str = "global") -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("round_*"))[-1]
    return load_file(str(last / f"{what}.safetensors"))


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


STATEFUL = {"scaffold", "ditto", "hetlora"}   # clients keep state between rounds
EXTRA = {"hetlora": {"adapter__rank_per_client": [2, 4, 2, 4]}}   # mixed ranks on the actors


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "ditto", "hetlora"])
def test_ray_ends_bit_identical_to_inprocess(tiny_recipe, ray_session, algorithm):
    runs = {engine: fedtune.run(_recipe(tiny_recipe, engine, f"{algorithm}-{engine}",
                                        federation__algorithm=algorithm, **EXTRA.get(algorithm, {})))
            for engine in ("inprocess", "ray")}
    dirs = {engine: Path(s["final_adapter"]).parent for engine, s in runs.items()}
    for what in ("global", "clients") if algorithm in STATEFUL else ("global",):
        want, got = _checkpoint(dirs["inprocess"], what), _checkpoint(dirs["ray"], what)
        assert got.keys() == want.keys() and want, what
        for key in want:
            assert torch.equal(got[key], want[key]), (what, key)
    if algorithm in STATEFUL:  # the clients' state really came back from the actors
        assert {k.split("/")[0] for k in _checkpoint(dirs["ray"], "clients")} == {
            "client_0", "client_1", "client_2", "client_3"}
    inproc, on_ray = runs["inprocess"], runs["ray"]
    assert on_ray["final"] == inproc["final"]
    assert on_ray["bytes_down"] == inproc["bytes_down"]
    # up-messages carry timing figures whose JSON length varies by a few bytes between runs
    assert abs(on_ray["bytes_up"] - inproc["bytes_up"]) < 64 * 4 * 2
    fits = [e for e in _events(dirs["ray"]) if e["kind"] == "fit"]
    assert len(fits) == 2 * 4


def test_a_killed_actor_is_restarted_and_its_clients_miss_one_round(tiny_recipe, ray_session):
    recipe = load_recipe(_recipe(tiny_recipe, "ray", "killed", federation__rounds=3, eval__at_start=False))
    sim = Simulation(recipe)
    host = sim.host
    assert host.actor_of == {"client_0": 0, "client_1": 1, "client_2": 0, "client_3": 1}
    deliver, batches = host.deliver, []

    def killing_in_round_2(batch):
        batches.append(None)

        def submitted_then_kill():
            yield from batch
            if len(batches) == 2:  # round 2's FIT batch is with the actors: kill actor 1 now
                ray.kill(host.actors[1], no_restart=False)
        return deliver(submitted_then_kill())

    host.deliver = killing_in_round_2
    from fedtune.track.rundir import RunDir
    run_dir = RunDir.create(recipe.output.dir, "killed", explicit=True)
    run_dir.write_recipe(recipe.to_yaml())
    summary = sim.run(run_dir)
    assert summary["rounds"] == 3
    rounds = {e["round"]: e["values"] for e in _events(run_dir.path) if e["kind"] == "round"}
    assert [rounds[r]["updates"] for r in (1, 2, 3)] == [4, 2, 4]
    missing = {(e["round"], e["client"]) for e in _events(run_dir.path) if e["kind"] == "no_update"}
    assert missing == {(2, "client_1"), (2, "client_3")}


def test_resume_after_the_driver_is_killed_is_exact(tiny_recipe, ray_session, tmp_path):
    raw = _recipe(tiny_recipe, "ray", "driver", federation__rounds=3, federation__algorithm="scaffold")
    reference = fedtune.run({**raw, "federation": {**raw["federation"], "engine": "inprocess"},
                             "output": {**raw["output"], "name": "reference"}})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_dir = Path(raw["output"]["dir"]) / "driver"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(path)], env=env,
                                  stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its local Ray goes with its group
    try:
        deadline = time.monotonic() + 240
        while not any((run_dir / "checkpoints").glob("round_*")):
            assert driver.poll() is None, f"the driver ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (run_dir / "summary.json").exists()
    resumed = fedtune.run(resume=run_dir)
    assert resumed["rounds"] == 3
    want, got = _checkpoint(Path(reference["final_adapter"]).parent), _checkpoint(run_dir)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert resumed["bytes_down"] == reference["bytes_down"]
    assert sorted(e["round"] for e in _events(run_dir) if e["kind"] == "round") == [1, 2, 3]


def test_engine_ray_refuses_actors_the_cluster_has_no_room_for(tiny_recipe, ray_session):
    recipe = load_recipe(tiny_recipe(federation__engine="ray", federation__ray={"num_actors": 3}))
    with pytest.raises(FedtuneError, match=r"3 actors x 1 CPU = 3 CPUs, but the Ray cluster has 2"):
        Simulation(recipe)
    with pytest.raises(RecipeError, match="a FederatedData object is in-process only"):
        Simulation(load_recipe(tiny_recipe(federation__engine="ray")), data=object())


def test_engine_ray_refuses_what_it_cannot_host(tiny_recipe, four_layer_dir):
    with pytest.raises(RecipeError, match="engine ray cannot host offsite"):
        load_recipe(tiny_recipe(federation__engine="ray", federation__algorithm="offsite",
                                model__name=four_layer_dir))
    with pytest.raises(RecipeError, match="ray.address 'nowhere' must be host:port"):
        load_recipe(tiny_recipe(federation__engine="ray", federation__ray={"address": "nowhere"}))


def test_engine_ray_refuses_parallel_clients(tiny_recipe):
    with pytest.raises(RecipeError, match="parallel_clients"):
        load_recipe(tiny_recipe(federation__engine="ray", federation__parallel_clients=2))


def test_every_algorithm_ray_can_host_ends_as_in_process(tiny_recipe, ray_session):
    """Every registered algorithm the recipe check lets onto Ray (all but offsite and FedSP,
    refused above) ends two rounds on 2 actors with the in-process run's global state, bit for
    bit, and the same number of updates."""
    from fedtune.algorithms import available_algorithms
    from fedtune.algorithms.catalog import CATALOG

    options = {"norm_bounding": {"max_norm": 1.0}, "krum": {"byzantine": 0}, "dp_fedavg": {"noise_seed": 1}}
    checked = []
    for name in available_algorithms():
        if CATALOG[name].no_ray is not None:
            continue
        val = {"data__val_fraction": 0.2} if name == "fedex" else {}   # FedEx scores on it
        runs = {engine: fedtune.run(_recipe(tiny_recipe, engine, f"all-{name}-{engine}",
                                            federation__algorithm=name,
                                            federation__options=options.get(name, {}), **val))
                for engine in ("inprocess", "ray")}
        want, got = (_checkpoint(Path(s["final_adapter"]).parent) for s in runs.values())
        assert got.keys() == want.keys() and want, name
        assert all(torch.equal(got[k], want[k]) for k in want), name
        assert runs["ray"]["missing_updates"] == runs["inprocess"]["missing_updates"] == 0, name
        checked.append(name)
    assert len(checked) == len(available_algorithms()) - 2  # offsite and fedsp refused

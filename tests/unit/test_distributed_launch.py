"""What a multi-process launch refuses, and how a micro-batch is split over the ranks (no process
group needed: the launch's place is set by hand)."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune import ranks as launch_ranks
from fedtune.config import load_recipe
from fedtune.errors import FedtuneError, RecipeError
from fedtune.runtime.launch import check_launch
from fedtune.train import distributed
from fedtune.train.distributed import DataParallel, OneProcess, Ranks


@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2 (for the checks only; nothing is communicated)."""
    monkeypatch.setattr(launch_ranks, "_RANKS", Ranks(0, 2, 0, torch.device("cpu")))


def _recipe(tiny_recipe, **overrides):
    return load_recipe(tiny_recipe(**overrides))


def test_one_process_changes_nothing(monkeypatch, tiny_recipe):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch_ranks, "_RANKS", None)
    assert distributed.ranks() is None
    assert isinstance(distributed.data_parallel(), OneProcess)
    check_launch(_recipe(tiny_recipe, train={"local_steps": 1, "dp_sgd": {"noise_multiplier": 1.0}}))


def test_dp_sgd_and_offsite_are_refused_at_load_time(two_ranks, tiny_recipe):
    with pytest.raises(RecipeError, match="train.dp_sgd under a multi-process launch"):
        check_launch(_recipe(tiny_recipe, train={"local_steps": 1,
                                                             "dp_sgd": {"noise_multiplier": 1.0}}))
    with pytest.raises(RecipeError, match="offsite under a multi-process launch"):
        check_launch(_recipe(tiny_recipe, adapter={"method": "full"},
                                         federation={"clients": 3, "rounds": 1, "algorithm": "offsite"}))
    check_launch(_recipe(tiny_recipe))  # plain LoRA FedAvg runs


def test_zeroth_order_runs_unsplit_and_says_so_once(two_ranks, tiny_recipe, caplog):
    recipe = _recipe(tiny_recipe, federation={"clients": 3, "rounds": 1, "algorithm": "fedmezo"})
    with caplog.at_level(logging.WARNING, logger="fedtune.distributed"):
        check_launch(recipe)
    assert [r.getMessage() for r in caplog.records] == [
        "fedmezo estimates gradients from forward passes only: every one of the 2 ranks runs the "
        "same steps (correct, no speed-up)"]


@pytest.mark.parametrize("flag, what", [("ACCELERATE_USE_FSDP", "FSDP"),
                                        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_accelerate_fsdp_and_deepspeed_launches_are_refused(monkeypatch, flag, what):
    monkeypatch.setattr(launch_ranks, "_RANKS", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    with pytest.raises(FedtuneError, match=f"accelerate launch with {what}: .*train.sharding: {what.lower()}"):
        distributed.ranks()


def test_a_bad_world_size_is_named(monkeypatch):
    monkeypatch.setattr(launch_ranks, "_RANKS", None)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(FedtuneError, match="WORLD_SIZE='two' is not an integer"):
        distributed.ranks()


def test_each_rank_takes_every_world_size_th_example_and_the_loss_weight_undoes_ddp_mean():
    r0 = DataParallel(Ranks(0, 3, 0, torch.device("cpu")))
    r2 = DataParallel(Ranks(2, 3, 2, torch.device("cpu")))
    assert r0.shard([7, 1, 4, 9, 2]) == ([7, 9], 3.0)
    assert r2.shard([7, 1, 4, 9, 2]) == ([4], 3.0)
    # Fewer examples than ranks: rank 2 runs the first example with weight 0 (DDP needs it).
    assert r0.shard([5, 6]) == ([5], 3.0)
    assert r2.shard([5, 6]) == ([5], 0.0)
    assert OneProcess().shard([5, 6]) == ([5, 6], 1.0)


def test_dropout_masks_differ_between_ranks_but_rank_0_keeps_one_process_s():
    r0 = DataParallel(Ranks(0, 2, 0, torch.device("cpu")))
    r1 = DataParallel(Ranks(1, 2, 1, torch.device("cpu")))
    assert r0.dropout_seed(11) == OneProcess().dropout_seed(11) == 11
    assert r1.dropout_seed(11) != 11


def test_commands_that_do_not_train_on_several_devices_refuse_a_launcher(monkeypatch, capsys):
    from fedtune.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["recipes"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "`fedtune recipes` runs as one process; start it without torchrun / accelerate launch" in err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["recipes"]) == 0


def test_fsdp_refuses_what_reads_whole_parameters_naming_the_keys(two_ranks, tiny_recipe):
    fsdp = {"local_steps": 1, "sharding": "fsdp"}
    check_launch(_recipe(tiny_recipe, train=fsdp))  # LoRA FedAvg runs sharded
    with pytest.raises(RecipeError, match="train.sharding: fsdp with federation.algorithm scaffold"):
        check_launch(_recipe(tiny_recipe, train=fsdp,
                             federation={"clients": 3, "rounds": 1, "algorithm": "scaffold"}))
    with pytest.raises(RecipeError, match="train.sharding: fsdp with adapter.method prompt_tuning"):
        check_launch(_recipe(tiny_recipe, train=fsdp, adapter={"method": "prompt_tuning"}))
    with pytest.raises(RecipeError, match="train.sharding: fsdp with federation.parallel_clients"):
        check_launch(_recipe(tiny_recipe, train=fsdp,
                             federation={"clients": 3, "rounds": 1, "parallel_clients": 2}))


def test_fsdp_in_one_process_runs_whole_and_says_so(monkeypatch, tiny_recipe, caplog):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch_ranks, "_RANKS", None)
    with caplog.at_level(logging.WARNING, logger="fedtune.distributed"):
        check_launch(_recipe(tiny_recipe, train={"local_steps": 1, "sharding": "fsdp"}))
    assert "nothing to shard over" in caplog.text
    assert isinstance(distributed.data_parallel("fsdp"), OneProcess)


def test_deepspeed_refuses_what_zero_cannot_run_naming_the_keys(two_ranks, tiny_recipe):
    pytest.importorskip("deepspeed")
    ds = {"local_steps": 1, "sharding": "deepspeed"}
    check_launch(_recipe(tiny_recipe, train=ds))  # LoRA FedAvg runs under ZeRO-3 (the default)
    check_launch(_recipe(tiny_recipe, train={**ds, "zero_stage": 2}))
    refused = [
        ({"federation": {"clients": 3, "rounds": 1, "algorithm": "fedprox"}},
         "train.sharding: deepspeed with federation.algorithm fedprox: its client hooks read whole "
         "parameters or gradients .* DeepSpeed ZeRO runs fedavg, fedavgm"),
        ({"adapter": {"method": "prompt_tuning"}},
         "train.sharding: deepspeed with adapter.method prompt_tuning: DeepSpeed ZeRO runs LoRA"),
        ({"federation": {"clients": 3, "rounds": 1, "parallel_clients": 2}},
         "train.sharding: deepspeed with federation.parallel_clients > 1"),
        ({"adapter": {"method": "lora", "rank_per_client": [2, 4, 4]},
          "federation": {"clients": 3, "rounds": 1, "algorithm": "hetlora"}},
         "train.sharding: deepspeed with (federation.algorithm hetlora|adapter.rank_per_client)"),
    ]
    for overrides, message in refused:
        with pytest.raises(RecipeError, match=message):
            check_launch(_recipe(tiny_recipe, train=ds, **overrides))
    with pytest.raises(RecipeError, match="train.sharding: deepspeed with train.precision: fp16: "
                                          "not available .* use bf16"):
        check_launch(_recipe(tiny_recipe, train={**ds, "precision": "fp16"}))


def test_zero_options_are_checked_by_deepspeed_before_any_work(tiny_recipe):
    pytest.importorskip("deepspeed")
    ds = {"local_steps": 1, "sharding": "deepspeed"}
    check_launch(_recipe(tiny_recipe, train={**ds, "zero_options": {
        "stage3_max_live_parameters": 10**7, "overlap_comm": False}}))
    with pytest.raises(RecipeError, match="train.zero_options: stage3_max_live_parmeters: Extra"):
        check_launch(_recipe(tiny_recipe, train={**ds, "zero_options": {
            "stage3_max_live_parmeters": 10**7}}))
    with pytest.raises(RecipeError, match="train.zero_options: stage3_max_live_parameters: .*greater"):
        check_launch(_recipe(tiny_recipe, train={**ds, "zero_options": {
            "stage3_max_live_parameters": -1}}))
    with pytest.raises(RecipeError, match="zero_options: set the stage with zero_stage"):
        _recipe(tiny_recipe, train={**ds, "zero_options": {"stage": 2}})
    with pytest.raises(RecipeError, match="zero_options applies to sharding: deepspeed only"):
        _recipe(tiny_recipe, train={"local_steps": 1, "zero_options": {"overlap_comm": False}})


def test_deepspeed_without_the_package_says_how_to_install_it(monkeypatch, tiny_recipe):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(RecipeError, match=r"train.sharding: deepspeed needs the deepspeed package: "
                                          r"pip install 'fedtune\[deepspeed\]'"):
        check_launch(_recipe(tiny_recipe, train={"local_steps": 1, "sharding": "deepspeed"}))


def test_zero_stage_belongs_to_deepspeed(tiny_recipe):
    assert _recipe(tiny_recipe, train={"local_steps": 1, "sharding": "deepspeed"}).train.zero_stage == 3
    with pytest.raises(RecipeError, match="zero_stage applies to sharding: deepspeed only"):
        _recipe(tiny_recipe, train={"local_steps": 1, "sharding": "fsdp", "zero_stage": 2})
    with pytest.raises(RecipeError, match="zero_stage"):
        _recipe(tiny_recipe, train={"local_steps": 1, "sharding": "deepspeed", "zero_stage": 1})


def test_deepspeed_in_one_process_runs_whole_and_says_so(monkeypatch, tiny_recipe, caplog):
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch_ranks, "_RANKS", None)
    with caplog.at_level(logging.WARNING, logger="fedtune.distributed"):
        check_launch(_recipe(tiny_recipe, train={"local_steps": 1, "sharding": "deepspeed"}))
    assert "train.sharding: deepspeed in one process: nothing to shard over" in caplog.text
    assert isinstance(distributed.data_parallel("deepspeed", torch.nn.Linear(2, 2)), OneProcess)


def test_deepspeed_needs_the_engine_built_at_set_up(two_ranks):
    with pytest.raises(FedtuneError, match="no DeepSpeed engine was built over the model"):
        distributed.data_parallel("deepspeed", torch.nn.Linear(2, 2))


def test_an_unknown_sharding_is_refused_by_the_schema(tiny_recipe):
    with pytest.raises(RecipeError, match="sharding"):
        _recipe(tiny_recipe, train={"local_steps": 1, "sharding": "zero3"})


def test_fsdp_splits_each_micro_batch_as_ddp_does(two_ranks):
    from fedtune.train.sharded import FullySharded

    fsdp = distributed.data_parallel("fsdp")
    assert isinstance(fsdp, FullySharded)
    assert isinstance(distributed.data_parallel("none"), DataParallel)
    assert fsdp.shard([7, 1, 4, 9, 2]) == ([7, 4, 2], 2.0)
    assert fsdp.shard([5]) == ([5], 2.0)   # rank 0 of 2 takes the only example
    with pytest.raises(FedtuneError, match="train.sharding: fsdp: the model was not sharded"):
        fsdp.wrap(torch.nn.Linear(2, 2))

"""What a multi-process launch refuses, and how a micro-batch is split over the ranks (no process
group needed: the launch's place is set by hand)."""

from __future__ import annotations

import logging

import pytest
import torch

from fedtune.config import load_recipe
from fedtune.errors import FedtuneError, RecipeError
from fedtune.train import distributed
from fedtune.train.distributed import DataParallel, OneProcess, Ranks


@pytest.fixture
def two_ranks(monkeypatch):
    """This process as rank 0 of 2 (for the checks only; nothing is communicated)."""
    monkeypatch.setattr(distributed, "_RANKS", Ranks(0, 2, 0, torch.device("cpu")))


def _recipe(tiny_recipe, **overrides):
    return load_recipe(tiny_recipe(**overrides))


def test_one_process_changes_nothing(monkeypatch, tiny_recipe):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "_RANKS", None)
    assert distributed.ranks() is None
    assert isinstance(distributed.data_parallel(), OneProcess)
    distributed.check_launch(_recipe(tiny_recipe, train={"local_steps": 1, "dp_sgd": {"noise_multiplier": 1.0}}))


def test_dp_sgd_and_offsite_are_refused_at_load_time(two_ranks, tiny_recipe):
    with pytest.raises(RecipeError, match="train.dp_sgd under a multi-process launch"):
        distributed.check_launch(_recipe(tiny_recipe, train={"local_steps": 1,
                                                             "dp_sgd": {"noise_multiplier": 1.0}}))
    with pytest.raises(RecipeError, match="offsite under a multi-process launch"):
        distributed.check_launch(_recipe(tiny_recipe, adapter={"method": "full"},
                                         federation={"clients": 3, "rounds": 1, "algorithm": "offsite"}))
    distributed.check_launch(_recipe(tiny_recipe))  # plain LoRA FedAvg runs


def test_zeroth_order_runs_unsplit_and_says_so_once(two_ranks, tiny_recipe, caplog):
    recipe = _recipe(tiny_recipe, federation={"clients": 3, "rounds": 1, "algorithm": "fedmezo"})
    with caplog.at_level(logging.WARNING, logger="fedtune.distributed"):
        distributed.check_launch(recipe)
    assert [r.getMessage() for r in caplog.records] == [
        "fedmezo estimates gradients from forward passes only: every one of the 2 ranks runs the "
        "same steps (correct, no speed-up)"]


@pytest.mark.parametrize("flag, what", [("ACCELERATE_USE_FSDP", "FSDP"),
                                        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_accelerate_fsdp_and_deepspeed_launches_are_refused(monkeypatch, flag, what):
    monkeypatch.setattr(distributed, "_RANKS", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(flag, "true")
    with pytest.raises(FedtuneError, match=f"accelerate launch with {what}: .* DDP only"):
        distributed.ranks()


def test_a_bad_world_size_is_named(monkeypatch):
    monkeypatch.setattr(distributed, "_RANKS", None)
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

"""Algorithms through whole simulated runs: neutral settings reduce to FedAvg, resume stays exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fedtune
from conftest import final_global as _final
from conftest import stop_and_resume


def _fast(tiny_recipe, **kw):
    return tiny_recipe(eval__at_start=False, eval__every=0, eval__clients=False,
                       eval__exact_match=False, **kw)


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _differs(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a) > 1e-6


def test_fedprox_with_mu_zero_is_fedavg_and_with_mu_is_not(tiny_recipe):
    fedavg = _final(fedtune.run(_fast(tiny_recipe, output__name="avg")))
    prox0 = _final(fedtune.run(_fast(tiny_recipe, output__name="p0", federation__algorithm="fedprox",
                                     federation__options={"mu": 0.0})))
    prox = _final(fedtune.run(_fast(tiny_recipe, output__name="p1", federation__algorithm="fedprox",
                                    federation__options={"mu": 10.0})))
    _assert_same(prox0, fedavg)
    assert _differs(prox, fedavg)


def test_scaffold_first_round_is_fedavg_later_rounds_are_corrected(tiny_recipe):
    kw = {"train__optimizer": "sgd", "train__lr": 0.5}
    avg1 = _final(fedtune.run(_fast(tiny_recipe, output__name="a1", federation__rounds=1, **kw)))
    sc1 = _final(fedtune.run(_fast(tiny_recipe, output__name="s1", federation__rounds=1,
                                   federation__algorithm="scaffold", **kw)))
    _assert_same(sc1, avg1, atol=1e-6)  # control variates start at zero
    avg3 = _final(fedtune.run(_fast(tiny_recipe, output__name="a3", federation__rounds=3, **kw)))
    sc3 = _final(fedtune.run(_fast(tiny_recipe, output__name="s3", federation__rounds=3,
                                   federation__algorithm="scaffold", **kw)))
    assert _differs(sc3, avg3)


@pytest.mark.parametrize("algorithm,options", [
    ("scaffold", {}), ("fedadam", {}), ("dp_fedavg", {"noise_seed": 7, "noise_multiplier": 0.5}),
])
def test_resume_restores_strategy_and_client_state_exactly(tiny_recipe, monkeypatch, algorithm, options):
    kw = dict(federation__algorithm=algorithm, federation__options=options, federation__rounds=3,
              train__optimizer="sgd", train__lr=0.5)
    whole = _final(fedtune.run(_fast(tiny_recipe, output__name="whole", **kw)))
    resumed = _final(stop_and_resume(monkeypatch, _fast(tiny_recipe, output__name="cut", **kw), at_round=3))
    _assert_same(resumed, whole)


@pytest.mark.parametrize("method", ["bitfit", "full", "lora"])
def test_bitfit_full_and_lora_on_gpt2_through_a_round(tiny_recipe, tiny_gpt2_dir, method):
    from transformers import AutoModelForCausalLM

    summary = fedtune.run(tiny_recipe(model__name=tiny_gpt2_dir, adapter={"method": method},
                                      federation__rounds=1, eval__clients=False))
    assert summary["final"]["loss"] < summary["initial"]["loss"]
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    n_bias = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".bias"))
    n_all = sum(p.numel() for p in base.parameters())
    if method == "bitfit":
        assert summary["adapter_parameters"] == n_bias
    elif method == "full":
        assert summary["adapter_parameters"] == n_all
    else:  # LoRA r=8 on every linear layer (the default): c_attn 16->48, attn c_proj 16->16,
        # mlp c_fc 16->64 and c_proj 64->16, in each of 2 layers
        assert summary["adapter_parameters"] == 2 * 8 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    if method == "full":  # a whole model directory, loadable as is
        final = AutoModelForCausalLM.from_pretrained(summary["final_adapter"])
        assert sum(p.numel() for p in final.parameters()) == n_all
    if method == "bitfit":  # the biases only (tests/integration/test_adapter_methods.py)
        assert (Path(summary["final_adapter"]) / "bitfit.safetensors").is_file()


def test_bitfit_on_a_model_without_biases_is_a_clear_error(tiny_recipe):
    from fedtune.errors import ModelError

    with pytest.raises(ModelError, match="has none"):
        fedtune.run(tiny_recipe(adapter={"method": "bitfit"}))


def test_qlora_without_a_gpu_is_a_clear_error(tiny_recipe):
    from fedtune.errors import ModelError

    with pytest.raises(ModelError, match="CUDA GPU|bitsandbytes"):
        fedtune.run(tiny_recipe(adapter={"method": "qlora"}))


def _bytes(summary):
    return summary["bytes_up"], summary["bytes_down"]


def test_compressed_updates_travel_smaller_and_still_train(tiny_recipe):
    # Rank 64, so that tensor payloads (not safetensors headers) dominate the messages.
    adapter = {"method": "lora", "r": 64, "alpha": 64}
    plain = fedtune.run(_fast(tiny_recipe, output__name="plain", adapter=adapter))
    up_plain, down_plain = _bytes(plain)
    results = {}
    for method, extra in [("fp16", {}), ("int8", {}), ("topk", {"topk_ratio": 0.05})]:
        results[method] = fedtune.run(_fast(
            tiny_recipe, output__name=method, adapter=adapter,
            federation__compression={"up": {"method": method, **extra},
                                     "down": {"method": "bf16" if method == "fp16" else "none"}}))
    assert results["fp16"]["bytes_up"] < 0.6 * up_plain
    assert results["fp16"]["bytes_down"] < 0.6 * down_plain
    assert results["int8"]["bytes_up"] < 0.35 * up_plain
    assert results["topk"]["bytes_up"] < 0.2 * up_plain
    assert results["int8"]["bytes_down"] == down_plain
    for method, summary in results.items():
        assert abs(summary["final"]["loss"] - plain["final"]["loss"]) < 0.5, method


def test_topk_error_feedback_memory_lives_in_the_client_state(tiny_recipe):
    from fedtune.config import load_recipe
    from fedtune.runtime.simulation import Simulation

    recipe = load_recipe(_fast(tiny_recipe, federation__compression={"up": {"method": "topk"}}))
    sim = Simulation(recipe)
    from fedtune.track.rundir import RunDir

    sim.run(RunDir.create(recipe.output.dir, "ef"))
    state = sim.clients["client_0"].state
    assert state and all(k.startswith("ef/") for k in state)
    assert any(v.abs().sum() > 0 for v in state.values())


def test_topk_downlink_is_refused_at_load_time():
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    with pytest.raises(RecipeError, match="federation.compression.down"):
        load_recipe(None, ["federation.compression.down.method=topk"])


def test_every_registered_algorithm_runs_two_rounds(tiny_recipe):
    from fedtune.algorithms import available_algorithms

    options = {"norm_bounding": {"max_norm": 1.0}, "krum": {"byzantine": 0},
               "dp_fedavg": {"noise_seed": 1}}
    for name in available_algorithms():
        if name in ("offsite", "fedsp"):  # own model and adapter: test_offsite_run.py, test_fedsp_run.py
            continue
        recipe = _fast(tiny_recipe, output__name=name, federation__algorithm=name,
                       federation__options=options.get(name, {}))
        recipe["eval"]["at_start"] = True
        summary = fedtune.run(recipe)
        assert summary["rounds"] == 2 and summary["algorithm"] == name
        initial, final = summary["initial"]["loss"], summary["final"]["loss"]
        assert math.isfinite(initial) and math.isfinite(final), name
        if name == "fedsa_lora":  # its global model is the shared A with B at its initial zero,
            assert final == initial  # i.e. the base model: only the personal models change
        else:
            assert final != initial, f"{name}: two rounds left the global model unchanged"
        assert abs(final - initial) < 1.0, f"{name}: the loss jumped from {initial} to {final}"
        assert summary["missing_updates"] == 0, name
        run_dir = Path(summary["final_adapter"]).parent
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = [e["values"] for e in events if e["kind"] == "round"]
        assert [r["updates"] for r in rounds] == [3, 3], name
        assert all(math.isfinite(r["train_loss"]) and r["bytes_up"] > 0 for r in rounds), name


def test_fedmezo_trains_without_backward_and_personalises_rates(tiny_recipe):
    import json

    summary = fedtune.run(_fast(tiny_recipe, output__name="mezo", federation__algorithm="fedmezo",
                                federation__rounds=3, train__lr=1e-3, train__local_steps=5,
                                federation__options={"alpha": 5e-4, "eps": 1e-3}))
    run_dir = Path(summary["final_adapter"]).parent
    fits = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fits = [e for e in fits if e["kind"] == "fit"]
    lrs = {e["values"]["lr"] for e in fits if e["round"] == 3}
    assert len(lrs) == 3  # each client its own rate from round 2 on
    assert {e["values"]["lr"] for e in fits if e["round"] == 1} == {1e-3}
    assert summary["final"]["loss"] == summary["final"]["loss"]


def _attacked(tiny_recipe, name, algorithm, attack, options=None):
    # LoRA on q/v, as these checks were calibrated: on the tiny random model (loss near ln(vocab))
    # all-linear LoRA barely moves under the attack, and norm_bounding's absolute max_norm then
    # clips the honest updates of its 4.8x larger adapter as well.
    return _fast(tiny_recipe, output__name=name, federation__algorithm=algorithm,
                 federation__options=options or {}, federation__attack=attack,
                 federation__rounds=3, data__split={"method": "iid"},
                 adapter__target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_updates_are_always_rejected(tiny_recipe, kind):
    summary = fedtune.run(_attacked(tiny_recipe, kind, "fedavg", {"clients": ["client_1"], "kind": kind}))
    assert summary["missing_updates"] == 3  # client_1 in each of 3 rounds
    assert math.isfinite(summary["final"]["loss"])
    clean = fedtune.run(_attacked(tiny_recipe, "clean", "fedavg", {}))
    assert summary["final"]["loss"] == pytest.approx(clean["final"]["loss"], abs=0.5)


def test_krum_with_too_few_valid_updates_leaves_the_round_unchanged(tiny_recipe):
    # Krum with byzantine=0 needs 3 updates; a NaN client is rejected, so only 2 remain each round.
    recipe = _attacked(tiny_recipe, "krum-nan", "krum", {"clients": ["client_1"], "kind": "nan"},
                       {"byzantine": 0})
    recipe["eval"]["at_start"] = True
    summary = fedtune.run(recipe)
    assert summary["rounds"] == 3 and summary["missing_updates"] == 3
    assert summary["final"]["loss"] == summary["initial"]["loss"]  # the adapter never moved


def test_robust_rules_resist_a_sign_flipping_client(tiny_recipe):
    # The tiny random model's loss stays near ln(vocab); the attack still shows in its ordering.
    attack = {"clients": ["client_2"], "kind": "sign_flip", "factor": 100.0}
    clean = fedtune.run(_attacked(tiny_recipe, "clean", "fedavg", {}))["final"]["loss"]
    fedavg = fedtune.run(_attacked(tiny_recipe, "avg", "fedavg", attack))["final"]["loss"]
    median = fedtune.run(_attacked(tiny_recipe, "med", "median", attack))["final"]["loss"]
    bounded = fedtune.run(_attacked(tiny_recipe, "nb", "norm_bounding", attack,
                                    {"max_norm": 0.05}))["final"]["loss"]
    assert fedavg > clean + 0.05
    assert median < clean + 0.01 < fedavg
    assert bounded < fedavg


def test_backdoor_poisons_only_the_attackers_data(tiny_recipe):
    from fedtune.config import load_recipe
    from fedtune.runtime.setup import Setup

    recipe = load_recipe(_attacked(tiny_recipe, "bd", "fedavg", {
        "clients": ["client_0"], "kind": "backdoor", "trigger": " zz", "target": "OK",
        "poison_fraction": 0.5}))
    setup = Setup(recipe)
    tok = setup.tokenizer
    poisoned = setup.clients.client("client_0").data.train
    honest = setup.clients.client("client_1").data.train
    target = tok.encode("OK", add_special_tokens=False) + [tok.eos_token_id]
    n_poisoned = sum(1 for ex in poisoned if [t for t in ex.labels if t != -100] == target)
    assert n_poisoned == round(0.5 * len(poisoned))
    assert not any([t for t in ex.labels if t != -100] == target for ex in honest)


def test_a_boosted_backdoor_scales_the_poisoned_update(tiny_recipe):
    from fedtune.config import load_recipe
    from fedtune.runtime.setup import Setup
    from fedtune.transport.codec import decode, encode
    from fedtune.wire import Message, MessageKind

    updates = []
    for boost in (1.0, 3.0):
        setup = Setup(load_recipe(_attacked(tiny_recipe, f"boost{boost}", "fedavg", {
            "clients": ["client_0"], "kind": "backdoor", "boost": boost})))
        fit = Message(MessageKind.FIT, 1, "server", "client_0", tensors=setup.view.initial(),
                      meta={"lr": 0.01})
        reply = decode(setup.clients.client("client_0").handle_bytes(encode(fit)))
        assert reply.kind == MessageKind.UPDATE
        updates.append(reply.tensors)
    assert updates[0] and all(torch.equal(updates[1][k], updates[0][k] * 3.0) for k in updates[0])


def test_attack_on_an_unknown_client_fails_at_load_time():
    from fedtune.config import load_recipe
    from fedtune.errors import RecipeError

    with pytest.raises(RecipeError, match="client_9"):
        load_recipe(None, ["federation.attack={clients: [client_9], kind: scale}"])


def test_dp_fedavg_reports_the_privacy_spent(tiny_recipe):
    import json

    from fedtune.algorithms.dp_fedavg import dp_epsilon

    summary = fedtune.run(_fast(tiny_recipe, output__name="dp", federation__algorithm="dp_fedavg",
                                federation__options={"noise_multiplier": 1.1, "delta": 1e-5,
                                                     "noise_seed": 3}))
    assert summary["strategy"]["epsilon"] == pytest.approx(dp_epsilon(1.1, [1.0, 1.0], 1e-5))
    events = (Path(summary["final_adapter"]).parent / "metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(e) for e in events if json.loads(e)["kind"] == "round"]
    assert rounds[0]["values"]["epsilon"] < rounds[1]["values"]["epsilon"]

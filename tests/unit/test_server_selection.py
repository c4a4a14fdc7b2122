"""The server's whole run around the rounds: early stopping and the best adapter (output.keep_best),
the clients' evaluation replies and validation loss pooled per token, what a checkpoint carries and
a restore gives back, and what the run's result reports. Expected values are worked out by hand on the tiny federation
(tiny_federation.py): FedAvg of one SGD step per client at rate 1."""

from __future__ import annotations

import dataclasses
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from test_server_rules import ONE_ZERO, THREE_ONES, Tampering, build, toks
from tiny_federation import LogitModel, federation, recipe, sigmoid

from fedtune.config import EvalSection
from fedtune.eval.evaluator import Evaluator
from fedtune.runtime.client import ClientDataset
from fedtune.track.rundir import Checkpoint
from fedtune.transport.codec import decode
from fedtune.transport.mailbox import Counts


def fedavg_rounds(rounds: int) -> list[float]:
    """w after `rounds` rounds: client_0 (3 × (0, 1)) moves w[0] by 1 − σ(w0), client_1 (1 × (1, 0))
    moves w[1] by −σ(w1); FedAvg weights them 3 : 1."""
    w0 = w1 = 0.0
    for _ in range(rounds):
        w0, w1 = w0 + 3 * (1 - sigmoid(w0)) / 4, w1 - sigmoid(w1) / 4
    return [w0, w1]


class Recorder:
    """A reporter that keeps the status lines (what a user reads on the console)."""

    def __init__(self):
        self.lines: list[str] = []

    def round_begin(self, round_, rounds, n_clients):
        pass

    def round_end(self, round_, summary):
        pass

    def eval_result(self, round_, metrics):
        pass

    def status(self, text):
        self.lines.append(text)

    def client_done(self, client):
        pass

    def close(self):
        pass


class Counting(Tampering):
    """A transport with counters a checkpoint must keep (as the gRPC transport's mailbox has)."""

    def __init__(self, inner, edit=lambda r, replies: replies):
        super().__init__(inner, edit)
        self.counts = Counts()
        self.collected: list[tuple[int, list[str]]] = []

    def collect(self, round, expected, timeout=None):
        self.collected.append((round, list(expected)))
        return super().collect(round, expected, timeout)

    def counter_state(self):
        return self.counts.state()

    def load_counter_state(self, state):
        self.counts.load_state(state)


def scripted_run(tmp_path, losses: dict[int, float], *, rounds=5, patience=2, run_dir=None):
    """A FedAvg run whose global evaluation reports `losses[round]` as its loss, watched by
    early stopping and keep_best; returns the federation, the rounds evaluated, the messages each
    client received and the reporter."""
    r = recipe("fedavg", 2, tmp=tmp_path, federation={"rounds": rounds},
               eval={"at_start": True, "every": 1, "clients": True,
                     "early_stopping": {"patience": patience, "metric": "loss"}},
               output={"keep_best": "loss", "checkpoint_every": 0})
    evaluated: list[int] = []

    def evaluate_global(state, generate, round_):
        evaluated.append(round_)
        return {"loss": losses[round_]}

    fed = federation(r, LogitModel([0.0, 0.0]), {"client_0": toks(THREE_ONES), "client_1": toks(ONE_ZERO)},
                     tmp=tmp_path, evaluate_global=evaluate_global, run_dir=run_dir)
    seen: dict[str, list[tuple]] = {name: [] for name in fed.clients}
    for name, client in fed.clients.items():
        def endpoint(data, name=name, client=client):
            msg = decode(data)
            seen[name].append((msg.kind.value, msg.round, msg.meta.get("generate")))
            return client.handle_bytes(data)
        fed.transport.endpoints[name] = endpoint
    fed.server.transport = Counting(fed.transport)
    fed.server.reporter = Recorder()
    return fed, evaluated, seen


# -- early stopping and the best adapter ----------------------------------------------------------------


def test_early_stopping_ends_the_run_and_keeps_the_best_adapter(tmp_path):
    # loss by round: best at round 1; rounds 2 and 3 do not improve on it -> stop after round 3
    fed, evaluated, seen = scripted_run(tmp_path, {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.6, 4: 0.1, 5: 0.1})
    result = fed.server.run()
    assert result.rounds == 3 and evaluated == [0, 1, 2, 3]
    assert fed.server.global_state["w"].tolist() == pytest.approx(fedavg_rounds(3))
    assert result.final == {"loss": 0.6} and result.initial == {"loss": 0.9}
    sel = result.selection
    assert (sel.best_round, sel.best_value, sel.stopped_at, sel.stale) == (1, 0.5, 3, 2)
    assert sel.best_state["w"].tolist() == pytest.approx(fedavg_rounds(1))
    assert "round 3: early stopping (loss has not improved for 2 evaluations)" in fed.server.reporter.lines
    # Clients generate answers only in the evaluation that may be the last (stale + 1 = patience).
    evals = [(r, g) for k, r, g in seen["client_0"] if k == "evaluate"]
    assert evals == [(0, False), (1, False), (2, False), (3, True)]
    assert seen["client_1"][-1] == ("finish", 3, None)
    assert fed.server.transport.collected[-1] == (3, [])  # the finish, in the last round run
    # The stop writes a checkpoint (checkpoint_every is 0) holding the best adapter.
    ckpt = fed.run_dir.latest_checkpoint()
    assert ckpt.round == 3 and ckpt.best_state["w"].tolist() == pytest.approx(fedavg_rounds(1))
    assert ckpt.info["selection"]["stopped_at"] == 3 and ckpt.info["last_eval"] == {"loss": 0.6}


def test_the_evaluation_before_training_can_be_the_best(tmp_path):
    fed, evaluated, _ = scripted_run(tmp_path, {0: 0.4, 1: 0.5, 2: 0.6, 3: 0.1})
    result = fed.server.run()
    assert result.rounds == 2 and evaluated == [0, 1, 2]
    assert result.selection.best_round == 0 and result.selection.best_value == 0.4
    assert result.selection.best_state["w"].tolist() == [0.0, 0.0]  # the adapter before round 1
    assert fed.server.global_state["w"].tolist() == pytest.approx(fedavg_rounds(2))


def test_a_run_resumed_after_early_stopping_trains_no_further(tmp_path):
    losses = {0: 0.9, 1: 0.5, 2: 0.7, 3: 0.6, 4: 0.1, 5: 0.1}
    first, _, _ = scripted_run(tmp_path / "a", losses)
    first.server.run()
    again, evaluated, seen = scripted_run(tmp_path / "b", losses, run_dir=first.run_dir)
    start = again.server.restore(first.run_dir.latest_checkpoint())
    assert start == 4
    s = again.server
    assert s.last_eval == {"loss": 0.6} and s.initial == {"loss": 0.9}
    assert s.selection.state() == first.server.selection.state()
    assert s.selection.best_state["w"].tolist() == pytest.approx(fedavg_rounds(1))
    result = s.run(start)
    assert result.rounds == 3 and evaluated == []
    assert [k for k, _, _ in seen["client_0"]] == ["finish"]
    assert result.final == {"loss": 0.6}
    assert s.global_state["w"].tolist() == pytest.approx(fedavg_rounds(3))


# -- the clients' validation loss ---------------------------------------------------------------------


def _with_validation(fed, val: dict[str, list[tuple[int, int]]]):
    """Give each client a validation part and a real evaluator (loss only: no test part)."""
    tokenizer = SimpleNamespace(pad_token_id=0)
    evaluator = Evaluator(fed.model, tokenizer, EvalSection(batch_size=8), template="compact",
                          max_length=8, device=torch.device("cpu"))
    for name, pairs in val.items():
        client = fed.clients[name]
        client.data = ClientDataset(train=client.data.train, test=[], test_raw=[], val=toks(pairs))
        client.evaluator = evaluator


def test_validation_loss_is_pooled_per_token_over_the_clients(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], eval={"clients": True})
    _with_validation(fed, {"client_0": [(0, 1), (0, 0)], "client_1": [(1, 1)]})
    fed.round(1)
    metrics = fed.server.evaluate(1, final=False)
    w0, w1 = fedavg_rounds(1)
    l0 = math.log1p(math.exp(w0)) - 0.5 * w0   # two tokens, answers 1 and 0
    l1 = math.log1p(math.exp(w1)) - w1         # one token, answer 1
    assert metrics["val_loss"] == pytest.approx((2 * l0 + l1) / 3, rel=1e-5)
    assert (metrics["val_clients"], metrics["val_tokens"]) == (2, 3)
    (event,) = fed.events("validation")
    assert event["round"] == 1 and event["values"]["val_tokens"] == 3
    assert fed.server.client_eval["client_1"]["val_loss"] == pytest.approx(l1, rel=1e-5)


@pytest.mark.parametrize("bad", [{"val_loss": -1.0, "val_tokens": 4}, {"val_loss": 0.5, "val_tokens": 0},
                                 {"val_loss": 0.5, "val_tokens": 2.5}, {"val_tokens": 3}])
def test_a_bad_validation_figure_is_rejected_and_left_out_of_the_pool(tmp_path, bad, caplog):
    def edit(round_, replies):
        figures = {"client_0": {"val_loss": 2.0, "val_tokens": 3}, "client_1": bad}
        return [dataclasses.replace(m, meta={**m.meta, "metrics": figures[m.sender]}) for m in replies]

    caplog.set_level(logging.WARNING, logger="fedtune.server")
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, eval={"clients": True})
    metrics = fed.server.evaluate(4, final=False)
    assert metrics == {"val_loss": 2.0, "val_clients": 1, "val_tokens": 3}
    assert fed.server.rejected == 1
    (event,) = fed.events("rejected")
    assert (event["round"], event["client"]) == (4, "client_1")
    assert event["values"]["reason"] == ("val_loss must be a finite number >= 0 and val_tokens a "
                                         "positive integer")
    assert "round 4: rejected the validation figures of client_1: val_loss must be" in caplog.text


def test_a_second_or_foreign_evaluation_reply_is_rejected_and_the_first_kept(tmp_path, caplog):
    def edit(round_, replies):
        first = next(m for m in replies if m.sender == "client_0")
        again = dataclasses.replace(first, meta={**first.meta, "metrics": {"loss": 9.0}})
        foreign = dataclasses.replace(first, sender="client_9", meta={**first.meta, "metrics": {"loss": 7.0}})
        return [dataclasses.replace(m, meta={**m.meta, "metrics": {"loss": 0.5}}) for m in replies] + [
            again, foreign]

    caplog.set_level(logging.WARNING, logger="fedtune.server")
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, eval={"clients": True})
    fed.server.evaluate(2, final=False)
    assert fed.server.client_eval == {"client_0": {"loss": 0.5}, "client_1": {"loss": 0.5}}
    assert fed.server.rejected == 2
    events = fed.events("rejected")
    assert [e["client"] for e in events] == ["client_0", "client_9"]
    assert {e["values"]["reason"] for e in events} == {"not asked for an evaluation, or answered twice"}
    assert "round 2: rejected the evaluation of client_9: not asked for an evaluation" in caplog.text


@pytest.mark.parametrize("meta,reason", [
    ({"n_examples": -1, "metrics": {"loss": 1.0}}, "meta.n_examples must be in [0, 1000], got -1"),
    ({"n_examples": 1001, "metrics": {"loss": 1.0}}, "meta.n_examples must be in [0, 1000], got 1001"),
    ({"n_examples": "2", "metrics": {"loss": 1.0}}, "meta.n_examples must be an integer, got str"),
    ({"metrics": {"loss": 1.0}}, None),          # the count is optional
    ({"n_examples": 1000}, None),                 # so are the figures: nothing recorded
])
def test_an_evaluation_reply_is_checked_before_its_figures_count(tmp_path, meta, reason):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta=meta) if m.sender == "client_1" else m for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, eval={"clients": True},
                federation={"max_examples_per_client": 1000})
    fed.server.evaluate(1, final=False)
    rejected = [e["values"]["reason"] for e in fed.events("rejected")]
    assert rejected == ([reason] if reason else [])
    recorded = "metrics" in meta and reason is None
    assert fed.server.client_eval == ({"client_1": {"loss": 1.0}} if recorded else {})


def test_evaluation_seconds_add_up_over_the_run(tmp_path):
    import time

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    fed.server.evaluate_global = lambda state, generate, round_: time.sleep(0.02) or {"loss": 1.0}
    fed.server.timings.eval = 100.0  # from earlier sessions of a resumed run
    began = time.perf_counter()
    fed.server.evaluate(1, final=False)
    fed.server.evaluate(2, final=True)
    took = time.perf_counter() - began
    assert 0.04 <= fed.server.timings.eval - 100.0 <= took


# -- counting, the result, checkpoints and restore ---------------------------------------------------------


def test_an_error_reply_without_a_text_is_rejected_as_such(tmp_path):
    from fedtune.wire import MessageKind

    def edit(round_, replies):
        return [dataclasses.replace(m, kind=MessageKind.ERROR, meta={}) if m.sender == "client_1" else m
                for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    (event,) = fed.events("rejected")
    assert (event["client"], event["values"]["reason"]) == ("client_1", "client reported: ?")
    assert fed.server.global_state["w"].tolist() == pytest.approx([0.5, 0.0])


def test_every_rejected_reply_is_counted(tmp_path):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta={**m.meta, "n_examples": 0}) for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    fed.round(2)
    assert fed.server.rejected == 4 and fed.server.missing == 4
    assert fed.server.global_state["w"].tolist() == [0.0, 0.0]


def test_the_result_reports_the_strategy_figures_and_local_privacy(tmp_path):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta={**m.meta, "metrics": {
            **m.meta["metrics"], "dp_epsilon": 2.0 * round_, "dp_delta": 1e-6}})
            if m.sender == "client_0" else m for m in replies]

    r = recipe("dp_fedavg", 2, tmp=tmp_path, federation={"rounds": 2},
               options={"clip_norm": 0.3, "noise_multiplier": 0.0})
    fed = federation(r, LogitModel([0.0, 0.0]), {"client_0": toks(THREE_ONES), "client_1": toks(ONE_ZERO)},
                     tmp=tmp_path)
    fed.server.transport = Tampering(fed.transport, edit)
    result = fed.server.run()
    # round 1: Δ0 = (0.5, 0) clipped to (0.3, 0), Δ1 = (0, −0.5) clipped to (0, −0.3); both clipped
    assert result.strategy_metrics["clipped_fraction"] == 1.0
    assert result.strategy_metrics["epsilon"] is None and result.strategy_metrics["delta"] == 1e-5
    assert result.local_dp == {"client_0": {"epsilon": 4.0, "delta": 1e-6}}
    assert result.selection is fed.server.selection


def test_a_checkpoint_keeps_the_evaluations_and_the_transport_counters(tmp_path):
    fed = build(tmp_path / "a", [THREE_ONES, ONE_ZERO], eval={"clients": True})
    fed.server.transport = Counting(fed.transport)
    fed.server.transport.counts.late, fed.server.transport.counts.refused = 3, 7
    fed.round(1)
    fed.server.last_eval = {"loss": 0.25}
    fed.server.client_eval = {"client_0": {"loss": 0.5}}
    fed.server.checkpoint(1)
    again = build(tmp_path / "b", [THREE_ONES, ONE_ZERO], eval={"clients": True})
    again.server.transport = Counting(again.transport)
    assert again.server.restore(fed.run_dir.latest_checkpoint()) == 2
    s = again.server
    assert s.last_eval == {"loss": 0.25} and s.client_eval == {"client_0": {"loss": 0.5}}
    assert (s.transport.counts.late, s.transport.counts.refused) == (3, 7)
    assert s.global_state["w"].tolist() == pytest.approx(fedavg_rounds(1))


def test_restore_refuses_damaged_figures_and_keeps_the_models_tensor_order(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    fed.server.transport = Counting(fed.transport)
    # The model lists "z" before "a"; a checkpoint file lists tensors sorted by name.
    fed.server.global_state = {"z": torch.zeros(1), "a": torch.zeros(1)}
    info = {"traffic": {"rounds": {}}, "initial": "junk", "last_eval": [1], "client_eval": 3,
            "selection": "junk", "transport": {"late": 2}}
    ckpt = Checkpoint(2, {"a": torch.ones(1), "z": torch.full((1,), 2.0)}, {}, info)
    fed.server.restore(ckpt)
    s = fed.server
    assert list(s.global_state) == ["z", "a"] and s.global_state["z"].item() == 2.0
    assert s.initial is None and s.last_eval == {} and s.client_eval == {}
    assert s.selection.best_round is None and s.selection.stale == 0
    assert s.transport.counts.late == 2


# -- the updates: what is refused, with which words, and the weights used ----------------------------------


@pytest.mark.parametrize("change,reason", [
    ({"n_examples": 0}, "meta.n_examples must be in [1, 1000], got 0"),
    ({"n_examples": 1001}, "meta.n_examples must be in [1, 1000], got 1001"),
    ({"n_examples": None}, "meta.n_examples must be an integer, got NoneType"),
])
def test_a_bad_example_count_is_refused_in_words_naming_the_key(tmp_path, change, reason, caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.server")

    def edit(round_, replies):
        return [dataclasses.replace(m, meta={**m.meta, **change}) if m.sender == "client_1" else m
                for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, federation={"max_examples_per_client": 1000})
    fed.round(1)
    (event,) = fed.events("rejected")
    assert (event["client"], event["values"]["reason"]) == ("client_1", reason)
    assert f"round 1: rejected the reply of client_1: {reason}" in caplog.text


def test_a_second_update_is_refused_in_words(tmp_path):
    def edit(round_, replies):
        return replies + [m for m in replies if m.sender == "client_1"]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    (event,) = fed.events("rejected")
    assert event["values"]["reason"] == "not asked for an update this round, or answered twice"


def test_a_simulated_client_may_claim_no_more_than_its_partition(tmp_path):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta={**m.meta, "n_examples": 2}) if m.sender == "client_1" else m
                for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.server.example_counts = {"client_0": 3, "client_1": 1}
    fed.round(1)
    (event,) = fed.events("rejected")
    assert event["values"]["reason"] == "meta.n_examples must be in [1, 1], got 2"
    assert fed.server.global_state["w"].tolist() == pytest.approx([0.5, 0.0])


def test_an_update_without_figures_still_counts(tmp_path):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta={"n_examples": m.meta["n_examples"]}) for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    assert fed.server.rejected == 0
    assert fed.server.global_state["w"].tolist() == pytest.approx(fedavg_rounds(1))
    assert fed.events("round")[0]["values"]["train_loss"] is None


def test_uniform_weighting_logs_a_weight_of_one_beside_the_claimed_count(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], federation={"weighting": "uniform"})
    fed.round(1)
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    assert (fits["client_0"]["weight"], fits["client_0"]["n_examples"]) == (1, 3)
    assert (fits["client_1"]["weight"], fits["client_1"]["n_examples"]) == (1, 1)


def test_a_lone_update_of_one_example_gives_the_rounds_train_loss(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], endpoints={"client_0": lambda data: None})
    fed.round(1)
    # client_1's one example (1, 0) at w = 0: log(1 + e^0) − 0
    assert fed.events("round")[0]["values"]["train_loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_the_strategy_hears_each_rounds_number(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    strategy, calls = fed.server.strategy, []

    class Listening:
        def __getattr__(self, name):
            return getattr(strategy, name)

        def configure_fit(self, round_, clients, lr):
            calls.append(("configure_fit", round_, list(clients), lr))
            return strategy.configure_fit(round_, clients, lr)

        def fit_tensors(self, round_, global_state):
            calls.append(("fit_tensors", round_))
            return strategy.fit_tensors(round_, global_state)

        def fold(self, round_, global_state):  # FedAvg streams: its fold hears the round
            calls.append(("fold", round_))
            inner = strategy.fold(round_, global_state)

            class Heard:
                def add(self, update):
                    calls.append(("add", round_, update.client))
                    inner.add(update)

                def finish(self):
                    calls.append(("finish", round_))
                    return inner.finish()
            return Heard()

    fed.server.strategy = Listening()
    fed.round(1)
    fed.round(2)
    assert calls == [("configure_fit", 1, ["client_0", "client_1"], 1.0), ("fit_tensors", 1), ("fold", 1),
                     ("add", 1, "client_0"), ("add", 1, "client_1"), ("finish", 1),
                     ("configure_fit", 2, ["client_0", "client_1"], 1.0), ("fit_tensors", 2), ("fold", 2),
                     ("add", 2, "client_0"), ("add", 2, "client_1"), ("finish", 2)]


def test_a_strategy_that_does_not_stream_hears_the_round_in_aggregate_fit(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    strategy, heard = fed.server.strategy, []

    class Collecting:   # no `fold`: the server collects the round's updates and hands them over
        def __getattr__(self, name):
            if name == "fold":
                raise AttributeError(name)
            return getattr(strategy, name)

        def aggregate_fit(self, round_, global_state, updates):
            heard.append((round_, [u.client for u in updates]))
            return strategy.aggregate_fit(round_, global_state, updates)

    fed.server.strategy = Collecting()
    fed.round(1)
    fed.round(2)
    assert heard == [(1, ["client_0", "client_1"]), (2, ["client_0", "client_1"])]


def test_an_update_larger_than_the_adapter_is_refused_by_the_transport_before_decoding(tmp_path):
    from fedtune.transport.codec import encode

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    honest = fed.transport.endpoints["client_1"]

    def oversized(data):
        reply = decode(honest(data))
        return encode(dataclasses.replace(reply, tensors={"w": torch.zeros(1 << 21)}))

    fed.transport.endpoints["client_1"] = oversized
    fed.round(1)
    # The server told the transport what this round's updates may carry: the 8 MB reply is
    # refused unread, so the server never sees it (missing, not rejected by the server).
    assert [c for c, _ in fed.transport.rejected] == ["client_1"]
    assert fed.server.rejected == 0 and fed.server.missing == 1
    assert fed.server.global_state["w"].tolist() == pytest.approx([0.5, 0.0])


def test_a_secure_round_logs_its_learning_rate(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, ONE_ZERO], lr=0.5,
                federation={"secure_aggregation": {"enabled": True}})
    fed.round(1)
    assert fed.events("round")[0]["values"]["lr"] == 0.5

"""The server's rules, each on a case where breaking it changes the numbers: min_replies, duplicate,
late and malformed replies (rejected and counted), seeded client sampling, and client evaluation
with generation (exact match on a case whose greedy answer is worked out independently)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_federation import LogitModel, federation, recipe

from fedtune.runtime.server import sample_clients
from fedtune.seeding import derive_seed
from fedtune.wire import Message, MessageKind

THREE_ONES = [(0, 1)] * 3   # client_0: Δ = (0.5, 0) at lr 1
ONE_ZERO = [(1, 0)]         # client_1: Δ = (0, −0.5)
TWO_ZEROS = [(0, 0)] * 2    # client_2: Δ = (−0.5, 0)


def toks(pairs):
    from fedtune.data.prompts import TokenizedExample

    return [TokenizedExample([t, y], [-100, y]) for t, y in pairs]


class Tampering:
    """The in-process transport with each round's replies passed through `edit(round, replies)`."""

    def __init__(self, inner, edit):
        self.inner, self.edit, self.traffic = inner, edit, inner.traffic
        self.seen: dict[int, list[Message]] = {}
        self.timeouts: list[float | None] = []

    def send(self, message: Message) -> None:
        self.inner.send(message)

    def expect(self, round, answer, clients, specs) -> None:  # what replies must carry (sizes)
        self.inner.expect(round, answer, clients, specs)

    def counter_state(self):
        return self.inner.counter_state()

    def load_counter_state(self, state):
        self.inner.load_counter_state(state)

    def collect(self, round, expected, timeout=None):
        self.timeouts.append(timeout)
        replies = self.inner.collect(round, expected, timeout)
        self.seen.setdefault(round, []).extend(replies)
        return self.edit(round, replies)

    def collect_each(self, round, expected, timeout=None):
        yield from self.collect(round, expected, timeout)


def build(tmp_path, data, *, edit=None, endpoints=None, **kw):
    names = [f"client_{i}" for i in range(len(data))]
    fed = federation(recipe("fedavg", len(data), tmp=tmp_path, **kw), LogitModel([0.0, 0.0]),
                     dict(zip(names, map(toks, data))), tmp=tmp_path, endpoints=endpoints)
    if edit is not None:
        fed.server.transport = Tampering(fed.transport, edit)
    return fed


def state(fed):
    return fed.server.global_state["w"].tolist()


# -- min_replies ------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_replies,expected", [
    (2, [3 * 0.5 / 4, -0.5 / 4]),  # the two replies are averaged
    (3, [0.0, 0.0]),               # too few: the global adapter stays as it was
])
def test_min_replies_with_a_client_that_never_answers(tmp_path, min_replies, expected):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, TWO_ZEROS], endpoints={"client_2": lambda data: None},
                transport={"min_replies": min_replies})
    fed.round(1)
    assert state(fed) == pytest.approx(expected)
    assert fed.server.missing == 1 and fed.server.rejected == 0
    (event,) = fed.events("no_update")
    assert (event["round"], event["client"]) == (1, "client_2")
    assert event["values"] == {"reason": "no valid update this round"}
    (summary,) = fed.events("round")
    assert summary["values"]["updates"] == 2 and summary["values"]["clients"] == 3
    assert summary["values"]["lr"] == 1.0


def test_min_replies_of_one_aggregates_a_lone_reply(tmp_path):
    silent = {"client_1": lambda data: None, "client_2": lambda data: None}
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, TWO_ZEROS], endpoints=silent)
    fed.round(1)
    assert state(fed) == pytest.approx([0.5, 0.0])
    assert fed.server.missing == 2


def test_a_strategy_needing_more_updates_than_arrived_skips_the_round(tmp_path):
    names = ["client_0", "client_1", "client_2", "client_3"]
    data = [THREE_ONES, ONE_ZERO, TWO_ZEROS, THREE_ONES]
    fed = federation(recipe("krum", 4, tmp=tmp_path, options={"byzantine": 1}),
                     LogitModel([0.0, 0.0]), dict(zip(names, map(toks, data))), tmp=tmp_path)
    fed.round(1)  # krum with f = 1 needs 5 updates; 4 came
    assert state(fed) == [0.0, 0.0]
    assert fed.server.missing == 0  # every client answered; the round was skipped, not failed


# -- duplicate, late and foreign replies --------------------------------------------------------------


def _with_w(msg: Message, value: list[float]) -> Message:
    return dataclasses.replace(msg, tensors={"w": torch.tensor(value)})


def test_a_second_reply_from_the_same_client_is_rejected_and_the_first_kept(tmp_path):
    def edit(round_, replies):
        first = next(m for m in replies if m.sender == "client_0")
        return replies + [_with_w(first, [100.0, 100.0])]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    assert state(fed) == pytest.approx([3 * 0.5 / 4, -0.5 / 4])
    assert fed.server.rejected == 1 and fed.server.missing == 0
    (event,) = fed.events("rejected")
    assert event["client"] == "client_0" and "twice" in event["values"]["reason"]


def test_a_late_reply_from_an_earlier_round_is_rejected(tmp_path):
    kept: dict[str, Message] = {}

    def edit(round_, replies):
        if round_ == 1:
            kept.update({m.sender: m for m in replies})
            return [m for m in replies if m.sender == "client_0"]  # client_1's reply is "late"
        return [_with_w(kept["client_1"], [0.0, -7.0])] + replies

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    after_one = state(fed)
    assert after_one == pytest.approx([0.5, 0.0])
    fed.round(2)
    assert fed.server.rejected == 1
    (event,) = fed.events("rejected")
    assert event["round"] == 2 and "round 1" in event["values"]["reason"]
    assert state(fed)[1] > -1.0  # the stale −7 never reached the average


def test_a_reply_from_a_client_not_chosen_this_round_is_rejected(tmp_path):
    chosen = sample_clients(["client_0", "client_1"], 1, 5, 1)
    other = "client_1" if chosen == ["client_0"] else "client_0"

    def edit(round_, replies):
        forged = dataclasses.replace(replies[0], sender=other, tensors={"w": torch.tensor([9.0, 9.0])})
        return replies + [forged]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, federation={"clients_per_round": 1})
    fed.round(1)
    assert fed.server.rejected == 1
    assert max(abs(v) for v in state(fed)) == pytest.approx(0.5)


@pytest.mark.parametrize("change,reason", [
    ({"meta": {"n_examples": 0, "metrics": {}}}, "n_examples"),
    ({"meta": {"n_examples": -3, "metrics": {}}}, "n_examples"),
    ({"meta": {"n_examples": True, "metrics": {}}}, "n_examples"),
    ({"meta": {"n_examples": 2.5, "metrics": {}}}, "n_examples"),
    ({"meta": {"n_examples": "3", "metrics": {}}}, "n_examples"),
    ({"meta": {"metrics": {}}}, "n_examples"),
    ({"meta": {"n_examples": 3, "metrics": [1, 2]}}, "metrics"),
    ({"tensors": {"w": torch.zeros(3)}}, "shape"),
    ({"tensors": {"w": torch.zeros(2, dtype=torch.float64)}}, "dtype"),
    ({"tensors": {"v": torch.zeros(2)}}, "tensor names"),
    ({"kind": MessageKind.ERROR, "meta": {"error": "out of memory"}}, "out of memory"),
    ({"kind": MessageKind.EVAL_RESULT}, "kind"),
])
def test_a_malformed_update_is_rejected_counted_and_left_out(tmp_path, change, reason):
    def edit(round_, replies):
        return [dataclasses.replace(m, **change) if m.sender == "client_1" else m for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    assert fed.server.rejected == 1 and fed.server.missing == 1
    assert state(fed) == pytest.approx([0.5, 0.0])  # client_0's update alone
    (event,) = fed.events("rejected")
    assert event["client"] == "client_1" and reason in event["values"]["reason"]


def test_a_reply_that_does_not_decode_counts_as_missing(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], endpoints={"client_1": lambda data: b"junk"})
    fed.round(1)
    assert state(fed) == pytest.approx([0.5, 0.0])
    assert fed.server.missing == 1
    assert fed.transport.rejected and fed.transport.rejected[0][0] == "client_1"


def test_round_summary_weights_train_loss_by_examples(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], lr=1.0, steps=1)
    fed.round(1)
    fed.round(2)
    import math

    # Round 2 starts at (0.375, −0.125): client losses log(1+e^w) − f·w at their own coordinate.
    l0 = math.log1p(math.exp(0.375)) - 0.375
    l1 = math.log1p(math.exp(-0.125))
    summary = fed.events("round")[1]["values"]
    assert summary["train_loss"] == pytest.approx((3 * l0 + l1) / 4, rel=1e-5)
    assert summary["updates"] == 2 and summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert [e["round"] for e in fed.events("round")] == [1, 2]


def test_the_round_summary_times_the_round(tmp_path):
    import time

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], lr=1.0, steps=1)
    before = time.perf_counter()
    fed.round(1)
    took = time.perf_counter() - before
    assert 0.0 < fed.events("round")[0]["values"]["seconds"] <= took


# -- sampling -----------------------------------------------------------------------------------------


def test_sampling_is_the_seeded_choice_in_registration_order():
    clients = [f"c{i}" for i in range(6)]
    for round_ in (1, 2, 3):
        rng = np.random.default_rng(derive_seed(7, "sample", round_))
        picked = sorted(rng.choice(6, size=3, replace=False).tolist())
        assert sample_clients(clients, 3, 7, round_) == [clients[i] for i in picked]
    assert sample_clients(clients, 6, 7, 1) == clients
    assert sample_clients(clients, 9, 7, 1) == clients
    rounds = {tuple(sample_clients(clients, 3, 7, r)) for r in range(1, 9)}
    assert len(rounds) > 1  # the choice changes with the round


def test_only_the_sampled_clients_train_in_a_round(tmp_path):
    data = [THREE_ONES, ONE_ZERO, TWO_ZEROS, ONE_ZERO]
    fed = build(tmp_path, data, federation={"clients_per_round": 2})
    names = list(fed.clients)
    for round_ in (1, 2, 3):
        fed.round(round_)
        trained = [e["client"] for e in fed.events("fit") if e["round"] == round_]
        assert trained == sample_clients(names, 2, 5, round_)
        down = fed.transport.traffic.by_client(round_)
        assert sorted(down) == sorted(trained)


# -- client evaluation with generation ------------------------------------------------------------------


def _greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by hand: append the argmax of the last position's logits."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def test_client_evaluation_generates_and_scores_exact_match(tmp_path, char_tokenizer):
    from conftest import make_tiny_llama
    from fedtune.config import EvalSection
    from fedtune.data.examples import Example
    from fedtune.data.prompts import render_prompt, tokenize_examples
    from fedtune.eval.evaluator import Evaluator

    tok = char_tokenizer
    model = make_tiny_llama(tok)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)  # the "adapter": what travels
    section = EvalSection(max_new_tokens=4, batch_size=8)
    prompts = [Example("Say A", "?"), Example("Name B", "?")]
    expected = []
    for ex in prompts:
        ids = [tok.bos_token_id] + tok.encode(render_prompt(ex, "compact"), add_special_tokens=False)
        expected.append(tok.decode(_greedy(model, ids, 4, tok.eos_token_id),
                                   skip_special_tokens=True).strip())
    assert all(expected)
    # One right answer, one wrong: exact match 0.5 on generation; none without it.
    raw = [Example("Say A", expected[0]), Example("Name B", expected[1] + "zz")]
    test, _ = tokenize_examples(raw, tok, template="compact", max_length=64)
    evaluator = Evaluator(model, tok, section, template="compact", max_length=64,
                          device=torch.device("cpu"))
    r = recipe("fedavg", 1, tmp=tmp_path, eval={"clients": True, "max_new_tokens": 4, "batch_size": 8})
    fed = federation(r, model, {"client_0": test}, tmp=tmp_path, evaluator=evaluator,
                     test={"client_0": (test, raw)})
    fed.server._wall = lambda: 0.0
    fed.server.evaluate(1, final=False)
    assert "exact_match" not in fed.server.client_eval["client_0"]
    fed.server.evaluate(2, final=True)
    metrics = fed.server.client_eval["client_0"]
    assert metrics["exact_match"] == 0.5 and metrics["n_generated"] == 2
    assert metrics["n_examples"] == 2 and metrics["loss"] > 0
    logged = [e for e in fed.events("eval") if e["round"] == 2]
    assert logged and logged[0]["values"]["exact_match"] == 0.5


# -- the whole run: evaluation schedule, checkpoints, resume, finish ------------------------------------


def _recording(fed):
    """Wrap every client's endpoint to record the kinds of message it receives."""
    from fedtune.transport.codec import decode

    seen = {name: [] for name in fed.clients}
    for name, client in fed.clients.items():
        def endpoint(data, name=name, client=client):
            msg = decode(data)
            seen[name].append((msg.kind.value, msg.round, msg.meta.get("generate")))
            return client.handle_bytes(data)
        fed.transport.endpoints[name] = endpoint
    return seen


def _hand_fedavgm(rounds, lr=1.0, momentum=0.5):
    from test_algorithm_rounds import sgd, wmean

    x, v = [0.0, 0.0], [0.0, 0.0]
    for _ in range(rounds):
        mean = wmean([sgd(x, THREE_ONES, lr), sgd(x, ONE_ZERO, lr)], [3, 1])
        v = [momentum * a + (b - c) for a, b, c in zip(v, mean, x)]
        x = [a + b for a, b in zip(x, v)]
    return x


def _run_fed(tmp_path, *, rounds, every=0, at_start=True, checkpoint_every=1, run_dir=None,
             early=None):
    r = recipe("fedavgm", 2, tmp=tmp_path, options={"momentum": 0.5},
               federation={"rounds": rounds},
               eval={"at_start": at_start, "every": every, "clients": True,
                     **({"early_stopping": early} if early else {})},
               output={"checkpoint_every": checkpoint_every, "keep_checkpoints": 2})
    calls = []

    def evaluate_global(state, generate, round_=None):  # the round names the predictions file
        calls.append(generate)
        return {"w0": float(state["w"][0]), "w1": float(state["w"][1])}

    fed = federation(r, LogitModel([0.0, 0.0]), {"client_0": toks(THREE_ONES), "client_1": toks(ONE_ZERO)},
                     tmp=tmp_path, evaluate_global=evaluate_global, run_dir=run_dir)
    return fed, calls


class _Status:
    """A reporter that keeps only its status lines."""

    def __init__(self):
        self.lines: list[str] = []

    def status(self, text):
        self.lines.append(text)

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_the_caller_hears_each_evaluation_but_the_last_and_can_stop_the_run(tmp_path):
    fed, _ = _run_fed(tmp_path, rounds=4, every=1, checkpoint_every=3)
    heard = []
    fed.server.on_eval = lambda round_, metrics: heard.append((round_, dict(metrics))) or round_ == 2
    fed.server.reporter = _Status()
    result = fed.server.run()
    assert [r for r, _ in heard] == [1, 2]
    for round_, metrics in heard:
        x = _hand_fedavgm(round_)
        assert metrics == pytest.approx({"w0": x[0], "w1": x[1]})
    assert result.rounds == 2
    assert fed.server.global_state["w"].tolist() == pytest.approx(_hand_fedavgm(2))
    assert "round 2: stopped by the caller (on_eval)" in fed.server.reporter.lines
    ckpts = sorted(p.name for p in (fed.run_dir.path / "checkpoints").glob("round_*"))
    assert ckpts == ["round_000002"]  # the stop is checkpointed, though not a checkpoint round


def test_the_caller_is_not_asked_at_the_last_round_nor_after_early_stopping(tmp_path):
    fed, _ = _run_fed(tmp_path / "a", rounds=3, every=1)
    heard = []
    fed.server.on_eval = lambda round_, metrics: heard.append(round_) or False
    assert fed.server.run().rounds == 3 and heard == [1, 2]
    # a loss that stays at 1.0 does not improve on the start's: patience 1 stops after round 1
    fed, _ = _run_fed(tmp_path / "b", rounds=3, every=1, early={"metric": "loss", "patience": 1})
    fed.server.evaluate_global = lambda state, generate, round_=None: {"loss": 1.0}
    heard.clear()
    fed.server.on_eval = lambda round_, metrics: heard.append(round_) or True
    fed.server.reporter = _Status()
    assert fed.server.run().rounds == 1 and heard == []
    assert fed.server.reporter.lines[-1].startswith("round 1: early stopping (loss has not improved")


def test_a_whole_run_evaluates_on_schedule_and_finishes_every_client(tmp_path):
    fed, calls = _run_fed(tmp_path, rounds=3, every=2, checkpoint_every=2)
    seen = _recording(fed)
    result = fed.server.run()
    x = _hand_fedavgm(3)
    assert fed.server.global_state["w"].tolist() == pytest.approx(x)
    assert result.rounds == 3 and result.initial == {"w0": 0.0, "w1": 0.0}
    assert result.final == pytest.approx({"w0": x[0], "w1": x[1]})
    assert calls == [True, True, True]  # at start, round 2 (every 2), the end
    kinds = [k for k, _, _ in seen["client_0"]]
    assert kinds == ["evaluate", "fit", "fit", "evaluate", "fit", "evaluate", "finish"]
    # clients generate answers only in the final evaluation
    assert [(r, g) for k, r, g in seen["client_0"] if k == "evaluate"] == [
        (0, False), (2, False), (3, True)]
    assert seen["client_1"][-1] == ("finish", 3, None)
    assert result.strategy_metrics == {} and result.clients == {} and result.local_dp == {}
    (first,) = [e for e in fed.events("eval") if e["round"] == 0]
    assert first["client"] is None and first["values"] == {"scope": "global", "w0": 0.0, "w1": 0.0}
    evaluate_meta = [e for e in fed.events("eval") if e["client"] is None]
    assert [e["round"] for e in evaluate_meta] == [0, 2, 3]
    ckpts = sorted(p.name for p in (fed.run_dir.path / "checkpoints").glob("round_*"))
    assert ckpts == ["round_000002", "round_000003"]  # every 2 rounds and the last
    assert result.timings.train > 0 and result.rejected == 0 and result.missing == 0


def test_no_evaluation_at_start_when_switched_off(tmp_path):
    fed, calls = _run_fed(tmp_path, rounds=2, at_start=False)
    result = fed.server.run()
    assert result.initial is None and calls == [True]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    whole, _ = _run_fed(tmp_path / "a", rounds=3)
    expected = whole.server.run()
    first, _ = _run_fed(tmp_path / "b", rounds=3)
    first.server.initial = first.server.evaluate(0, final=False)  # what run() does first
    first.server.run_round(1)
    first.server.checkpoint(1)
    first.server.rejected, first.server.missing = 4, 5
    first.server.checkpoint(1)
    again, _ = _run_fed(tmp_path / "c", rounds=3, run_dir=first.run_dir)
    start = again.server.restore(first.run_dir.latest_checkpoint())
    assert start == 2
    assert again.server.rejected == 4 and again.server.missing == 5
    assert again.server.initial == {"w0": 0.0, "w1": 0.0}  # kept from the first session
    result = again.server.run(start)
    torch.testing.assert_close(result.global_state["w"], expected.global_state["w"])
    assert again.server.strategy.state_dict()["v/w"].tolist() == pytest.approx(
        whole.server.strategy.state_dict()["v/w"].tolist())
    assert result.rejected == 4 and result.missing == 5


def test_local_dp_figures_and_train_seconds_are_taken_from_the_updates(tmp_path):
    def edit(round_, replies):
        out = []
        for m in replies:
            metrics = {**m.meta["metrics"], "train_seconds": 2.5}
            if m.sender == "client_1":
                metrics.update(dp_epsilon=1.5, dp_delta=1e-5)
            out.append(dataclasses.replace(m, meta={**m.meta, "metrics": metrics}))
        return out

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit)
    fed.round(1)
    assert fed.server.local_dp == {"client_1": {"epsilon": 1.5, "delta": 1e-5}}
    assert fed.server.timings.train == pytest.approx(5.0)
    fits = {e["client"]: e["values"] for e in fed.events("fit")}
    assert fits["client_1"]["dp_epsilon"] == 1.5 and fits["client_0"]["train_seconds"] == 2.5
    assert fits["client_0"]["up"] > 0 and fits["client_0"]["down"] > 0


def test_a_malformed_evaluation_reply_is_ignored(tmp_path):
    def edit(round_, replies):  # the stale reply comes first and would be recorded if accepted
        stale = [dataclasses.replace(m, round=round_ + 1, meta={**m.meta, "metrics": {"loss": 9.0}})
                 for m in replies if m.sender == "client_1"]
        return stale + [dataclasses.replace(m, meta={**m.meta, "metrics": {"loss": 0.25}})
                        for m in replies if m.sender == "client_0"]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit, eval={"clients": True})
    fed.server.evaluate(1, final=False)
    assert fed.server.client_eval == {"client_0": {"loss": 0.25}}
    logged = [(e["client"], e["values"]) for e in fed.events("eval")]
    assert logged == [("client_0", {"scope": "client", "loss": 0.25})]


def test_why_a_round_left_the_adapter_unchanged_is_logged(tmp_path, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="fedtune.server")
    silent = {"client_1": lambda data: None, "client_2": lambda data: None}
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, TWO_ZEROS], endpoints=silent,
                transport={"min_replies": 2})
    fed.round(1)
    assert "1 valid update(s), fewer than transport.min_replies=2" in caplog.text
    caplog.clear()
    fed.transport.endpoints["client_0"] = lambda data: None
    fed.round(2)
    assert "no valid update arrived" in caplog.text
    summary = fed.events("round")[-1]["values"]
    assert summary["updates"] == 0 and summary["train_loss"] is None
    caplog.clear()
    names = ["client_0", "client_1", "client_2", "client_3"]
    data = [THREE_ONES, ONE_ZERO, TWO_ZEROS, THREE_ONES]
    krum = federation(recipe("krum", 4, tmp=tmp_path / "k", options={"byzantine": 1}),
                      LogitModel([0.0, 0.0]), dict(zip(names, map(toks, data))), tmp=tmp_path / "k")
    krum.round(1)
    assert "4 valid update(s), fewer than the 5 that krum needs" in caplog.text
    assert "min_replies" not in caplog.text


def test_the_reporter_and_the_reply_timeout_see_each_round(tmp_path):
    calls = []

    class Recorder:
        def round_begin(self, round_, rounds, n_clients):
            calls.append(("begin", round_, rounds, n_clients))

        def round_end(self, round_, summary):
            calls.append(("end", round_, summary["updates"]))

        def eval_result(self, round_, metrics):
            calls.append(("eval", round_, metrics))

        def status(self, text):
            calls.append(("status", text))

        def client_done(self, client):
            pass

        def close(self):
            pass

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=lambda r, replies: replies,
                federation={"rounds": 2})
    fed.server.reporter = Recorder()
    fed.server.reply_timeout = 7.5
    fed.server.evaluate_global = lambda state, generate, round_=None: {"g": generate}
    fed.server.run()
    assert calls == [("begin", 1, 2, 2), ("end", 1, 2), ("begin", 2, 2, 2), ("end", 2, 2),
                     ("status", "round 2: evaluating"), ("eval", 2, {"g": True})]
    assert fed.server.transport.timeouts == [7.5, 7.5, 7.5]  # two rounds and the finish


def test_a_round_under_secure_aggregation_gives_the_weighted_mean(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO, TWO_ZEROS],
                federation={"secure_aggregation": {"enabled": True}})
    fed.round(1)
    # Δ: client_0 (0.5, 0) ×3, client_1 (0, −0.5) ×1, client_2 (−0.5, 0) ×2 -> mean over 6 examples
    assert state(fed) == pytest.approx([(1.5 - 1.0) / 6, -0.5 / 6], abs=1e-6)
    (summary,) = fed.events("round")
    assert summary["values"]["updates"] == 3 and summary["values"]["secagg"]["survivors"] == 3


def test_restore_takes_every_figure_from_the_checkpoint(tmp_path):
    from fedtune.track.rundir import Checkpoint

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    traffic = {"rounds": {"1": {"client_0": {"up": 10, "down": 20}}}}
    info = {"traffic": traffic, "train_seconds": 2.0, "eval_seconds": 3.0, "wall_seconds": 1000.0,
            "initial": {"loss": 9.0}, "rejected": 4, "missing": 5}
    ci = {"client_0/scaffold/ci/w": torch.tensor([0.5, -0.5])}
    start = fed.server.restore(Checkpoint(6, {"w": torch.tensor([1.0, 2.0])}, {}, info, client_state=ci))
    s = fed.server
    assert start == 7 and s.global_state["w"].tolist() == [1.0, 2.0]
    assert (s.timings.train, s.timings.eval, s.timings.wall_before) == (2.0, 3.0, 1000.0)
    assert s.initial == {"loss": 9.0} and (s.rejected, s.missing) == (4, 5)
    assert s.transport.traffic.total("up") == 10 and s.transport.traffic.total("down") == 20
    assert fed.clients["client_0"].state["scaffold/ci/w"].tolist() == [0.5, -0.5]
    assert fed.clients["client_1"].state == {}

    bare = build(tmp_path / "bare", [THREE_ONES, ONE_ZERO])
    bare.server.client_state = None  # a deployed server holds no client state
    bare.server.restore(Checkpoint(1, {"w": torch.zeros(2)}, {}, {"traffic": {"rounds": {}}},
                                   client_state=ci))
    t = bare.server
    assert (t.timings.train, t.timings.eval, t.timings.wall_before) == (0.0, 0.0, 0.0)
    assert (t.rejected, t.missing, t.initial) == (0, 0, None)
    assert t.transport.traffic.total("up") == 0
    assert bare.clients["client_0"].state == {}


def test_wall_seconds_continue_from_the_earlier_sessions(tmp_path):
    from fedtune.track.rundir import Checkpoint

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], federation={"rounds": 2})
    fed.server.restore(Checkpoint(1, {"w": torch.zeros(2)}, {},
                                  {"wall_seconds": 1000.0, "traffic": {"rounds": {}}}))
    fed.server.run(2)
    assert 1000.0 < fed.server.wall_seconds() < 1000.0 + 600
    fresh = build(tmp_path / "fresh", [THREE_ONES, ONE_ZERO], federation={"rounds": 1})
    fresh.server.run()
    assert 0.0 < fresh.server.wall_seconds() < 600
    ckpt = fresh.run_dir.latest_checkpoint()
    assert ckpt.round == 1 and 0.0 < ckpt.info["wall_seconds"] < 600
    assert ckpt.info["train_seconds"] == fresh.server.timings.train > 0
    assert ckpt.info["eval_seconds"] == fresh.server.timings.eval


# -- federation.weighting and the cap on claimed example counts -----------------------------------------


@pytest.mark.parametrize("algorithm,options", [("fedavg", {}), ("fedavgm", {"momentum": 0.0}),
                                               ("fedprox", {"mu": 0.0})])
def test_federation_weighting_uniform_counts_each_client_once(tmp_path, algorithm, options):
    names = ["client_0", "client_1"]
    r = recipe(algorithm, 2, tmp=tmp_path, options=options, federation={"weighting": "uniform"})
    fed = federation(r, LogitModel([0.0, 0.0]), dict(zip(names, map(toks, [THREE_ONES, ONE_ZERO]))),
                     tmp=tmp_path)
    fed.round(1)
    assert state(fed) == pytest.approx([0.25, -0.25])  # not (0.375, −0.125)


def test_a_claim_above_the_cap_is_rejected(tmp_path):
    def edit(round_, replies):
        return [dataclasses.replace(m, meta={**m.meta, "n_examples": 1000})
                if m.sender == "client_0" else m for m in replies]

    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=edit,
                federation={"max_examples_per_client": 999})
    fed.round(1)
    assert fed.server.rejected == 1
    assert state(fed) == pytest.approx([0.0, -0.5])  # client_1 alone


def test_evaluation_without_a_global_test_set_and_its_timeout(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], edit=lambda r, replies: replies,
                eval={"clients": True})
    fed.server.reply_timeout = 3.25
    assert fed.server.evaluate(1, final=True) == {}
    assert fed.server.transport.timeouts == [3.25]
    assert [e for e in fed.events("eval") if e["client"] is None] == []


def test_checkpoints_carry_the_clients_persistent_state(tmp_path):
    names = ["client_0", "client_1"]
    fed = federation(recipe("scaffold", 2, tmp=tmp_path, steps=2), LogitModel([0.0, 0.0]),
                     dict(zip(names, map(toks, [THREE_ONES, ONE_ZERO]))), tmp=tmp_path)
    fed.round(1)
    fed.server.checkpoint(1)
    ckpt = fed.run_dir.latest_checkpoint()
    torch.testing.assert_close(ckpt.client_state["client_0/scaffold/ci/w"],
                               fed.clients["client_0"].state["scaffold/ci/w"])
    assert set(ckpt.strategy_state) == {"scaffold/c/w"}
    fed.server.client_state = None  # a deployed server: the clients keep their own state
    fed.server.checkpoint(2)
    assert fed.run_dir.latest_checkpoint().client_state == {}


def test_the_constructor_keeps_the_reply_timeout_and_evaluates_a_subset_and_every_holdout(tmp_path):
    from fedtune.runtime.server import Server

    names = [f"client_{i}" for i in range(5)]
    fed = federation(recipe("fedavg", 5, tmp=tmp_path, eval={"client_subset": 2, "clients": True},
                            federation={"holdout_clients": ["client_4"]}),
                     LogitModel([0.0, 0.0]), dict(zip(names, map(toks, [THREE_ONES] * 5))), tmp=tmp_path)
    server = Server(fed.server.recipe, strategy=fed.server.strategy, transport=fed.transport,
                    clients=names, global_state=fed.server.global_state, run_dir=fed.run_dir,
                    reply_timeout=2.5)
    assert server.reply_timeout == 2.5
    assert server.training == names[:4]
    picked = sample_clients(names[:4], 2, fed.server.recipe.seed, 0)   # the seeded subset of 2
    assert server.eval_clients == [*picked, "client_4"]                # and the holdout, always


def test_a_run_with_no_round_left_reports_empty_final_figures(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO], federation={"rounds": 2})
    result = fed.server.run(start_round=3)   # nothing to train, nothing evaluated
    assert result.final == {} and result.clients == {} and result.initial is None


def test_client_evaluation_sends_each_client_its_own_cut_of_the_global_adapter(tmp_path):
    # under adapter.rank_per_client each client is sent its own rank's part (client_shapes.py):
    # the server must ask for it by the client's name, as it does for training
    fed, _ = _run_fed(tmp_path, rounds=1)
    asked, down = [], fed.server.shapes.down
    fed.server.shapes.down = lambda client, state: asked.append(client) or down(client, state)
    fed.server.evaluate(1, final=False)
    assert sorted(asked) == ["client_0", "client_1"]


def _train_seconds(value):
    """An edit that makes every fit reply report `value` train seconds (None: no figure at all)."""
    def edit(round_, replies):
        out = []
        for m in replies:
            metrics = {k: v for k, v in m.meta.get("metrics", {}).items() if k != "train_seconds"}
            if value is not None:
                metrics["train_seconds"] = value
            out.append(dataclasses.replace(m, meta={**m.meta, "metrics": metrics}))
        return out
    return edit


def test_training_time_adds_what_the_clients_report_and_nothing_for_a_client_that_does_not(tmp_path):
    fed = build(tmp_path / "a", [THREE_ONES, ONE_ZERO], edit=_train_seconds(2.5))
    fed.round(1)
    assert fed.server.timings.train == pytest.approx(5.0)   # two clients, 2.5 s each
    fed = build(tmp_path / "b", [THREE_ONES, ONE_ZERO], edit=_train_seconds(None))
    fed.round(1)
    assert fed.server.timings.train == 0.0 and fed.events("round")[0]["values"]["updates"] == 2


def test_training_sends_each_client_its_own_cut_of_the_global_adapter(tmp_path):
    fed = build(tmp_path, [THREE_ONES, ONE_ZERO])
    asked, down = [], fed.server.shapes.down
    fed.server.shapes.down = lambda client, state: asked.append(client) or down(client, state)
    fed.round(1)
    assert sorted(asked) == ["client_0", "client_1"]


def test_updates_without_examples_have_no_mean_train_loss():
    from fedtune.algorithms.base import ClientUpdate
    from fedtune.runtime.server import mean_train_loss

    def update(loss, n):
        return ClientUpdate("c", {}, n, metrics={"train_loss": loss})

    assert mean_train_loss([update(1.0, 0), update(3.0, 0)]) is None
    assert mean_train_loss([update(1.0, 3), update(3.0, 1)]) == pytest.approx(1.5)
    assert mean_train_loss([]) is None


def test_client_evaluation_writes_its_generated_answers_where_the_run_keeps_them(tmp_path, char_tokenizer):
    from conftest import make_tiny_llama
    from fedtune.config import EvalSection
    from fedtune.data.examples import Example
    from fedtune.data.prompts import tokenize_examples
    from fedtune.eval.evaluator import Evaluator
    from fedtune.eval.predictions import read_predictions
    from fedtune.transport.codec import decode, encode

    tok = char_tokenizer
    model = make_tiny_llama(tok)
    model.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    raw = [Example("Say A", "x"), Example("Name B", "y")]
    test, _ = tokenize_examples(raw, tok, template="compact", max_length=64)
    evaluator = Evaluator(model, tok, EvalSection(max_new_tokens=3, batch_size=8), template="compact",
                          max_length=64, device=torch.device("cpu"))
    r = recipe("fedavg", 1, tmp=tmp_path, eval={"clients": True, "max_new_tokens": 3, "batch_size": 8})
    fed = federation(r, model, {"client_0": test}, tmp=tmp_path, evaluator=evaluator,
                     test={"client_0": (test, raw)})
    client = fed.clients["client_0"]
    client.predictions_dir = tmp_path / "client_0" / "predictions"
    tensors = dict(fed.server.global_state)
    # a message that does not say whether to generate: no generation, so nothing to write
    reply = decode(client.handle_bytes(encode(Message(MessageKind.EVALUATE, 3, "server", "client_0",
                                                      tensors=tensors))))
    assert "exact_match" not in reply.meta["metrics"]
    assert not client.predictions_dir.exists()
    reply = decode(client.handle_bytes(encode(Message(MessageKind.EVALUATE, 4, "server", "client_0",
                                                      tensors=tensors, meta={"generate": True}))))
    assert reply.meta["metrics"]["n_generated"] == 2
    assert sorted(p.name for p in client.predictions_dir.iterdir()) == ["round_0004_client_0.jsonl"]
    rows = read_predictions(client.predictions_dir / "round_0004_client_0.jsonl")
    assert [row["index"] for row in rows] == [0, 1]
    assert [row["reference"] for row in rows] == ["x", "y"]
    assert all(isinstance(row["output"], str) for row in rows)


def test_a_client_answers_a_malformed_request_with_an_error_and_counts_each_one(tmp_path):
    from fedtune.transport.codec import decode, encode

    class NotFinite:   # an evaluation whose loss cannot travel
        def evaluate(self, *args, **kwargs):
            return {"loss": float("nan")}

        def loss(self, examples):
            return {}

    fed = federation(recipe("fedavg", 1, tmp=tmp_path), LogitModel([0.0, 0.0]), {"client_0": toks(THREE_ONES)},
                     tmp=tmp_path, evaluator=NotFinite(), test={"client_0": (toks(THREE_ONES), [])})
    client = fed.clients["client_0"]
    for k in (1, 2):
        bad = Message(MessageKind.EVALUATE, 7, "server", "client_0", tensors={"w": torch.zeros(5)})  # not w's shape
        reply = decode(client.handle_bytes(encode(bad)))
        assert (reply.kind, reply.round, reply.sender) == (MessageKind.ERROR, 7, "client_0")
        assert "w" in reply.meta["error"]
        assert client.rejected == k
    ok = Message(MessageKind.EVALUATE, 8, "server", "client_0", tensors=dict(fed.server.global_state))
    reply = decode(client.handle_bytes(encode(ok)))
    assert (reply.kind, reply.round) == (MessageKind.ERROR, 8)   # the NaN loss could not be encoded
    assert "finite" in reply.meta["error"] and client.rejected == 2   # the request itself was fine

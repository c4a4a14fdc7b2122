"""`fedtune client`: one party of a deployed federation. It dials the server, answers its messages
with the same Client as a simulation, reconnects with backoff, and exits after FINISH."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from fedtune.algorithms import build_party
from fedtune.algorithms.party import Party
from fedtune.config import Recipe, load_recipe
from fedtune.data.federated import ClientData, FederatedData
from fedtune.data.records import load_examples
from fedtune.data.splitters import train_val_test_split
from fedtune.errors import DataError, DeploymentError, MessageError
from fedtune.models.rank_plan import client_ranks
from fedtune.runtime.client import Client
from fedtune.runtime.client_store import load_client_state, save_client_state, state_path
from fedtune.runtime.deploy_server import require_grpc
from fedtune.runtime.launch import check_launch
from fedtune.runtime.relay import Relay, party_relay
from fedtune.runtime.setup import Setup
from fedtune.seeding import derive_seed
from fedtune.track.report import human_bytes
from fedtune.track.reporter import plain_console
from fedtune.transport.auth import client_token, with_name
from fedtune.transport.codec import check_message, decode
from fedtune.transport.framing import peek_header
from fedtune.transport.grpc_client import FATAL, Backoff, ServerConnection, is_rejection
from fedtune.transport.grpc_server import SERVER_NAME
from fedtune.wire import Message, MessageKind

log = logging.getLogger("fedtune.deploy")
_PUSH_ATTEMPTS = 5


def own_data(recipe: Recipe, name: str, path: str | Path) -> FederatedData:
    """A party's own data file, split into its train/val/test parts by the recipe's fractions."""
    d = recipe.data
    examples = load_examples(str(path), format=d.format, fields=d.fields, limit=d.max_examples)
    labels = [ex.category for ex in examples]
    idx = train_val_test_split(labels, d.val_fraction, d.test_fraction,
                               derive_seed(recipe.seed, "data", "holdout", name))
    train, val, test = ([examples[i] for i in part] for part in idx)
    if not train:
        raise DataError(f"{path}: no training examples left for client '{name}' after the split")
    return FederatedData(clients={name: ClientData(name, train, val, test)}, test=test)


@dataclass
class ClientStats:
    fits: int = 0
    evaluations: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    late: int = 0
    reconnects: int = 0


def participate(recipe: Any = None, overrides: list[str] | None = None, *, name: str,
                server: str | None = None, data: str | Path | None = None,
                token_file: str | Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run client `name` until the server says FINISH; returns what it did."""
    overrides = list(overrides or [])
    if server is not None:
        overrides.append(f"transport.address={server}")
    if token_file is not None:
        overrides.append(f"transport.token_file={token_file}")
    loaded = load_recipe(recipe, overrides)
    require_grpc(loaded, "client")
    check_launch(loaded)
    relay = party_relay()  # torchrun / accelerate launch: rank 0 talks, every rank trains
    if relay is not None and not relay.ranks.main:
        return _follow(loaded, name, data, relay)
    try:
        return _participate(loaded, name, data, console, relay)
    finally:
        if relay is not None:
            relay.stop()  # the other ranks leave when rank 0 is done or fails


def _participate(loaded: Recipe, name: str, data: str | Path | None, console: Console | None,
                 relay: Relay | None) -> dict[str, Any]:
    section = loaded.transport
    token = None
    if section.token_file is not None:
        token = client_token(with_name(section.token_file, name), name)
    elif not section.mutual_tls:
        raise DeploymentError(f"client '{name}' needs a token: --token-file PATH or "
                              "transport.token_file (or mutual_tls: true)")
    connection = ServerConnection(section, name, address=section.address, token=token)
    out = plain_console()  # `[rejected]`, `[late]`, `[not sent]` must show, not be taken as markup
    try:
        fed = loaded.federation
        party = build_party(fed.algorithm, fed.options, loaded)
        base = None  # where the algorithm ships the client's model, it is never loaded here
        if party.client_downloads():
            base = fetch_model(connection, loaded, party, out)
        setup = Setup(loaded, console, data=own_data(loaded, name, data) if data else None,
                      base=base, party=party, rank=own_rank(loaded, name))
        if name not in setup.data.clients:
            raise DeploymentError(
                f"client '{name}' is not in the recipe's split ({', '.join(setup.data.clients)}); "
                "give one of those names, or --data PATH for your own data")
        client = setup.clients.client(name)
        if setup.own_rank is not None:
            out.print(f"{name}: LoRA rank {setup.own_rank} (adapter.rank_per_client; the global adapter's "
                      f"is {loaded.adapter.r})")
        client.predictions_dir = Path(loaded.output.dir) / name / "predictions"  # never sent
        client.secagg.require(loaded.federation.secure_aggregation)  # no plain FIT if enabled
        store = restore_state(client, loaded, out)  # its personal state, kept across restarts
        return _Loop(connection, client, loaded, out, relay, store=store).run()
    finally:
        connection.close()


def restore_state(client: Client, recipe: Recipe, out: Console) -> Path:
    """Give a deployed client the state it kept on its disk (a restart continues with its
    personal adapter); returns where it keeps it."""
    store = state_path(recipe.output.dir, client.name)
    client.state.update(load_client_state(store, recipe.federation.algorithm))
    if client.state:
        out.print(f"{client.name}: continuing with its state from {store} ({len(client.state)} tensors)")
    return store


def own_rank(recipe: Recipe, name: str) -> int | None:
    """This client's LoRA rank under adapter.rank_per_client (None without it, or for a name
    outside the split, which Setup's caller refuses)."""
    spec = recipe.adapter.rank_per_client
    return None if spec is None else client_ranks(spec, recipe.federation.clients, recipe.seed).get(name)


def fetch_model(connection: ServerConnection, recipe: Recipe, party: Party,
                out: Console) -> tuple[Any, Any]:
    """Download what the algorithm ships before a client joins (with retries) and build the
    client's (model, tokenizer) from it (Party.client_model)."""
    name = connection.name
    messages: dict[str, Message] = {}
    start, size = time.perf_counter(), 0
    for resource in party.client_downloads():
        data = _download(connection, recipe, resource, out)
        size += len(data)
        message = decode(data, max_bytes=recipe.transport.max_message_bytes)
        check_message(message, kinds={MessageKind.DOWNLOAD}, sender=SERVER_NAME)
        if message.receiver != name:
            raise MessageError(f"the {resource} was addressed to '{message.receiver}', not '{name}'")
        messages[resource] = message
    model, tokenizer, note = party.client_model(messages, recipe)
    out.print(f"{name}: received the {', '.join(messages)} ({note}, {human_bytes(size)}) in "
              f"{time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _follow(recipe: Recipe, name: str, data: str | Path | None, relay: Relay) -> dict[str, Any]:
    """A rank other than 0 of a client: the same client, fed by rank 0 with every message it got
    from the server; it trains with rank 0 (DDP), sends nothing and writes nothing."""
    setup = Setup(recipe, Console(quiet=True), data=own_data(recipe, name, data) if data else None,
                  rank=own_rank(recipe, name))
    if name not in setup.data.clients:
        raise DeploymentError(f"client '{name}' is not in the recipe's split")
    client = setup.clients.client(name)
    client.secagg.require(recipe.federation.secure_aggregation)
    handled = relay.serve({name: client.handle_bytes})
    return {"client": name, "rank": relay.ranks.rank, "messages": handled}


def _download(connection: ServerConnection, recipe: Recipe, resource: str, out: Console) -> bytes:
    """The encoded message `resource` from the server, retried with backoff while it has none."""
    name = connection.name
    backoff = Backoff(recipe.transport.retry)
    out.print(f"{name}: downloading the {resource} from {connection.address}")
    while True:
        try:
            with _download_bar(out, resource, recipe.output.progress) as on_progress:
                return connection.fetch(resource, on_progress=on_progress)
        except (grpc.RpcError, MessageError) as exc:
            reason = _reason(exc)
            if isinstance(exc, grpc.RpcError) and exc.code() in FATAL:
                raise DeploymentError(
                    f"the server at {connection.address} refused the credentials of client '{name}' "
                    f"({reason}); check transport.token_file or its certificate") from None
            if isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.NOT_FOUND:
                raise DeploymentError(
                    f"the server at {connection.address} offers no {resource}; is it running the "
                    f"same recipe (federation.algorithm: {recipe.federation.algorithm})?") from None
            delay = backoff.next_delay()
            if delay is None:
                raise DeploymentError(f"client '{name}' could not download the {resource} from "
                                      f"{connection.address} ({reason}); see transport.retry") from None
            out.print(f"{name}: no {resource} yet ({reason}); retrying in {delay:.1f} s")
            time.sleep(delay)


@contextmanager
def _download_bar(out: Console, resource: str, show: bool):
    """A byte progress bar for a download (rich draws it only on a terminal)."""
    if not show:
        yield None
        return
    with Progress(TextColumn(resource), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=out, transient=True) as progress:
        task = progress.add_task("download", total=None)
        yield lambda received, total: progress.update(task, completed=received, total=total)


class _Loop:
    def __init__(self, connection: ServerConnection, client: Client, recipe: Recipe, out: Console,
                 relay: Relay | None = None, store: Path | None = None):
        self.conn, self.client, self.recipe, self.out = connection, client, recipe, out
        self.store = store  # where the client's persistent state is kept (runtime/client_store.py)
        self.relay = relay  # several ranks: each message goes to the other ranks before handling
        self.stats = ClientStats()
        self.name = client.name

    def run(self) -> dict[str, Any]:
        section = self.recipe.transport
        backoff = Backoff(section.retry)
        started = time.perf_counter()
        self.out.print(f"{self.name}: connecting to {self.conn.address}")
        while True:
            try:
                for data in self.conn.messages():
                    if backoff.failures:
                        self.out.print(f"{self.name}: reconnected")
                    backoff.reset()
                    if self._handle(data):
                        return self._finish(started)
                raise _StreamEnded()
            except (grpc.RpcError, MessageError, _StreamEnded) as exc:
                if self.conn.connected:
                    backoff.reset()
                    self.stats.reconnects += 1
                reason = _reason(exc)
                if isinstance(exc, grpc.RpcError) and exc.code() in FATAL:
                    raise DeploymentError(
                        f"the server at {self.conn.address} refused the credentials of client "
                        f"'{self.name}' ({reason}); check transport.token_file or its certificate"
                    ) from None
                delay = backoff.next_delay()
                if delay is None:
                    raise DeploymentError(
                        f"client '{self.name}' gave up reaching the server at {self.conn.address} "
                        f"after {backoff.failures - 1} attempts ({reason}); see transport.retry"
                    ) from None
                self.out.print(f"{self.name}: no connection ({reason}); retrying in {delay:.1f} s")
                time.sleep(delay)

    def _handle(self, data: bytes) -> bool:
        """Answer one message; True when it was FINISH."""
        try:
            header = peek_header(data)
        except (MessageError, RecursionError, ValueError) as exc:  # a broken or hostile server
            self.client.rejected += 1
            log.warning("%s: rejected a message from the server: %s", self.name, str(exc)[:200])
            self.out.print(f"{self.name}: a message from the server was rejected (see log)")
            return False
        kind, round_ = header.get("kind"), header.get("round")
        size = len(data)
        self.stats.bytes_down += size
        if kind == "finish":
            return True
        start = time.perf_counter()
        if self.relay is not None:
            self.relay.send(self.name, data)
        reply = self.client.handle_bytes(data)
        del data
        if self.store is not None and kind != "evaluate" and self.client.state:
            save_client_state(self.store, self.client.state, self.recipe.federation.algorithm)
        if reply is None:
            self.out.print(f"{self.name}: round {round_}: the {kind} message was rejected (see log)")
            return False
        meta = peek_header(reply)
        verdict = self._push(reply)
        self.stats.bytes_up += len(reply)
        metrics = meta.get("meta", {}).get("metrics") or {}
        if meta.get("kind") == "update":
            self.stats.fits += 1
            what = f"trained: train loss {_shown(metrics.get('train_loss'))}"
        elif meta.get("kind") == "secagg_advert":
            self.stats.fits += 1
            what = "trained; secure aggregation: keys sent"
        elif str(meta.get("kind")).startswith("secagg_"):
            what = f"secure aggregation: {str(meta.get('kind'))[7:]} sent"
        elif meta.get("kind") == "eval_result":
            self.stats.evaluations += 1
            what = "evaluated: " + (f"loss {_shown(metrics['loss'])}" if "loss" in metrics else "no test data")
        else:
            what = f"could not answer: {meta.get('meta', {}).get('error', '?')}"
        note = "" if verdict == "accepted" else f" [{verdict}]"
        self.out.print(f"{self.name}: round {round_!s:>4} {what}; down {human_bytes(size)}, "
                       f"up {human_bytes(len(reply))}, {time.perf_counter() - start:.1f} s{note}")
        return False

    def _push(self, reply: bytes) -> str:
        backoff = Backoff(self.recipe.transport.retry)
        while True:
            try:
                verdict = self.conn.push(reply, timeout=self.recipe.transport.round_timeout)
                if verdict == "late":
                    self.stats.late += 1
                return verdict
            except grpc.RpcError as exc:
                if exc.code() in FATAL:
                    raise
                if is_rejection(exc):  # too large or malformed; gRPC's busy refusal is retried
                    log.warning("%s: the server rejected a reply: %s", self.name, _reason(exc))
                    return "rejected"
                delay = backoff.next_delay()
                if delay is None or backoff.failures > _PUSH_ATTEMPTS:
                    log.warning("%s: a reply could not be sent (%s); dropped", self.name, _reason(exc))
                    return "not sent"
                time.sleep(delay)

    def _finish(self, started: float) -> dict[str, Any]:
        s = self.stats
        seconds = time.perf_counter() - started
        self.out.print(
            f"{self.name}: finished; {s.fits} training rounds, {s.evaluations} evaluations, "
            f"received {human_bytes(s.bytes_down)}, sent {human_bytes(s.bytes_up)}, "
            f"{s.late} late replies, {s.reconnects} reconnects, "
            f"{self.client.rejected} rejected messages, {seconds:.0f} s")
        return {"client": self.name, **s.__dict__, "rejected_messages": self.client.rejected,
                "seconds": seconds}


class _StreamEnded(Exception):
    """The server closed the message stream without FINISH (it is stopping or restarting)."""

    def __str__(self) -> str:
        return "the server closed the stream"


def _shown(value: Any) -> str:
    """A loss for a progress line: 4 decimals, or "-" when there is none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:.4f}"
    return "-"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        details = (exc.details() or "").splitlines()[0][:120] if exc.details() else ""
        return f"{exc.code().name}: {details}" if details else exc.code().name
    return str(exc)[:120]

"""Progress on the console while a run works: rounds, clients within a round, evaluations."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def plain_console(**options: Any) -> Console:
    """A console for plain lines: no rich markup or highlighting, so notes such as `[rejected]`
    and text from a peer print exactly as written."""
    return Console(highlight=False, soft_wrap=True, markup=False, **options)


class Reporter(Protocol):
    def round_begin(self, round_: int, rounds: int, n_clients: int) -> None: ...
    def client_done(self, client: str) -> None: ...
    def round_end(self, round_: int, summary: dict[str, Any]) -> None: ...
    def eval_result(self, round_: int, metrics: dict[str, Any]) -> None: ...
    def status(self, text: str) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def round_begin(self, round_, rounds, n_clients): pass
    def client_done(self, client): pass
    def round_end(self, round_, summary): pass
    def eval_result(self, round_, metrics): pass
    def status(self, text): pass
    def close(self): pass


def _fmt(metrics: dict[str, Any]) -> str:
    parts = []
    for key in ("loss", "perplexity", "exact_match"):
        if isinstance(metrics.get(key), (int, float)):
            parts.append(f"{key} {metrics[key]:.4f}" if key != "exact_match" else f"EM {metrics[key]:.1%}")
    return "  ".join(parts)


class ConsoleReporter:
    """A rounds bar and a clients bar (rich), and one line per evaluation."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, transient=False,
        )
        self.rounds_task = None
        self.clients_task = None
        self.in_fit = False  # deliveries outside a round's fit phase (evaluation) are not counted
        self.progress.start()

    def round_begin(self, round_, rounds, n_clients):
        if self.rounds_task is None:
            self.rounds_task = self.progress.add_task("rounds", total=rounds, completed=round_ - 1, info="")
            self.clients_task = self.progress.add_task("clients", total=n_clients, info="")
        self.progress.update(self.clients_task, total=n_clients, completed=0, info=f"round {round_}")
        self.in_fit = True

    def client_done(self, client):
        if self.in_fit:
            self.progress.update(self.clients_task, advance=1, info=client)

    def round_end(self, round_, summary):
        self.in_fit = False
        loss = summary.get("train_loss")
        info = f"train loss {loss:.4f}" if isinstance(loss, float) else ""
        self.progress.update(self.rounds_task, completed=round_, info=info)

    def eval_result(self, round_, metrics):
        if metrics:
            self.progress.console.print(f"[bold]round {round_:>4}[/bold]  global test  {_fmt(metrics)}")

    def status(self, text):
        if self.clients_task is not None:
            self.progress.update(self.clients_task, info=text)

    def close(self):
        self.progress.stop()


def quiet_libraries() -> None:
    """Keep the console for fedtune's own progress: no library load bars or deprecation notes."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("peft", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

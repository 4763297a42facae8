"""What the person running a federation sees while it runs: a live display on a terminal, plain lines otherwise.

On a terminal (``rich``): a bar for the rounds, a bar for the merchants that replied within the
current exchange, and a compact table with one row per finished round (participants, refused,
failed, rejected, loss, the task metric, epsilon spent max / median with its unit). Not on a
terminal (CI, pipes, log files): exactly one plain line per round and one per notable event.

``ProgressGrid`` wraps Flower's Grid to count replies as they arrive; Flower's own
``send_and_receive`` only returns when the exchange is over, so its push/pull loop is repeated
here with a callback (the only hand-written part).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from storefed.wire import PRIMARY_METRIC


class RoundDisplay(Protocol):
    def start(self, title: str, rounds: int, task: str, unit: str) -> None: ...
    def exchange(self, label: str, done: int, total: int) -> None: ...
    def round_finished(self, row: dict, line: str) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay:
    """One line per round and per note, flushed (for CI logs and pipes)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout

    def start(self, title: str, rounds: int, task: str, unit: str) -> None:
        pass  # the command prints its own header line

    def exchange(self, label: str, done: int, total: int) -> None:
        pass

    def round_finished(self, row: dict, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        pass


def _cell(row: dict, key: str, fmt: str = "{:.4f}") -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


class RichDisplay:
    """Rounds bar + replies bar + a table of finished rounds (the last ``max_rows`` kept on screen)."""

    def __init__(self, max_rows: int = 12) -> None:
        from rich.console import Console

        self.console = Console()
        self.task, self.unit, self.max_rows = "", "", max_rows
        self.rows: list[dict] = []
        self.live = None

    def _table(self):
        from rich.table import Table

        table = Table(title=f"{self.task}: finished rounds", title_justify="left", expand=False, pad_edge=False)
        metric = PRIMARY_METRIC.get(self.task, "metric")
        for name in ("round", "trained", "refused", "failed", "rejected", "loss", metric,
                     f"eps max (per {self.unit})", "eps median"):
            table.add_column(name, justify="right")
        for row in self.rows[-self.max_rows:]:
            table.add_row(str(row["round"]), str(row.get("trained", 0)), str(row.get("refused", 0)),
                          str(row.get("failed", 0)), str(row.get("rejected", 0)), _cell(row, "train_train_loss"),
                          _cell(row, f"eval_{metric}"), _cell(row, "epsilon_total_max", "{:.3f}"),
                          _cell(row, "epsilon_total_median", "{:.3f}"))
        return table

    def _render(self):
        from rich.console import Group

        return Group(self._table(), self.progress)

    def start(self, title: str, rounds: int, task: str, unit: str) -> None:
        self.task, self.unit = task, unit
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=self.console)
        from rich.markup import escape

        self.rounds = self.progress.add_task(escape(f"{title} rounds"), total=rounds)
        self.replies = self.progress.add_task("merchants replied", total=1, visible=False)
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def exchange(self, label: str, done: int, total: int) -> None:
        self.progress.update(self.replies, description=f"  {label}: merchants replied", completed=done,
                             total=max(total, 1), visible=True)

    def round_finished(self, row: dict, line: str) -> None:
        self.rows.append(row)
        self.progress.advance(self.rounds)
        self.progress.update(self.replies, visible=False)
        if self.live is not None:
            self.live.update(self._render())

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def make_display(stream=None) -> RoundDisplay:
    """Rich on an interactive terminal, plain lines everywhere else."""
    stream = stream or sys.stdout
    if getattr(stream, "isatty", lambda: False)():
        return RichDisplay()
    return PlainDisplay(stream)


class ProgressGrid(Grid):
    """A Grid that reports each reply as it arrives (``on_reply(label, done, total)``); all else delegated."""

    def __init__(self, grid: Grid, on_reply: Callable[[str, int, int], None], pull_interval: float = 0.1) -> None:
        self._grid, self._on_reply, self._pull_interval = grid, on_reply, pull_interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        label = messages[0].metadata.message_type if messages else "exchange"
        pending = set(self._grid.push_messages(messages))
        total, replies = len(pending), []
        self._on_reply(label, 0, total)
        deadline = None if timeout is None else time.time() + timeout
        while pending and (deadline is None or time.time() < deadline):
            arrived = list(self._grid.pull_messages(pending))
            if arrived:
                replies.extend(arrived)
                pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
                self._on_reply(label, total - len(pending), total)
            if pending:
                time.sleep(self._pull_interval)
        return replies

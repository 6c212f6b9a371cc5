"""A progress bar for long operator work, drawn with click (already a dependency) on stderr."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import click

if TYPE_CHECKING:
    # click.progressbar() returns this class; click exports no public name for it.
    from click._termui_impl import ProgressBar

MIN_TOTAL: Final = 20
"""Work with fewer items than this finishes before a bar is worth drawing."""


class ProgressReporter:
    """Turns ``update(done, total)`` calls into a bar, for a terminal and enough work only.

    The bar is created on the first update, when the total is known. It goes to stderr,
    so stdout keeps only a command's result for scripts; without a terminal nothing is drawn.

    Example:
        with ProgressReporter(label="replaying") as progress:
            await replay_dead_letters(redis, publisher, progress=progress.update)
    """

    def __init__(self, *, label: str, min_total: int = MIN_TOTAL) -> None:
        """A reporter whose bar, once drawn, is titled ``label``."""
        self._label = label
        self._min_total = min_total
        self._bar: ProgressBar[int] | None = None
        self._done = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.render_finish()

    def update(self, done: int, total: int) -> None:
        """Moves the bar to ``done`` of ``total`` items."""
        if self._bar is None:
            if total < self._min_total or not sys.stderr.isatty():
                return
            self._bar = click.progressbar(length=total, label=self._label, file=sys.stderr, show_pos=True)
            self._bar.render_progress()
        self._bar.update(done - self._done)
        self._done = done

"""A Flower ``Grid`` that looks for replies promptly, the pull loop the server's strategy
(``celora_jax.flower.server_app``) waits through: Flower's own ``send_and_receive`` checks
every 3 s, which adds 1.5 s on average to every exchange."""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PromptGrid:
    """A Flower ``Grid`` whose ``send_and_receive`` checks for replies after ``first_poll``
    seconds, then ever less often up to ``max_poll`` (Flower's own waits 3 s between checks);
    everything else is the wrapped grid's.

    ``give_up``, if set, is called between checks with the ids of the messages still
    unanswered and returns those not to wait for any longer (it is not called by the
    exchanges it starts itself).
    """

    def __init__(self, grid: Grid, first_poll: float = 0.1, max_poll: float = 1.0):
        self.grid, self.first_poll, self.max_poll = grid, float(first_poll), float(max_poll)
        self.give_up: Callable[[set[str]], set[str]] | None = None

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        give_up, self.give_up = self.give_up, None
        try:
            waiting = {i for i in self.grid.push_messages(list(messages)) if i}
            deadline = None if timeout is None else time.monotonic() + timeout
            replies, poll = [], self.first_poll
            while waiting:
                pulled = list(self.grid.pull_messages(waiting))
                replies.extend(pulled)
                waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
                if waiting and give_up is not None:
                    waiting -= give_up(set(waiting))
                if not waiting or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
                poll = min(poll * 1.5, self.max_poll)
            return replies
        finally:
            self.give_up = give_up


def prompt(grid: Grid) -> PromptGrid:
    """``grid`` itself if it is already a ``PromptGrid``, else wrapped in one."""
    return grid if isinstance(grid, PromptGrid) else PromptGrid(grid)

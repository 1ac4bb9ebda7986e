"""What the router holds for clients that have not read it yet, and who pays when it is
too much.

Each connection limits its own unsent output (the slow-consumer limits in
:mod:`router.tcp` and :mod:`router.http`, and reading pauses past ``OUTPUT_PAUSE_BYTES``).
:class:`OutputBudget` bounds the sum: over all connections (``OUTPUT_BUDGET_TOTAL``) and
over the connections of one address (``OUTPUT_BUDGET_PER_ADDRESS``). Connections report
their unsent bytes when they write (only when there are any, so a healthy fan-out costs a
comparison); when a budget is crossed the budget re-reads every holder's real size (data
drains without telling anyone) and cuts off the biggest holders until it is back under.
"""

from __future__ import annotations

import logging
from typing import Dict, Protocol

log = logging.getLogger(__name__)


class OutputHolder(Protocol):
    """A connection as the budget sees it."""

    #: The per-address key (:func:`router.policy.address_key`) of its peer.
    address: str

    def unsent_bytes(self) -> int:
        """Bytes written to the transport that the peer has not taken yet."""
        ...

    def cut_off_over_budget(self) -> None:
        """Drop the client now (its buffered output is freed); it may not write again."""
        ...


class OutputBudget:
    """Unsent bytes per holder, per address and in total, with the two limits.

    Not thread-safe: used from the event loop only.
    """

    def __init__(self, total_limit: int, address_limit: int) -> None:
        self.total_limit = total_limit
        self.address_limit = address_limit
        self.total = 0
        #: Holders cut off because a budget was crossed (for /healthz and tests).
        self.cut_offs = 0
        self._sizes: Dict[OutputHolder, int] = {}
        self._by_address: Dict[str, int] = {}

    def holds(self, holder: OutputHolder) -> bool:
        """True if *holder* has unsent bytes on record."""
        return holder in self._sizes

    def by_address(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def update(self, holder: OutputHolder, size: int) -> None:
        """*holder* now has *size* unsent bytes; enforce the limits if it grew past one."""
        grew = self._record(holder, size)
        if grew and (
            self.total > self.total_limit
            or self._by_address.get(holder.address, 0) > self.address_limit
        ):
            self._enforce(holder.address)

    def forget(self, holder: OutputHolder) -> None:
        """*holder* is closed: nothing of it is held any more."""
        self._record(holder, 0)

    def refresh(self) -> None:
        """Re-read every holder's real unsent size (called from a periodic sweep)."""
        for holder in list(self._sizes):
            self._record(holder, holder.unsent_bytes())

    def _record(self, holder: OutputHolder, size: int) -> bool:
        old = self._sizes.get(holder, 0)
        if size == old:
            return False
        if size:
            self._sizes[holder] = size
        else:
            del self._sizes[holder]
        delta = size - old
        self.total += delta
        address = holder.address
        left = self._by_address.get(address, 0) + delta
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]
        return delta > 0

    def _enforce(self, address: str) -> None:
        self.refresh()
        while self._by_address.get(address, 0) > self.address_limit:
            holders = [holder for holder in self._sizes if holder.address == address]
            self._cut(max(holders, key=self._sizes.__getitem__), "its address's")
        while self.total > self.total_limit and self._sizes:
            self._cut(max(self._sizes, key=self._sizes.__getitem__), "the router's")

    def _cut(self, holder: OutputHolder, whose: str) -> None:
        size = self._sizes.get(holder, 0)
        log.warning(
            "cutting off %s: slow consumer (%d bytes unread; %s output budget is full)",
            holder.address,
            size,
            whose,
        )
        self.forget(holder)
        self.cut_offs += 1
        holder.cut_off_over_budget()

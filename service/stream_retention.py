"""How many stream entries hold a stream's newest N events (pure, no IO).

Redis trims a stream by entries (`MAXLEN`), but the retention setting counts events, and an
entry holds one inference batch: 1 event at a trickle, 32 under load. Dividing by the mean of
one write misjudges the stream whenever batch sizes change: one burst of full batches would set
`MAXLEN` 32 times too low and trim away events the workers may not have read yet. So the event
writer remembers the sizes of the newest entries it wrote to each stream, just enough of them
to hold N events, and `MAXLEN` is how many that is. Until N events were written, the missing
ones count as one-event entries, so a stream is never trimmed below N events by this estimate.
With several API replicas each counts its own entries, which sample the same traffic.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class EntriesForEvents:
    def __init__(self, events: int) -> None:
        if events < 1:
            raise ValueError(f"events must be at least 1, got {events}")
        self.events = events
        self._sizes: deque[int] = deque()
        self._total = 0

    def add(self, sizes: Iterable[int]) -> None:
        """Entries just written, oldest first, by how many events each holds."""
        for size in sizes:
            self._sizes.append(size)
            self._total += size
            # Keep the fewest newest entries that still hold `events` events.
            while self._total - self._sizes[0] >= self.events:
                self._total -= self._sizes.popleft()

    def entries(self) -> int:
        """The newest entries that hold `events` events."""
        return len(self._sizes) + max(0, self.events - self._total)

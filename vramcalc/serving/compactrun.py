"""A serving run held compactly: literal events, and each generate's decoding steps past the
traced ones as one ``DecodeSteps`` piece (its template step and the rule that makes step s).

A 13B run of 256 new tokens is 28.7 M events, 98 % of them copies of a traced step
(``servesim`` module docstring, 1): laying them out took as long as the tracing, and
``splitreplay`` replays the pieces without. ``Run.events()`` lays the whole run out: the
events ``servesim`` made before it held pieces, event for event.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

from vramcalc.memory.allocator import ALLOC, FREE

Event = tuple[int, int, int]


@dataclass(frozen=True, eq=False)
class DecodeSteps:
    """Loop steps ``traced + 1 .. wanted`` of one generate, each a copy of traced step K =
    ``traced``. Step s's events are ``template``'s in order: an ALLOC ``(1, size, slope)``
    allocates ``size + (s - K) * slope`` bytes under handle ``base + (s - K - 1) * count +
    o + 1`` (o: the template's ALLOCs before it), a FREE ``(0, back, o)`` frees allocation o
    of step s - back (of a traced step: ``traced_allocs[s - back][o]``, ``traced_sizes``
    its bytes). ``tags``: each template event's decoder layer (-1: none)."""

    template: tuple[tuple[int, int, int], ...]
    tags: tuple[int, ...]
    traced: int
    wanted: int
    base: int
    count: int
    traced_allocs: dict[int, tuple[int, ...]] = field(repr=False)
    traced_sizes: dict[int, tuple[int, ...]] = field(repr=False)

    @property
    def steps(self) -> int:
        return self.wanted - self.traced

    def __len__(self) -> int:
        return self.steps * len(self.template)

    @property
    def top(self) -> int:
        """The last handle the piece allocates (``base`` when none)."""
        return self.base + self.steps * self.count

    def handle(self, step: int, ordinal: int) -> int:
        """Allocation ``ordinal`` of loop step ``step`` (traced or not)."""
        if step > self.traced:
            return self.base + (step - self.traced - 1) * self.count + ordinal + 1
        return self.traced_allocs[step][ordinal]

    def block_bytes(self, step: int, ordinal: int) -> int:
        """The requested bytes of allocation ``ordinal`` of loop step ``step``."""
        if step > self.traced:
            return self.sizes[ordinal] + (step - self.traced) * self.slopes[ordinal]
        return self.traced_sizes[step][ordinal]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Each template ALLOC's bytes at step K (by ordinal)."""
        return tuple(a for is_alloc, a, _ in self.template if is_alloc)

    @cached_property
    def slopes(self) -> tuple[int, ...]:
        return tuple(b for is_alloc, _, b in self.template if is_alloc)

    def step_events(self, step: int) -> list[Event]:
        """The events of loop step ``step`` (> traced)."""
        grown, first = step - self.traced, self.base + (step - self.traced - 1) * self.count
        handle, out = self.handle, []
        ordinal = 0
        for is_alloc, a, b in self.template:
            if is_alloc:
                ordinal += 1
                out.append((ALLOC, first + ordinal, a + grown * b))
            else:
                out.append((FREE, handle(step - a, b), 0))
        return out

    def events(self) -> list[Event]:
        out: list[Event] = []
        for step in range(self.traced + 1, self.wanted + 1):
            out += self.step_events(step)
        return out

    def event_at(self, index: int) -> Event:
        step, position = divmod(index, len(self.template))
        return self.step_events(self.traced + 1 + step)[position]

    def alloc_index(self, handle: int) -> int | None:
        """Where in the piece ``handle`` is allocated (None: not one of its handles)."""
        if not self.base < handle <= self.top:
            return None
        step, ordinal = divmod(handle - self.base - 1, self.count)
        return step * len(self.template) + self.alloc_positions[ordinal]

    @cached_property
    def alloc_positions(self) -> list[int]:
        """Each ALLOC ordinal's position in the template."""
        return [i for i, (is_alloc, _, _) in enumerate(self.template) if is_alloc]

    def moved(self, base: int, traced_allocs: dict[int, tuple[int, ...]]) -> DecodeSteps:
        """The same steps with handles from ``base`` on and those traced handles."""
        return DecodeSteps(self.template, self.tags, self.traced, self.wanted, base, self.count,
                           traced_allocs, self.traced_sizes)  # fmt: skip


Piece = list[Event] | DecodeSteps


@dataclass
class Run:
    """Events as pieces (literal lists and ``DecodeSteps``), and markers (label, index of
    the event before which it stands)."""

    pieces: list[Piece] = field(default_factory=list)
    markers: list[tuple[str, int]] = field(default_factory=list)
    length: int = 0

    def add(self, event: Event) -> None:
        if not self.pieces or isinstance(self.pieces[-1], DecodeSteps):
            self.pieces.append([])
        self.pieces[-1].append(event)  # type: ignore[union-attr]
        self.length += 1

    def extend(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, DecodeSteps):
                self.pieces.append(piece)
                self.length += len(piece)
            elif piece:
                if not self.pieces or isinstance(self.pieces[-1], DecodeSteps):
                    self.pieces.append([])
                self.pieces[-1].extend(piece)  # type: ignore[union-attr]
                self.length += len(piece)

    def mark(self, label: str) -> None:
        self.markers.append((label, self.length))

    def __len__(self) -> int:
        return self.length

    def spans(self) -> Iterator[tuple[int, Piece]]:
        """Each piece with the index of its first event."""
        start = 0
        for piece in self.pieces:
            yield start, piece
            start += len(piece)

    def events(self) -> list[Event]:
        """The whole run, laid out."""
        out: list[Event] = []
        for piece in self.pieces:
            out += piece.events() if isinstance(piece, DecodeSteps) else piece
        return out

    def events_before(self, stop: int) -> list[Event]:
        """Events ``[0, stop)``, laid out."""
        out: list[Event] = []
        for piece in self.slice(0, stop):
            out += piece.events() if isinstance(piece, DecodeSteps) else piece
        return out

    def event_at(self, index: int) -> Event:
        for start, piece in self.spans():
            if index < start + len(piece):
                if isinstance(piece, DecodeSteps):
                    return piece.event_at(index - start)
                return piece[index - start]
        raise IndexError(index)

    def slice(self, begin: int, stop: int | None = None) -> list[Piece]:
        """The pieces of events ``[begin, stop)``; a piece cut inside is laid out."""
        stop = self.length if stop is None else min(stop, self.length)
        out: list[Piece] = []
        for start, piece in self.spans():
            end = start + len(piece)
            if end <= begin or start >= stop:
                continue
            if isinstance(piece, DecodeSteps) and begin <= start and end <= stop:
                out.append(piece)
                continue
            events = piece.events() if isinstance(piece, DecodeSteps) else piece
            out.append(events[max(begin - start, 0) : min(stop, end) - start])
        return out

    def literal_events(self, begin: int = 0) -> Iterator[tuple[int, Event]]:
        """(index, event) of the literal events from ``begin`` on (pieces left out)."""
        for start, piece in self.spans():
            if isinstance(piece, DecodeSteps) or start + len(piece) <= begin:
                continue
            skip = max(begin - start, 0)
            yield from zip(itertools.count(start + skip), itertools.islice(piece, skip, None))

    def pieces_of_steps(self) -> list[DecodeSteps]:
        return [p for p in self.pieces if isinstance(p, DecodeSteps)]

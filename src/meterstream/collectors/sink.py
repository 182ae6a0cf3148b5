"""Where collectors put what they read: the interface the pipeline implements, and two sinks.

A sink receives reading batches, collector events and command results, synchronously, from the
event loop's thread; it must not block (the Kafka sink queues, the JSON-lines sink writes
buffered). `JsonLinesSink` serves the CLI until the pipeline publishes to Kafka; `MemorySink`
keeps everything for tests and one-shot commands.
"""

from __future__ import annotations

from typing import IO, Protocol

from meterstream.collectors.batch import CollectorEvent, ReadingBatch
from meterstream.collectors.commands import CommandResult


class Sink(Protocol):
    def batch(self, batch: ReadingBatch) -> None: ...

    def event(self, event: CollectorEvent) -> None: ...

    def command(self, result: CommandResult) -> None: ...


class MemorySink:
    """Keeps every batch, event and command result in lists."""

    def __init__(self) -> None:
        self.batches: list[ReadingBatch] = []
        self.events: list[CollectorEvent] = []
        self.commands: list[CommandResult] = []

    def batch(self, batch: ReadingBatch) -> None:
        self.batches.append(batch)

    def event(self, event: CollectorEvent) -> None:
        self.events.append(event)

    def command(self, result: CommandResult) -> None:
        self.commands.append(result)

    def link_events(self, kind: str | None = None) -> list[CollectorEvent]:
        return [e for e in self.events if e.is_link and (kind is None or e.kind == kind)]


class JsonLinesSink:
    """One JSON object per line: {"type": "batch" | "link" | "meter" | "command", ...}."""

    def __init__(self, stream: IO[str], *, batches: bool = True) -> None:
        self.stream = stream
        self.write_batches = batches

    def batch(self, batch: ReadingBatch) -> None:
        if self.write_batches:
            self.stream.write(batch.to_json() + "\n")

    def event(self, event: CollectorEvent) -> None:
        self.stream.write(event.to_json() + "\n")

    def command(self, result: CommandResult) -> None:
        self.stream.write(result.to_json() + "\n")

    def flush(self) -> None:
        self.stream.flush()


class FanOut:
    """Hands everything to several sinks in order."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks

    def batch(self, batch: ReadingBatch) -> None:
        for s in self.sinks:
            s.batch(batch)

    def event(self, event: CollectorEvent) -> None:
        for s in self.sinks:
            s.event(event)

    def command(self, result: CommandResult) -> None:
        for s in self.sinks:
            s.command(result)

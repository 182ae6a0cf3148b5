"""The pipeline's topics: names, what travels on each, and how it is encoded.

Every topic is keyed by **terminal id** (UTF-8), so one partition owns a terminal's meters,
their state and their commands (DESIGN.md, "Data flow"), except `payments-in`, where payment
channels write before the payment is routed to its meter's terminal. Readings travel as binary
batches (`ReadingBatch.to_bytes`); everything a person may read is one JSON object per message.
This module is the table of contents; it holds no Kafka client.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "meterstream"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    value: str  # what a message holds
    encoding: str  # "binary" or "json"


READINGS = TopicSpec(f"{PREFIX}.readings", "one ReadingBatch per terminal per poll cycle",
                     "binary")
LINKS = TopicSpec(f"{PREFIX}.links", "collector events: link up/down/heartbeat, meter events",
                  "json")
PAYMENTS_IN = TopicSpec(f"{PREFIX}.payments-in", "payments as the channels send them (key: the "
                        "channel's transaction id)", "json")
PAYMENTS = TopicSpec(f"{PREFIX}.payments", "validated payments, routed to the meter's terminal",
                     "json")
OPERATOR = TopicSpec(f"{PREFIX}.operator", "operators' commands (who, why) for the command book",
                     "json")
COMMANDS = TopicSpec(f"{PREFIX}.commands", "remote-control commands for the collectors", "json")
RESULTS = TopicSpec(f"{PREFIX}.results", "command results from the collectors", "json")
EVENTS = TopicSpec(f"{PREFIX}.events", "alerts, dropouts, anomalies, escalations, audit records",
                   "json")
DEAD_LETTER = TopicSpec(f"{PREFIX}.dead-letter", "input that was refused, with the reason and "
                        "the original bytes", "json")

ALL = (READINGS, LINKS, PAYMENTS_IN, PAYMENTS, OPERATOR, COMMANDS, RESULTS, EVENTS,
       DEAD_LETTER)
NAMES = tuple(t.name for t in ALL)

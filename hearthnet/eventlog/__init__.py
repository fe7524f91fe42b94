"""The node's append-only, hash-chained, signed event log."""

from hearthnet.eventlog.event import Event
from hearthnet.eventlog.store import EventLog, Subscription, VerifyResult

__all__ = ["Event", "EventLog", "Subscription", "VerifyResult"]

"""Security events: one written per peer per interval, the rest counted into the next."""

from hearthnet.eventlog import EventLog
from hearthnet.eventlog.security import SecurityEvents


async def test_a_flood_costs_one_event_per_peer_per_interval(tmp_path, identity):
    now = [0.0]
    log = EventLog(tmp_path / "e.db", identity)
    try:
        sec = SecurityEvents(log, interval_s=60.0, max_peers=2, clock=lambda: now[0])
        written = [await sec.record("security.x", "mallory", {"object": "o"}) for _ in range(500)]
        assert written == [True] + [False] * 499
        assert await sec.record("security.x", "trudy", {"object": "o"})  # others unaffected
        now[0] = 61.0
        assert await sec.record("security.x", "mallory", {"object": "o"})
        events = await log.read_all("security.x")
        assert [(e.payload["peer"], e.payload["suppressed"]) for e in events] == [
            ("mallory", 0),
            ("trudy", 0),
            ("mallory", 499),  # the count rides on the next written event
        ]
        assert sec.total == {"security.x": 502}
        # Many identities: the table stays bounded (oldest forgotten first).
        for i in range(10):
            await sec.record("security.x", f"sybil{i}", {})
        assert len(sec._windows) == 2
    finally:
        await log.close()

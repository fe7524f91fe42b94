"""Reputation maths, and the table as a fold of a real SQLite event log."""

from __future__ import annotations

import pytest

from hearthnet.eventlog import EventLog
from hearthnet.fedlearn.reputation import (
    EVENT,
    INFLUENCE_CAP,
    NEUTRAL,
    PENALTY,
    REJECTED_PENALTY,
    REWARD,
    Observation,
    ReputationTable,
    fold,
    influence,
)
from hearthnet.identity import NodeIdentity


def _round(table: ReputationTable, round_id: str, *obs: Observation) -> None:
    for body in table.changes(round_id, obs):
        table.apply(body)


def kept(p: str, deviation: float = 1.0) -> Observation:
    return Observation(p, "kept", deviation, "kept")


def test_signals_move_the_score() -> None:
    t = ReputationTable(decay=1.0, ban_below=0.2)
    _round(
        t,
        "r1",
        kept("honest"),
        Observation("excluded", "excluded", 9.0, "trimmed"),
        Observation("far", "kept", 4.0, "kept but far"),  # deviation beyond the limit
        Observation("trimmed", "down_weighted", 1.2, "value kept at 40% of coordinates"),
        Observation("clipped", "clipped", 1.2, "norm 1.1× the median norm clipped to 1×"),
        Observation("scaled", "clipped", 19.0, "norm 20× the median norm clipped to 2×"),
        Observation("garbage", "rejected", 0.0, "delta_invalid"),
    )
    assert t.score("honest") == pytest.approx(NEUTRAL + REWARD)
    assert t.score("excluded") == pytest.approx(NEUTRAL - PENALTY)
    assert t.score("far") == pytest.approx(NEUTRAL - PENALTY)
    assert t.score("trimmed") == pytest.approx(NEUTRAL)
    # clipped: never rewarded; penalised when the unclipped update deviated beyond the limit
    assert t.score("clipped") == pytest.approx(NEUTRAL)
    assert t.score("scaled") == pytest.approx(NEUTRAL - PENALTY)
    assert t.score("garbage") == pytest.approx(NEUTRAL - REJECTED_PENALTY)
    assert t.score("never-seen") == NEUTRAL


def test_scores_are_bounded_and_bans_follow_the_threshold() -> None:
    t = ReputationTable(decay=1.0, ban_below=0.2)
    for i in range(12):
        _round(t, f"r{i}", kept("good"), Observation("bad", "rejected", 0.0, "x"))
    assert t.score("good") == 1.0 and t.score("bad") == 0.0
    assert t.banned("bad") and not t.banned("good")


def test_scores_decay_toward_neutral_per_recorded_round() -> None:
    t = ReputationTable(decay=0.5, ban_below=0.3)
    _round(t, "r1", Observation("bad", "rejected", 0.0, "x"))  # 0.25: banned
    assert t.banned("bad")
    _round(t, "r2", kept("other"))  # a round without "bad": its distance to neutral halves
    assert t.score("bad") == pytest.approx(NEUTRAL - REJECTED_PENALTY * 0.5)
    assert not t.banned("bad")  # the ban is served, not eternal
    _round(t, "r3", kept("bad"))  # decay first, then the reward
    assert t.score("bad") == pytest.approx(NEUTRAL - REJECTED_PENALTY * 0.25 + REWARD)


def test_a_round_is_recorded_once() -> None:
    t = ReputationTable(decay=0.9, ban_below=0.2)
    _round(t, "r1", kept("a"))
    assert t.changes("r1", [kept("a")]) == []
    assert t.score("a") == pytest.approx(NEUTRAL + REWARD)


def test_influence_is_cubic_and_capped() -> None:
    assert influence(NEUTRAL) == pytest.approx(0.125)
    assert influence(0.9) == pytest.approx(0.729)
    assert influence(1.0) == INFLUENCE_CAP
    assert influence(0.0) == 0.0


async def test_table_is_rebuilt_from_the_log(tmp_path) -> None:
    identity = NodeIdentity.generate()
    path = tmp_path / "events.sqlite3"
    log = EventLog(path, identity)
    live = ReputationTable(decay=0.9, ban_below=0.2)
    rounds = [
        ("r1", [kept("a"), Observation("b", "excluded", 7.0, "krum")]),
        ("r2", [kept("a", 0.8), Observation("c", "rejected", 0.0, "delta_invalid")]),
        ("r3", [Observation("b", "kept", 1.1, "back in line")]),
    ]
    for round_id, obs in rounds:
        for body in live.changes(round_id, obs):
            await log.append(EVENT, body)
            live.apply(body)
    await log.close()

    reopened = EventLog(path, identity)
    try:
        events = await reopened.read_all(EVENT)
        rebuilt = fold((e.payload for e in events), decay=0.9, ban_below=0.2)
    finally:
        await reopened.close()
    assert rebuilt.epoch == live.epoch == 3
    assert rebuilt.rows() == live.rows()
    assert {p: rebuilt.score(p) for p in "abc"} == {p: live.score(p) for p in "abc"}

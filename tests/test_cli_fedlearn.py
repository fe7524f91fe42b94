import argparse

import pytest

from hearthnet.cli import build_parser
from hearthnet.cli_fedlearn import draft_fields, duration
from hearthnet.errors import ErrorCode, HearthnetError


def test_durations():
    assert duration("90") == 90 and duration("90s") == 90 and duration("10m") == 600
    assert duration("1.5h") == 5400
    with pytest.raises(HearthnetError) as exc:
        duration("soon")
    assert exc.value.code is ErrorCode.BAD_REQUEST


def test_draft_from_file_overridden_by_flags(tmp_path):
    draft = tmp_path / "draft.toml"
    draft.write_text('topic = "village"\nlora_rank = 4\ndeadline_in = "5m"\nconsent_text = "ok"\n')
    args = build_parser().parse_args(
        [
            "fedlearn",
            "announce",
            "--config",
            "x",
            "--draft",
            str(draft),
            "--rank",
            "8",
            "--modules",
            "q_proj, v_proj",
            "--secure",
            "--clip-norm",
            "0",
            "--secagg-dropout",
            "0.2",
            "--bucket-size",
            "3",
        ]
    )
    fields = draft_fields(args)
    assert fields == {
        "topic": "village",
        "lora_rank": 8,
        "consent_text": "ok",
        "deadline_in_s": 300.0,
        "lora_target_modules": ["q_proj", "v_proj"],
        "secure": True,
        "clip_norm": 0.0,
        "secagg_dropout": 0.2,
        "secure_bucket_size": 3,
    }
    bad = tmp_path / "bad.toml"
    bad.write_text("topic = ")
    with pytest.raises(HearthnetError) as exc:
        draft_fields(argparse.Namespace(**{**vars(args), "draft": str(bad)}))
    assert exc.value.code is ErrorCode.MANIFEST_INVALID


def test_rule_and_rule_params_from_flags_and_file(tmp_path):
    draft = tmp_path / "draft.toml"
    draft.write_text('[aggregation]\nrule = "krum"\nparams = { f = 1 }\n')
    args = build_parser().parse_args(
        [
            "fedlearn",
            "announce",
            "--config",
            "x",
            "--draft",
            str(draft),
            "--rule-param",
            "m=3",
            "--rule-param",
            "norm_action=drop",
            "--rule-param",
            "reputation_weighted=true",
            "--min-reputation",
            "0.4",
        ]
    )
    fields = draft_fields(args)
    assert fields["aggregation"] == {
        "rule": "krum",
        "params": {"f": 1, "m": 3, "norm_action": "drop", "reputation_weighted": True},
    }
    assert fields["min_reputation"] == 0.4
    args = build_parser().parse_args(
        [
            "fedlearn",
            "announce",
            "--config",
            "x",
            "--rule",
            "trimmed_mean",
            "--rule-param",
            "beta=0.25",
        ]
    )
    assert draft_fields(args)["aggregation"] == {"rule": "trimmed_mean", "params": {"beta": 0.25}}
    with pytest.raises(HearthnetError) as exc:
        draft_fields(
            build_parser().parse_args(
                ["fedlearn", "announce", "--config", "x", "--rule-param", "beta"]
            )
        )
    assert exc.value.code is ErrorCode.MANIFEST_INVALID


def test_reputation_and_audit_are_printed(monkeypatch, capsys):
    import json

    from hearthnet import cli_fedlearn

    result = {
        "aggregated_delta_sha": "ab" * 32,
        "takeover": False,
        "aggregator": "hn" + "a" * 40,
        "n_participants": 2,
        "total_samples": 80,
        "rule": "median",
        "excluded": [],
        "audit": [
            {
                "participant": "hn" + "d" * 40,
                "action": "excluded",
                "influence": 0.02,
                "deviation": 17.5,
                "reason": "value kept at 0.7% of coordinates (median)",
            },
            {
                "participant": "hn" + "e" * 40,
                "action": "clipped",
                "influence": 1.0,
                "deviation": 2.5,
                "reason": "norm 19.6× the median norm clipped to 2×; value kept at 30%",
            },
        ],
    }
    from hearthnet.fedlearn.protocol import RoundStatus

    status = RoundStatus(
        round_id="R1",
        phase="completed",
        role="coordinator",
        stage=None,
        coordinator="hn" + "a" * 40,
        deadline="2026-01-01T00:00:00Z",
        joined=["x", "y"],
        submitted=["x", "y"],
        rejected=[],
        abort=None,
        result={"body": json.dumps(result), "signature": "00" * 64},
        train_steps=30,
        steps={"hn" + "x" * 40: 30, "hn" + "y" * 40: 18, "hn" + "z" * 40: None},
    )
    replies = {
        "experimental.fedlearn.reputation": {
            "ban_threshold": 0.2,
            "participants": [
                {
                    "participant": "hn" + "d" * 40,
                    "score": 0.35,
                    "influence": 0.043,
                    "banned": False,
                    "rounds": 1,
                    "last_round": "R1",
                }
            ],
        },
        "experimental.fedlearn.round.status": status.model_dump(mode="json"),
    }
    monkeypatch.setattr(cli_fedlearn, "_call", lambda _args, name, _body, **_kw: replies[name])
    parser = build_parser()
    for argv in (["reputation"], ["status", "R1"]):
        args = parser.parse_args(["fedlearn", *argv, "--config", "x"])
        assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "0.350" in out and "joins refused below 0.2" in out
    assert "excluded, influence 0.02, deviation 17.50 (value kept at 0.7%" in out
    assert f"audit       {'hn' + 'd' * 14}…: excluded" in out  # labelled, not "rule"
    assert "clipped, influence 1.00, deviation 2.50 (norm 19.6×" in out
    assert "audit       0 kept, 0 down_weighted, 1 clipped, 1 excluded (of 2 included)" in out
    assert f"steps       hn{'x' * 14}…: 30 of 30\n" in out
    assert f"steps       hn{'y' * 14}…: 18 of 30 (stopped early: loss plateau)" in out
    assert f"steps       hn{'z' * 14}…: not reported" in out


async def test_announce_refusals_name_the_flag_and_the_key(tmp_path, tiny_model_dir, capsys):
    """Through the real CLI and a running node: a missing consent text names --consent-text
    (not `draft field 'consent_text'`), and a node limit names its [fedlearn] key."""
    import asyncio

    from hearthnet.cli import main
    from hearthnet.identity import NodeIdentity
    from hearthnet.node import Node

    from .fedlearn.rounds import node_config_for

    ids = {"alice": NodeIdentity.generate()}
    config = node_config_for(
        tmp_path, "alice", tiny_model_dir, ids, [], fedlearn={"min_round_participants": 2}
    )
    node = Node(config, ids["alice"])
    await node.start()
    toml = tmp_path / "alice.toml"
    toml.write_text(f'[node]\nname = "alice"\ndata_dir = "{config.data_dir}"\n')
    base = ["fedlearn", "announce", "--config", str(toml), "--topic", "village"]
    try:
        cases = [
            ([], "--consent-text is required"),
            (["--consent-text", "ok", "--rank", "3"], "--rank is not valid"),
            (
                ["--consent-text", "ok", "--min-participants", "1"],
                "below this node's [fedlearn] min_round_participants 2 (announce with "
                "--min-participants 2 or more, or lower that key)",
            ),
        ]
        for extra, fragment in cases:
            code = await asyncio.to_thread(main, [*base, *extra])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("error [manifest_invalid]: "), err
            assert fragment in err, err
        assert await asyncio.to_thread(main, [*base, "--consent-text", "I share it."]) == 0
        assert "announced round" in capsys.readouterr().out
    finally:
        await node.stop()


def test_privacy_ledger_and_pending_epsilon_are_printed(monkeypatch, capsys):
    from hearthnet import cli_fedlearn
    from hearthnet.fedlearn.protocol import PrivacyOffer, PrivacyResponse, PrivacyTopic

    privacy = PrivacyResponse(
        delta=1e-5,
        budget=6.0,
        require_dp=False,
        topics=[PrivacyTopic(topic="village", rounds=["R0"], epsilon=4.7285)],
        offers=[
            PrivacyOffer(
                round_id="R1",
                topic="village",
                epsilon=4.7285,
                topic_epsilon_after=7.0774,
                refusal="over [fedlearn] dp_epsilon_budget = 6",
            ),
            PrivacyOffer(round_id="R2", topic="x", epsilon=None, topic_epsilon_after=None),
        ],
    )
    row = {"topic": "village", "coordinator": "c", "deadline": "d", "phase": "announced"}
    replies = {
        "experimental.fedlearn.privacy": privacy.model_dump(mode="json"),
        "experimental.fedlearn.round.pending": {
            "rounds": [
                {**row, "round_id": "R1", "role": "participant", "manifest": {}},
                {**row, "round_id": "R2", "role": "participant", "manifest": {}},
            ]
        },
    }
    monkeypatch.setattr(cli_fedlearn, "_call", lambda _args, name, _body, **_kw: replies[name])
    parser = build_parser()
    for argv in (["privacy"], ["pending"]):
        args = parser.parse_args(["fedlearn", *argv, "--config", "x"])
        assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "dp_epsilon_budget: 6" in out and "village" in out and "4.729" in out
    assert "R1: privacy: ε = 4.729 this round at δ = 1e-05" in out
    assert "would be at ε = 7.077 (budget 6)" in out and "refused: over" in out
    assert "R2: privacy: ε = ∞ (no DP)" in out

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
            }
        ],
    }
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
        "experimental.fedlearn.round.status": {
            "round_id": "R1",
            "phase": "completed",
            "role": "coordinator",
            "stage": None,
            "coordinator": "hn" + "a" * 40,
            "deadline": "2026-01-01T00:00:00Z",
            "joined": ["x", "y"],
            "submitted": ["x", "y"],
            "rejected": [],
            "abort": None,
            "result": {"body": json.dumps(result), "signature": "00" * 64},
        },
    }
    monkeypatch.setattr(cli_fedlearn, "_call", lambda _args, name, _body, **_kw: replies[name])
    parser = build_parser()
    for argv in (["reputation"], ["status", "R1"]):
        args = parser.parse_args(["fedlearn", *argv, "--config", "x"])
        assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "0.350" in out and "joins refused below 0.2" in out
    assert "excluded, influence 0.02, deviation 17.50 (value kept at 0.7%" in out

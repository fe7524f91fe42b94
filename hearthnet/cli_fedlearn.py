"""`hearthnet fedlearn ...`: operator commands for the running daemon's rounds and adapters
(`hearthnet llm ...` is cli_llm.py; announce's flags are cli_announce.py).

Each command is one call through the node's control socket. Output is for people by default and
JSON with `--json`. Consent is asked on the terminal; `--accept` is for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hearthnet import cli_llm
from hearthnet.cli_announce import (
    add_announce_args,
    draft_fields,
    duration,
    name_the_flag,
    rule_params,
)
from hearthnet.cli_control import call as _call
from hearthnet.cli_control import common
from hearthnet.cli_control import out as _out
from hearthnet.constants import FEDLEARN_CAP_PREFIX
from hearthnet.errors import ErrorCode, HearthnetError

# Re-exported: callers and tests import these from here.
__all__ = ["add_commands", "draft_fields", "duration", "name_the_flag", "rule_params"]

CAP = FEDLEARN_CAP_PREFIX


def cmd_announce(args: argparse.Namespace) -> int:
    """`fedlearn announce`: sign and offer a round draft built from the flags."""
    try:
        res = _call(args, CAP + "round.announce", {"draft": draft_fields(args)})
    except HearthnetError as err:
        raise name_the_flag(err) from None
    peers = ", ".join(p[:12] + "…" for p in res["offered_to"]) or "no peer"
    later = "\npeers that connect while it is open are offered it then"
    return _out(args, res, f"announced round {res['round_id']}\noffered to {peers}{later}")


def _table(rounds: list[dict[str, Any]]) -> str:
    if not rounds:
        return "no rounds"
    lines = [f"{'ROUND':26}  {'TOPIC':20}  {'ROLE':11}  {'PHASE':11}  DEADLINE"]
    for r in rounds:
        topic = r["topic"][:20]
        lines.append(
            f"{r['round_id']:26}  {topic:20}  {r['role']:11}  {r['phase']:11}  {r['deadline']}"
        )
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    """`fedlearn list`: rounds this node knows, optionally of one topic."""
    res = _call(args, CAP + "round.list", {"topic": args.topic})
    return _out(args, res, _table(res["rounds"]))


def _eps(value: float | None) -> str:
    """ε as the daemon sends it (None: ∞, the round adds no DP noise)."""
    return "∞ (no DP)" if value is None else f"{value:.3f}"


def _offer_privacy(privacy: dict[str, Any], round_id: str) -> str:
    """What joining `round_id` spends: its ε and the topic's ledger after it, at the node's δ."""
    offer = next((o for o in privacy["offers"] if o["round_id"] == round_id), None)
    if offer is None:
        return ""
    budget = privacy["budget"]
    limit = "unlimited" if budget is None else f"{budget:g}"
    text = (
        f"privacy: ε = {_eps(offer['epsilon'])} this round at δ = {privacy['delta']:g}; topic "
        f"'{offer['topic']}' would be at ε = {_eps(offer['topic_epsilon_after'])}"
        f" (budget {limit})"
    )
    if offer["refusal"]:
        text += f"\n  refused: {offer['refusal']}"
    return text


def cmd_pending(args: argparse.Namespace) -> int:
    """`fedlearn pending`: offers waiting for this operator's consent, with their ε."""
    res = _call(args, CAP + "round.pending", {})
    privacy = _call(args, CAP + "privacy", {})
    text = _table(res["rounds"])
    for r in res["rounds"]:
        text += f"\n{r['round_id']}: " + _offer_privacy(privacy, r["round_id"])
    if res["rounds"]:
        text += "\n\nreview and accept with: hearthnet fedlearn consent ROUND --config ..."
    return _out(args, res | {"privacy": privacy}, text)


def cmd_privacy(args: argparse.Namespace) -> int:
    """`fedlearn privacy`: this node's privacy ledger per topic."""
    res = _call(args, CAP + "privacy", {})
    budget = "unlimited" if res["budget"] is None else f"{res['budget']:g}"
    head = (
        f"privacy ledger at δ = {res['delta']:g}; [fedlearn] dp_epsilon_budget: {budget};"
        f" require_dp: {'yes' if res['require_dp'] else 'no'}"
    )
    if not res["topics"]:
        return _out(args, res, head + "\nno rounds joined yet")
    lines = [head, f"{'TOPIC':24}  ROUNDS  COMPOSED ε"]
    for t in res["topics"]:
        lines.append(f"{t['topic'][:24]:24}  {len(t['rounds']):<6}  {_eps(t['epsilon'])}")
    return _out(args, res, "\n".join(lines))


def cmd_status(args: argparse.Namespace) -> int:
    """`fedlearn status`: one round's phase and progress, optionally waiting for a change."""
    body = {"round_id": args.round_id, "wait": args.wait, "timeout_s": args.timeout}
    res = _call(args, CAP + "round.status", body, timeout=args.timeout + 10)
    lines = [
        f"round {res['round_id']}: {res['phase']} (this node: {res['role']}"
        + (f", {res['stage']})" if res["stage"] else ")"),
        f"coordinator {res['coordinator']}",
        f"deadline    {res['deadline']}",
        f"joined      {len(res['joined'])}   submitted {len(res['submitted'])}",
    ]
    requested = res.get("train_steps", 0)
    for who, ran in res.get("steps", {}).items():
        done = "not reported" if ran is None else f"{ran} of {requested}"
        early = " (stopped early: loss plateau)" if ran is not None and ran < requested else ""
        lines.append(f"steps       {who[:16]}…: {done}{early}")
    for rej in res["rejected"]:
        who = rej.get("participant", "?")[:16]
        lines.append(f"rejected    {who}…: {rej.get('code')}: {rej.get('reason')}")
    if res["abort"]:
        lines.append(f"aborted     {res['abort']['code']}: {res['abort']['reason']}")
    if res["result"]:
        result = json.loads(res["result"]["body"])
        lines.append(f"adapter     {result['aggregated_delta_sha']}")
        role = "takeover" if result["takeover"] else "coordinator"
        lines.append(
            f"aggregated  by {result['aggregator'][:16]}… ({role}), {result['n_participants']}"
            f" participants, {result['total_samples']} samples, rule {result['rule']}"
        )
        for ex in result["excluded"]:
            lines.append(f"excluded    {ex['participant'][:16]}…: {ex['reason']}")
        audit = result.get("audit", [])
        if audit:
            counts = [
                f"{sum(a['action'] == action for a in audit)} {action}"
                for action in ("kept", "down_weighted", "clipped", "excluded")
            ]
            lines.append(f"audit       {', '.join(counts)} (of {len(audit)} included)")
        for a in audit:
            lines.append(
                f"audit       {a['participant'][:16]}…: {a['action']}, influence "
                f"{a['influence']:.2f}, deviation {a['deviation']:.2f} ({a['reason']})"
            )
    return _out(args, res, "\n".join(lines))


def cmd_reputation(args: argparse.Namespace) -> int:
    """`fedlearn reputation`: participants' scores as this node keeps them."""
    res = _call(args, CAP + "reputation", {})
    rows = res["participants"]
    if not rows:
        return _out(args, res, f"no reputation recorded yet (ban below {res['ban_threshold']})")
    lines = [f"{'PARTICIPANT':20}  SCORE   INFLUENCE  ROUNDS  BANNED  LAST ROUND"]
    for r in rows:
        lines.append(
            f"{r['participant'][:18] + '…':20}  {r['score']:.3f}   {r['influence']:.3f}      "
            f"{r['rounds']:<6}  {'yes' if r['banned'] else 'no':6}  {r['last_round']}"
        )
    lines.append(f"(neutral 0.5; joins refused below {res['ban_threshold']})")
    return _out(args, res, "\n".join(lines))


def cmd_consent(args: argparse.Namespace) -> int:
    """`fedlearn consent`: show the round's terms, then record consent and join."""
    res = _call(args, CAP + "round.list", {})
    match = [r for r in res["rounds"] if r["round_id"] == args.round_id]
    if not match:
        raise HearthnetError(ErrorCode.BAD_REQUEST, f"round {args.round_id} is unknown here")
    m = match[0]["manifest"]
    print(
        f"Round {m['round_id']} on topic '{m['topic']}' from coordinator {m['coordinator']}\n"
        f"deadline {m['deadline']}, {m['train_steps']} training steps, rank {m['lora_rank']},"
        f" DP noise {m['dp_noise_scale']}, secure aggregation {'on' if m['secure'] else 'off'}\n\n"
        f"{_offer_privacy(_call(args, CAP + 'privacy', {}), args.round_id)}\n\n"
        f"--- consent text ---\n{m['consent_text']}\n--------------------",
        file=sys.stderr if args.json else sys.stdout,
    )
    if not args.accept:
        if not sys.stdin.isatty():
            raise HearthnetError(ErrorCode.CONSENT_REQUIRED, "no terminal to ask; pass --accept")
        answer = input("Accept and join this round? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            print("not accepted; nothing was recorded")
            return 1
    joined = _call(args, CAP + "round.join", {"round_id": args.round_id, "consent": True}, 120.0)
    then = (
        "training starts once the mask roster closes and the shares are out"
        if m["secure"]
        else "training starts now"
    )
    return _out(args, joined, f"consent recorded; joined round {args.round_id}; {then}")


def cmd_join(args: argparse.Namespace) -> int:
    """`fedlearn join`: join a round already consented to."""
    res = _call(args, CAP + "round.join", {"round_id": args.round_id, "consent": False}, 120.0)
    return _out(args, res, f"joined round {args.round_id}")


def _result_text(res: dict[str, Any]) -> str:
    result = json.loads(res["result"]["body"])
    return f"round {result['round_id']} completed: adapter {result['aggregated_delta_sha']}"


def cmd_finalize(args: argparse.Namespace) -> int:
    """`fedlearn finalize`: the coordinator aggregates now instead of at the deadline."""
    res = _call(args, CAP + "round.finalize", {"round_id": args.round_id}, 600.0)
    return _out(args, res, _result_text(res))


def cmd_takeover(args: argparse.Namespace) -> int:
    """`fedlearn takeover`: a participant finishes a round whose coordinator is gone."""
    res = _call(args, CAP + "round.finalize_takeover", {"round_id": args.round_id}, 600.0)
    return _out(args, res, _result_text(res) + " (takeover)")


def _judgement_text(ev: dict[str, Any]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "not finite" if value is None else f"{value:.{digits}f}"

    verdict = "passes" if ev["passes"] else "FAILS"
    return (
        f"held-out perplexity on this node's {ev['texts']} texts of topic {ev['topic']!r}: "
        f"base {num(ev['perplexity_base'])} -> with adapter {num(ev['perplexity_adapter'])} "
        f"(ratio {num(ev['ratio'], 3)}, allowed {ev['max_ratio']}: {verdict}; event "
        f"#{ev['event_seq']})"
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    """`fedlearn evaluate`: judge an adapter on this node's held-out text."""
    res = _call(args, CAP + "adapter.evaluate", {"sha": args.sha}, 600.0)
    return _out(args, res, _judgement_text(res))


def cmd_apply(args: argparse.Namespace) -> int:
    """`fedlearn apply`: use an adapter in a session or as the node default."""
    body = {"sha": args.sha, "scope": args.scope, "force": args.force}
    res = _call(args, CAP + "adapter.apply", body, 600.0)
    where = f"session {res['session_id']}" if res["scope"] == "session" else "the node default"
    lines = []
    if res.get("evaluation"):
        lines.append(_judgement_text(res["evaluation"]))
    elif res["scope"] == "node":
        lines.append("applied unjudged (--force): see the log's fedlearn.adapter.evaluated event")
    lines.append(f"adapter {args.sha[:16]}… applied to {where}")
    return _out(args, res, "\n".join(lines))


def cmd_adapters(args: argparse.Namespace) -> int:
    """`fedlearn adapters`: the base model and the adapters this node holds."""
    res = _call(args, "llm.adapter.list", {})
    lines = [f"base model {res['base_model_id']} ({res['base_model_sha'][:16]}…)"]
    for a in res["adapters"]:
        flags = [
            f for f, on in (("loaded", a["loaded"]), ("node default", a["node_default"])) if on
        ]
        lines.append(f"  {a['sha']}  {' '.join(flags)}")
    if not res["adapters"]:
        lines.append("  no adapters")
    return _out(args, res, "\n".join(lines))


def add_commands(sub: Any) -> None:
    """Add the `fedlearn` and `llm` subcommands to the CLI's parser."""
    fed = sub.add_parser("fedlearn", help="federated LoRA rounds (experimental.fedlearn)")
    fs = fed.add_subparsers(dest="fedlearn_command", required=True, metavar="COMMAND")

    p = fs.add_parser("announce", help="announce a round from flags or a TOML draft")
    common(p)
    add_announce_args(p)
    p.set_defaults(handler=cmd_announce)

    p = fs.add_parser("list", help="rounds this node knows")
    common(p)
    p.add_argument("--topic")
    p.set_defaults(handler=cmd_list)

    p = fs.add_parser("pending", help="rounds awaiting this operator's consent")
    common(p)
    p.set_defaults(handler=cmd_pending)

    p = fs.add_parser("status", help="a round's state")
    common(p)
    p.add_argument("round_id")
    p.add_argument("--wait", action="store_true", help="wait until the round ends here")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    p.set_defaults(handler=cmd_status)

    p = fs.add_parser("consent", help="show a round's consent text, ask, and join")
    common(p)
    p.add_argument("round_id")
    p.add_argument("--accept", action="store_true", help="accept without asking (scripts)")
    p.set_defaults(handler=cmd_consent)

    for name, handler, what in (
        ("join", cmd_join, "join a round whose consent is already recorded"),
        ("finalize", cmd_finalize, "coordinator: close a round now"),
        ("takeover", cmd_takeover, "take over a round whose coordinator is gone"),
    ):
        p = fs.add_parser(name, help=what)
        common(p)
        p.add_argument("round_id")
        p.set_defaults(handler=handler)

    p = fs.add_parser("apply", help="apply an adapter to a new session or as the node default")
    common(p)
    p.add_argument("sha")
    p.add_argument(
        "--scope",
        choices=["session", "node"],
        default="session",
        help="session (default): a new session with it; node: the node default, after the "
        "held-out check",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="node scope: apply even when the held-out check fails or cannot run",
    )
    p.set_defaults(handler=cmd_apply)

    p = fs.add_parser(
        "evaluate",
        help="held-out perplexity of this node's own text with and without an adapter",
    )
    common(p)
    p.add_argument("sha")
    p.set_defaults(handler=cmd_evaluate)

    p = fs.add_parser("reputation", help="participants' reputation as this node sees it")
    common(p)
    p.set_defaults(handler=cmd_reputation)

    p = fs.add_parser("privacy", help="this node's privacy ledger (composed ε per topic)")
    common(p)
    p.set_defaults(handler=cmd_privacy)

    p = fs.add_parser("adapters", help="the base model and the adapters this node has")
    common(p)
    p.set_defaults(handler=cmd_adapters)

    cli_llm.add_commands(sub)

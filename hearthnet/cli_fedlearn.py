"""`hearthnet fedlearn ...` and `hearthnet llm ...`: operator commands for the running daemon.

Each command is one call through the node's control socket. Output is for people by default and
JSON with `--json`. Consent is asked on the terminal; `--accept` is for scripts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from hearthnet.config import load_config
from hearthnet.constants import CONTROL_SOCKET_NAME, FEDLEARN_CAP_PREFIX
from hearthnet.control import control_call
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.rules.registry import RULES
from hearthnet.fedlearn.rules.spec import parameter_names

CAP = FEDLEARN_CAP_PREFIX
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _call(args: argparse.Namespace, name: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    config = load_config(Path(args.config))
    return control_call(config.data_dir / CONTROL_SOCKET_NAME, name, body, None, timeout)


def _out(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def duration(text: str) -> float:
    """Parse `90s` / `10m` / `2h` / `1d` for deadline flags; `bad_request` showing the format
    otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise HearthnetError(ErrorCode.BAD_REQUEST, f"not a duration: {text!r} (e.g. 90s, 10m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


_FLAG_FIELDS = {
    "topic": "topic",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "steps": "train_steps",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "seed": "seed",
    "min_participants": "min_participants",
    "max_participants": "max_participants",
    "consent_text": "consent_text",
    "dp_noise": "dp_noise_scale",
    "clip_norm": "clip_norm",
    "lora_aggregation": "lora_aggregation",
    "min_reputation": "min_reputation",
}


# draft field -> the announce flag that sets it, so the daemon's refusal names the flag
_FIELD_FLAGS = {
    **{key: "--" + flag.replace("_", "-") for flag, key in _FLAG_FIELDS.items()},
    "lora_target_modules": "--modules",
    "aggregation": "--rule",
    "secure": "--secure",
    "deadline_in_s": "--deadline-in",
}
_DRAFT_FIELD = re.compile(r"^draft field '([a-z_]+)[^']*': (.*)$", re.DOTALL)


def name_the_flag(err: HearthnetError) -> HearthnetError:
    """`draft field 'consent_text': Field required` -> `--consent-text is required (...)`: the
    daemon speaks in draft fields, the operator typed flags."""
    match = _DRAFT_FIELD.match(err.message)
    flag = _FIELD_FLAGS.get(match.group(1)) if match else None
    if match is None or flag is None:
        return err
    field, reason = match.groups()
    what = "is required" if reason == "Field required" else f"is not valid: {reason}"
    return HearthnetError(
        err.code, f"{flag} {what} (draft field '{field}'; or set it in --draft FILE)", err.detail
    )


def draft_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The draft from `--draft FILE.toml` (if given) overridden by flags."""
    fields: dict[str, Any] = {}
    if args.draft:
        try:
            fields = tomllib.loads(Path(args.draft).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise HearthnetError(ErrorCode.MANIFEST_INVALID, f"draft file: {exc}") from None
    for flag, key in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            fields[key] = value
    if args.modules:
        fields["lora_target_modules"] = [m.strip() for m in args.modules.split(",") if m.strip()]
    if args.secure:
        fields["secure"] = True
    if args.rule or args.rule_param:
        current = fields.get("aggregation", {})
        if isinstance(current, str):
            current = {"rule": current}
        params = dict(current.get("params", {}))
        params.update(rule_params(args.rule_param or []))
        aggregation: dict[str, Any] = {"params": params}
        rule = args.rule or current.get("rule")
        if rule is not None:  # unset: the manifest's default rule (fedavg)
            aggregation["rule"] = rule
        fields["aggregation"] = aggregation
    if args.deadline_in:
        fields["deadline_in_s"] = duration(args.deadline_in)
    if "deadline_in" in fields:  # TOML drafts may say deadline_in = "10m"
        fields["deadline_in_s"] = duration(str(fields.pop("deadline_in")))
    return fields


def rule_params(items: list[str]) -> dict[str, Any]:
    """`--rule-param beta=0.2 --rule-param norm_action=drop`: values are read as JSON
    (numbers, true/false), or taken as text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HearthnetError(
                ErrorCode.MANIFEST_INVALID, f"--rule-param {item!r}: use KEY=VALUE"
            )
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


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


def cmd_pending(args: argparse.Namespace) -> int:
    """`fedlearn pending`: offers waiting for this operator's consent."""
    res = _call(args, CAP + "round.pending", {})
    text = _table(res["rounds"])
    if res["rounds"]:
        text += "\n\nreview and accept with: hearthnet fedlearn consent ROUND --config ..."
    return _out(args, res, text)


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
    return _out(
        args, joined, f"consent recorded; joined round {args.round_id}; training starts now"
    )


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


def cmd_generate(args: argparse.Namespace) -> int:
    """`llm generate`: generate text with the node's model, optionally with an adapter."""
    body = {
        "prompt": args.prompt,
        "adapter_sha": args.adapter,
        "max_new_tokens": args.max_new_tokens,
    }
    res = _call(args, "llm.generate", body, 600.0)
    return _out(args, res, res["text"])


def add_commands(sub: Any) -> None:
    """Add the `fedlearn` and `llm` subcommands to the CLI's parser."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="node config file")
        p.add_argument("--json", action="store_true", help="JSON output")

    fed = sub.add_parser("fedlearn", help="federated LoRA rounds (experimental.fedlearn)")
    fs = fed.add_subparsers(dest="fedlearn_command", required=True, metavar="COMMAND")

    p = fs.add_parser("announce", help="announce a round from flags or a TOML draft")
    common(p)
    p.add_argument("--draft", help="TOML file with draft fields (flags override it)")
    p.add_argument("--topic")
    p.add_argument("--modules", help="comma-separated LoRA target modules, e.g. q_proj,v_proj")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-participants", type=int)
    p.add_argument("--max-participants", type=int)
    p.add_argument("--consent-text")
    p.add_argument("--deadline-in", help="time until the deadline, e.g. 10m")
    p.add_argument("--dp-noise", type=float)
    p.add_argument("--clip-norm", type=float)
    p.add_argument("--secure", action="store_true", help="secure (masked) aggregation")
    p.add_argument(
        "--rule",
        help=f"aggregation rule: {', '.join(RULES)} (default fedavg)",
    )
    p.add_argument(
        "--rule-param",
        action="append",
        metavar="KEY=VALUE",
        help=f"a rule parameter ({', '.join(parameter_names())}); repeatable",
    )
    p.add_argument("--min-reputation", type=float, help="refuse joins below this score")
    p.add_argument("--lora-aggregation", choices=["frozen_a", "product_svd", "fedavg_ab"])
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

    p = fs.add_parser("adapters", help="the base model and the adapters this node has")
    common(p)
    p.set_defaults(handler=cmd_adapters)

    llm = sub.add_parser("llm", help="the node's language model")
    ls = llm.add_subparsers(dest="llm_command", required=True, metavar="COMMAND")
    p = ls.add_parser("generate", help="generate a reply to a prompt")
    common(p)
    p.add_argument("prompt")
    p.add_argument("--adapter", help="adapter SHA to use (default: the node default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(handler=cmd_generate)

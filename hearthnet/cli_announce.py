"""`hearthnet fedlearn announce`'s flags: the announce options and turning them (and a TOML
`--draft`) into draft fields, and naming the flag when the daemon refuses a draft field."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.rules.registry import RULES
from hearthnet.fedlearn.rules.spec import parameter_names

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


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
    "clip_policy": "clip_policy",
    "clip_quantile": "clip_quantile",
    "clip_count_noise": "clip_count_noise",
    "lora_aggregation": "lora_aggregation",
    "min_reputation": "min_reputation",
    "secagg_dropout": "secagg_dropout",
    "secagg_corruption": "secagg_corruption",
    "bucket_size": "secure_bucket_size",
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


def add_announce_args(p: argparse.ArgumentParser) -> None:
    """The draft's flags on the `announce` parser (each maps to a field via `_FLAG_FIELDS`)."""
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
    p.add_argument(
        "--clip-policy",
        choices=["fixed", "adaptive"],
        help="adaptive: the topic's next clip follows a quantile of update norms",
    )
    p.add_argument("--clip-quantile", type=float, help="adaptive: target unclipped share γ")
    p.add_argument("--clip-count-noise", type=float, help="adaptive + DP: noise σ_b on the bit")
    p.add_argument("--secure", action="store_true", help="secure (masked) aggregation")
    p.add_argument(
        "--secagg-dropout",
        type=float,
        help="secure: share of members that may drop after the key exchange (default 0.3)",
    )
    p.add_argument(
        "--secagg-corruption",
        type=float,
        help="secure: share of members that may collude with the coordinator (default 0.1)",
    )
    p.add_argument(
        "--bucket-size",
        type=int,
        help="secure + robust rule: members per bucket; the rule runs over bucket means",
    )
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

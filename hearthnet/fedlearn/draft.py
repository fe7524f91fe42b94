"""A round as an operator asks for it: the draft, the defaults it is filled with
(`RoundManifestDraft.from_request`, then `build` for DP and clipping), and the node-specific
limits a manifest is held to (`check_against_config`) before it is signed or joined."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from hearthnet import constants as C
from hearthnet.config import FedLearnConfig
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.clipping import ClipPolicy, next_round_terms
from hearthnet.fedlearn.terms import RoundID, RoundParams, format_ts, new_round_id, validated
from hearthnet.identity import NodeIdentity

if TYPE_CHECKING:
    from hearthnet.fedlearn.manifest import RoundManifest, SignedManifest
    from hearthnet.fedlearn.state import RoundRecord


# What an announce may leave out, besides what the node fills from its model and config
# (`RoundManifestDraft.from_request`). `topic` and `consent_text` have no default: an operator
# writes them.
DRAFT_DEFAULTS: dict[str, Any] = {
    "lora_target_modules": ["q_proj", "v_proj"],
    "lora_rank": 8,
    "train_steps": 50,
    "learning_rate": 1e-3,
    "batch_size": 4,
}
DEFAULT_DEADLINE_IN_S = 3600


class RoundManifestDraft(RoundParams):
    """What an operator asks for; DP and clip default to the node's config."""

    deadline: datetime
    dp_noise_scale: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    clip_norm: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    # The clip policy (fedlearn/clipping.py); None: the node's [fedlearn] clip_*_default.
    clip_policy: ClipPolicy | None = None
    clip_quantile: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)] | None = None
    clip_learning_rate: (
        Annotated[float, Field(gt=0.0, le=C.FEDLEARN_CLIP_LEARNING_RATE_MAX, allow_inf_nan=False)]
        | None
    ) = None
    clip_count_noise: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None

    def with_carried_clip(
        self, previous: RoundManifest, bits: Iterable[float | None]
    ) -> RoundManifestDraft:
        """This draft with the clip (and DP noise, scaled alike) that adaptive clipping carries
        over from the topic's `previous` round, whose included submissions reported `bits`
        (its result lists them). A clip or noise the draft sets itself wins; another topic, a
        fixed policy or no bits leave the draft as it is."""
        if previous.topic != self.topic or self.clip_policy == "fixed":
            return self
        terms = next_round_terms(previous, bits)
        if terms is None:
            return self
        update = {
            k: v
            for k, v in terms.items()
            if getattr(self, k) is None and (k != "dp_noise_scale" or v > 0)
        }
        return self.model_copy(update=update)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> RoundManifestDraft:
        """A draft from JSON-ish fields (the CLI, a TOML file): an ISO 8601 `deadline` string and
        a bare rule name for `aggregation` are accepted; `manifest_invalid` names the field."""
        fields = dict(fields)
        if isinstance(fields.get("deadline"), str):
            try:
                fields["deadline"] = datetime.fromisoformat(fields["deadline"])
            except ValueError:
                raise HearthnetError(
                    ErrorCode.MANIFEST_INVALID, "deadline is not an ISO 8601 time"
                ) from None
        if isinstance(fields.get("aggregation"), str):
            fields["aggregation"] = {"rule": fields["aggregation"]}
        return validated(cls, fields, "draft")

    @classmethod
    def from_request(
        cls,
        fields: Mapping[str, Any],
        config: FedLearnConfig,
        base_model_id: str,
        base_model_sha: str,
        now: datetime | None = None,
    ) -> RoundManifestDraft:
        """A draft from what the operator set (`round.announce`), the rest filled here:
        `DRAFT_DEFAULTS`, this node's base model, a random seed, `[fedlearn]`
        `min_round_participants`/`max_round_participants`, `lora_alpha` = 2 × `lora_rank`, and
        a `deadline` `deadline_in_s` (default 1 h) from now. DP noise and clipping default in
        `build`. The CLI and the service pass through only what was set."""
        given = dict(fields)
        filled: dict[str, Any] = {
            **DRAFT_DEFAULTS,
            "base_model_id": base_model_id,
            "base_model_sha": base_model_sha,
            "seed": secrets.randbelow(2**31),
            "min_participants": config.min_round_participants,
            "max_participants": config.max_round_participants,
            **given,
        }
        if "lora_alpha" not in given and isinstance(filled["lora_rank"], int):
            filled["lora_alpha"] = 2 * filled["lora_rank"]
        seconds = filled.pop("deadline_in_s", DEFAULT_DEADLINE_IN_S)
        if "deadline" not in filled:
            if not isinstance(seconds, int | float) or not 0 < seconds <= C.FEDLEARN_MAX_DEADLINE_S:
                raise HearthnetError(
                    ErrorCode.MANIFEST_INVALID,
                    f"deadline_in_s is out of range: more than 0, at most "
                    f"{C.FEDLEARN_MAX_DEADLINE_S // 86400} days (--deadline-in)",
                )
            filled["deadline"] = (now or datetime.now(UTC)) + timedelta(seconds=float(seconds))
        return cls.from_fields(filled)

    def build(
        self,
        identity: NodeIdentity,
        config: FedLearnConfig,
        now: datetime | None = None,
        round_id: RoundID | None = None,
    ) -> SignedManifest:
        """Validate against `config` and the constants, then sign; `manifest_invalid` if not."""
        now = now or datetime.now(UTC)
        fields: dict[str, Any] = self.model_dump(
            exclude={"deadline", "dp_noise_scale", "clip_norm", *_CLIP_FIELDS}
        )
        noise = (
            config.dp_noise_scale_default if self.dp_noise_scale is None else self.dp_noise_scale
        )
        clip = config.clip_norm_default if self.clip_norm is None else self.clip_norm
        fields.update(
            kind=C.FEDLEARN_MANIFEST_KIND,
            round_id=round_id or new_round_id(),
            coordinator=identity.node_id,
            created_at=format_ts(now),
            deadline=format_ts(self.deadline),
            dp_noise_scale=noise,
            clip_norm=clip,
            **_clip_policy_fields(self, config, noise, clip),
        )
        from hearthnet.fedlearn.manifest import RoundManifest, SignedManifest

        manifest = RoundManifest.from_fields(fields)
        check_against_config(manifest, config, now)
        return SignedManifest.sign(manifest, identity)


def carry_topic_clip(
    draft: RoundManifestDraft, records: Iterable[RoundRecord]
) -> RoundManifestDraft:
    """`draft` with the clip adaptive clipping carries from its topic's latest round with a
    signed result among the coordinator's `records`: the bits that result lists (README.md,
    "Adaptive clipping"). Unchanged when there is none."""
    done = [r for r in records if r.result is not None and r.signed.manifest.topic == draft.topic]
    if not done:
        return draft
    last = max(done, key=lambda r: r.signed.manifest.created_at_dt)
    assert last.result is not None
    entries = json.loads(last.result.body).get("submissions", [])
    bits = [e.get("clip_bit") for e in entries if isinstance(e, dict)]
    return draft.with_carried_clip(last.signed.manifest, bits)


_CLIP_FIELDS = ("clip_policy", "clip_quantile", "clip_learning_rate", "clip_count_noise")


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _clip_policy_fields(
    draft: RoundManifestDraft, config: FedLearnConfig, noise: float, clip: float
) -> dict[str, Any]:
    """The clip policy: the draft's, else the config's. Without clipping (clip_norm 0) the
    default policy is "fixed" (nothing to adapt); without DP noise the bit is sent exactly
    (count noise 0: ε is ∞ anyway); with DP and no count noise configured, σ_b is the delta's
    noise multiplier (docs/decisions.md, issue 15)."""
    # secure rounds keep a fixed clip: their bit would have to travel masked (not built yet)
    default_policy = config.clip_policy_default if clip > 0 and not draft.secure else "fixed"
    policy = _pick(draft.clip_policy, default_policy)
    count_noise = draft.clip_count_noise
    if count_noise is None:
        count_noise = 0.0
        if noise > 0 and policy == "adaptive":
            configured = config.clip_count_noise_default
            count_noise = noise / clip if configured is None and clip > 0 else configured or 0.0
    return {
        "clip_policy": policy,
        "clip_quantile": _pick(draft.clip_quantile, config.clip_quantile_default),
        "clip_learning_rate": _pick(draft.clip_learning_rate, config.clip_learning_rate_default),
        "clip_count_noise": count_noise,
    }


def check_against_config(m: RoundManifest, config: FedLearnConfig, now: datetime) -> None:
    """The node-specific limits: a coordinator checks its draft, a participant what it joins."""
    # Each problem names the node's [fedlearn] key and the announce flag: either side can fix it.
    problems = []
    if m.lora_rank > config.max_lora_rank:
        problems.append(
            f"lora_rank {m.lora_rank} exceeds this node's [fedlearn] max_lora_rank "
            f"{config.max_lora_rank} (announce with a lower --rank, or raise that key)"
        )
    if len(m.lora_target_modules) > config.max_lora_target_modules:
        problems.append(
            f"too many lora_target_modules ({len(m.lora_target_modules)}): this node's "
            f"[fedlearn] max_lora_target_modules is {config.max_lora_target_modules} "
            "(announce with fewer --modules, or raise that key)"
        )
    if m.train_steps > config.max_train_steps:
        problems.append(
            f"train_steps {m.train_steps} exceeds this node's [fedlearn] max_train_steps "
            f"{config.max_train_steps} (announce with fewer --steps, or raise that key)"
        )
    if m.max_participants > config.max_round_participants:
        problems.append(
            f"max_participants {m.max_participants} exceeds this node's [fedlearn] "
            f"max_round_participants {config.max_round_participants} (announce with a lower "
            "--max-participants, or raise that key)"
        )
    if m.min_participants < config.min_round_participants:
        problems.append(
            f"min_participants {m.min_participants} is below this node's [fedlearn] "
            f"min_round_participants {config.min_round_participants} (announce with "
            f"--min-participants {config.min_round_participants} or more, or lower that key)"
        )
    deadline = m.deadline_at
    if deadline <= now:
        problems.append("deadline is not in the future (--deadline-in)")
    elif deadline - now > timedelta(seconds=C.FEDLEARN_MAX_DEADLINE_S):
        problems.append(
            f"deadline is too far in the future: at most {C.FEDLEARN_MAX_DEADLINE_S // 86400} "
            "days (--deadline-in)"
        )
    if problems:
        raise HearthnetError(
            ErrorCode.MANIFEST_INVALID, "; ".join(problems), {"problems": problems}
        )

"""Every `experimental.fedlearn.*` capability, declared as data (docs/architecture.md).

One row per capability: its name under the namespace, the request and response models, whether
only the node's own operator may call it (through the control socket, never a peer), and the
description the bus lists. `FedLearnService.register` binds each row to the service method named
after it (`round.finalize_takeover` -> `_round_finalize_takeover`), so adding a capability is one
row here plus that handler. Light: imports only the wire messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from hearthnet import constants as C
from hearthnet.fedlearn import protocol as P

CAP = C.FEDLEARN_CAP_PREFIX
OPERATOR = True  # local-only: the node's control socket
PEER = False  # callable by authenticated peers (the caller comes from the session)


@dataclass(frozen=True)
class Capability:
    """One capability: `name` (under `CAP`), its models, who may call it, and what it does."""

    name: str
    request: type[BaseModel]
    response: type[BaseModel]
    local_only: bool
    description: str

    @property
    def full_name(self) -> str:
        """The name on the bus, namespace included."""
        return CAP + self.name

    @property
    def handler(self) -> str:
        """The `FedLearnService` method that answers it."""
        return "_" + self.name.replace(".", "_")


CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "round.announce",
        P.AnnounceRequest,
        P.AnnounceResponse,
        OPERATOR,
        "operator: announce a round from a draft",
    ),
    Capability(
        "round.offer", P.OfferRequest, P.RoundRef, PEER, "a coordinator offers a signed round"
    ),
    Capability(
        "round.list",
        P.ListRequest,
        P.ListResponse,
        PEER,
        "rounds known here (peers: open rounds coordinated here)",
    ),
    Capability(
        "round.pending", P.Empty, P.PendingResponse, OPERATOR, "operator: rounds awaiting consent"
    ),
    Capability(
        "round.join",
        P.JoinRequest,
        P.JoinResponse,
        OPERATOR,
        "operator: consent to and join a round",
    ),
    Capability(
        "round.enroll",
        P.EnrollRequest,
        P.EnrollResponse,
        PEER,
        "coordinator: admit the caller, sign its receipt",
    ),
    Capability(
        "round.mask_key", P.MaskKeyRequest, P.Ack, PEER, "coordinator: a secure round's mask key"
    ),
    Capability(
        "round.shares",
        P.SharesRequest,
        P.Ack,
        PEER,
        "coordinator: a secure round's sealed Shamir shares",
    ),
    Capability(
        "round.confirm",
        P.ConfirmRequest,
        P.Ack,
        PEER,
        "coordinator: a survivor's signature on a secure round's unmask request",
    ),
    Capability(
        "round.reveal",
        P.RevealRequest,
        P.Ack,
        PEER,
        "coordinator: a member's reveal for a secure round's unmask",
    ),
    Capability(
        "round.submit",
        P.SubmitRequest,
        P.SubmitReceipt,
        PEER,
        "coordinator: a signed submission (delta as blob)",
    ),
    Capability(
        "round.status",
        P.StatusRequest,
        P.RoundStatus,
        OPERATOR,
        "operator: a round's state (optionally wait for its end)",
    ),
    Capability(
        "round.finalize",
        P.RoundRef,
        P.ResultPush,
        OPERATOR,
        "operator: close a round now (coordinator only)",
    ),
    Capability(
        "round.finalize_takeover",
        P.RoundRef,
        P.ResultPush,
        OPERATOR,
        "operator: take over a round whose coordinator is gone",
    ),
    Capability(
        "round.handover",
        P.HandoverRequest,
        P.HandoverResponse,
        PEER,
        "a participant's submission, for a takeover",
    ),
    Capability("round.result", P.ResultPush, P.Ack, PEER, "a signed round result (takeover)"),
    Capability(
        "reputation",
        P.Empty,
        P.ReputationResponse,
        OPERATOR,
        "operator: participants' reputation as this node sees it",
    ),
    Capability(
        "privacy",
        P.Empty,
        P.PrivacyResponse,
        OPERATOR,
        "operator: this node's privacy ledger per topic and the offers' ε",
    ),
    Capability(
        "adapter.fetch",
        P.FetchRequest,
        P.FetchResponse,
        PEER,
        "a published adapter by SHA (blob)",
    ),
    Capability(
        "adapter.evaluate",
        P.EvaluateRequest,
        P.EvaluationReport,
        OPERATOR,
        "operator: an adapter's held-out perplexity on this node's own text",
    ),
    Capability(
        "adapter.apply",
        P.ApplyRequest,
        P.ApplyReceipt,
        OPERATOR,
        "operator: apply an adapter to a session or the node",
    ),
)

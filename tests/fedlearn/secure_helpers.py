"""A secure round run in memory through every SecAgg+ step, for the secure-aggregation tests."""

from hearthnet.fedlearn.aggregation.secure import SecureFedAvgAggregator, mask_delta
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.fedlearn.secagg import (
    SecAggRound,
    confirm_bytes,
    make_bundle,
    recover_all,
    reveal,
    unmask_request,
)
from hearthnet.identity import NodeIdentity

from .conftest import MODEL_SHAPES


class Party:
    def __init__(self):
        self.identity = NodeIdentity.generate()
        self.key = MaskingKey()

    @property
    def id(self):
        return self.identity.node_id


class Round:
    """A secure round run in memory through every SecAgg+ step: roster, shares, masking,
    unmask, reveals, recovery."""

    def __init__(self, signed, parties, anns, samples, lost_before_shares=()):
        self.signed, self.parties, self.anns, self.samples = signed, parties, anns, samples
        self.plan = SecAggRound.build(signed.manifest, signed.manifest_sha, anns)
        self.bundles = {
            p.id: make_bundle(p.identity, p.key, self.plan)
            for p in parties
            if p.id not in lost_before_shares
        }
        self.shared = sorted(self.bundles)

    def mask(self, party, delta, shapes=MODEL_SHAPES):
        m = self.signed.manifest
        return mask_delta(delta, party.key, party.id, self.plan, self.shared, m, shapes)

    def aggregator(self):
        return SecureFedAvgAggregator(self.signed.manifest, MODEL_SHAPES, self.plan, self.shared)

    def unmasked(self, survivors):
        req = unmask_request(self.plan, self.shared, survivors)
        return self.recover(req)

    def confirmations(self, req):
        """Every survivor's signature on the request (the consistency round)."""
        data = confirm_bytes(req.round_id, req.sha)
        return {p.id: p.identity.sign(data).hex() for p in self.parties if p.id in req.survivors}

    def reveals(self, req):
        bundles = {p: self.bundles[p] for p in self.shared}
        sigs = self.confirmations(req)
        return {
            p.id: reveal(p.id, p.key, self.plan, bundles, req, sigs)
            for p in self.parties
            if p.id in req.survivors
        }

    def recover(self, req):
        return recover_all(self.plan, req, self.reveals(req))


def setup_round(make_manifest, n, samples=None, **overrides):
    signed = make_manifest(secure=True, clip_norm=1.0, **overrides)
    parties = [Party() for _ in range(n)]
    samples = samples or [10 + 5 * i for i in range(n)]
    anns = {
        p.identity.node_id: p.key.announce(p.identity, signed.round_id, signed.manifest_sha, s)
        for p, s in zip(parties, samples, strict=True)
    }
    return signed, parties, anns, samples

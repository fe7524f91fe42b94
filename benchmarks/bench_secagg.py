"""Secure aggregation cost: hearthnet's SecAgg+ against Flower's SecAgg+ primitives, same inputs.

For n participants, P parameters (frozen_a: B matrices of 4096 × 16 per layer) and 0 or 30 %
of the roster dropping after the share phase (the manifest declares the defaults,
`secagg_dropout` 0.3 and `secagg_corruption` 0.1; the graph degree and threshold come from
`secagg_graph.derive`, and Flower gets the same graph and threshold):
- per participant: `share_s` (split the self-mask seed and mask key, seal one share pair per
  neighbour), `mask_s` (clip, quantise, weight, add the self mask and one pairwise mask per
  neighbour), `open_s` (check the survivors' confirmations of the unmask request, open the
  neighbours' sealed shares and answer it; Flower: decrypt the k share boxes);
- at the coordinator: `unmask_s`, given the survivors' masked vectors and reveals: sum the
  vectors, check the reveals, recover every survivor's seed and every dropped member's key
  (Shamir), remove the masks and form the mean. Deserialising vectors is left out on both sides.

Flower (flwr, pinned in requirements/bench.txt) runs the steps of its SecAgg+ mod and workflow
with its own primitives: SECP384R1 ECDH + HKDF keys, Fernet-sealed shares, its Shamir over
pycryptodome (the 16-byte-padded secret or PEM private key split chunk by chunk), `quantize`
(stochastic) and `pseudo_rand_gen`, whose mask is numpy's Mersenne Twister seeded by 32 bits
XORed from the key: not a cryptographic PRG. Its shares are ad-hoc concatenated bytes (older flwr
releases pickled them); hearthnet's masks are ChaCha20 streams over Z/2^64 and its shares fixed-size
canonical bytes. Flower's unmask here removes the pairwise masks of a dropped member only towards
its surviving neighbours (the workflow loops over all of them).

The coordinator's input is the survivors' masked sum, built with each implementation's own
masking against only the dropped members (the pairwise masks between survivors cancel, so this
is the same sum at a fraction of the cost of masking every survivor in full; checked against
full masking at the smallest size). Every row checks the unmasked mean against the clipped delta.
At n = 100, P = 10M, 30 % drop-outs Flower's own masked sum would take as long as its unmask to
build, so Flower unmasks a random vector of the right shape there (its unmask does the same work
whatever the values) and that row is one repetition, unchecked for Flower.

hearthnet caps real rounds at FEDLEARN_MAX_PARTICIPANTS (32); this benchmark raises that constant
before importing the fedlearn modules so the same code runs at n = 100.

    .venv/bin/pip install --require-hashes --no-deps -r requirements/bench.txt
    .venv/bin/python -m benchmarks.bench_secagg [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import hearthnet.constants as C

C.FEDLEARN_MAX_PARTICIPANTS = 128  # type: ignore[misc]  # lifted for n = 100, see the docstring

from benchmarks._common import write_result  # noqa: E402
from benchmarks.bench_aggregation import setup as aggregation_setup  # noqa: E402
from benchmarks.bench_aggregation import setup_shapes  # noqa: E402
from hearthnet.fedlearn.aggregation.secure import (  # noqa: E402
    SecureFedAvgAggregator,
    mask_delta,
    masked_vector,
)
from hearthnet.fedlearn.lora import expected_shapes  # noqa: E402
from hearthnet.fedlearn.masks import MaskingKey, MaskKeyAnnouncement  # noqa: E402
from hearthnet.fedlearn.privacy import clip_gradient  # noqa: E402
from hearthnet.fedlearn.secagg import (  # noqa: E402
    SecAggRound,
    Unmasked,
    UnmaskRequest,
    check_confirmations,
    check_reveal,
    confirm_bytes,
    make_bundle,
    recover_all,
    reveal,
    unmask_request,
)
from hearthnet.fedlearn.shares import Reveal, ShareBundle  # noqa: E402
from hearthnet.fedlearn.submission import ParticipantSubmission  # noqa: E402
from hearthnet.identity import NodeIdentity  # noqa: E402

INSTALL = ".venv/bin/pip install --require-hashes --no-deps -r requirements/bench.txt"
try:
    from flwr.common.secure_aggregation.crypto import shamir as fl_shamir
    from flwr.common.secure_aggregation.crypto import symmetric_encryption as fl_sym
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )
except ImportError as exc:  # pragma: no cover - depends on the optional install
    sys.exit(
        f"bench_secagg compares against Flower (flwr), which is not installed ({exc}): {INSTALL}"
    )

SAMPLES = 10
# Flower's SecAggPlusWorkflow defaults, with its clipping range at hearthnet's clip_norm.
FL_CLIP, FL_QRANGE, FL_MOD, FL_MAX_WEIGHT = 1.0, 2**22, 2**32, 1000.0

Arrays = list[np.ndarray]


def best(fn: Callable[[], object], repeats: int) -> float:
    out = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - start)
    return out


# --- hearthnet -------------------------------------------------------------------------------


class Hearthnet:
    """One round's public structure, every member's keys and share bundle."""

    def __init__(self, n: int, params: int):
        self.signed, self.shapes = aggregation_setup(n, params, secure=True, clip_norm=1.0)
        m = self.signed
        self.parties = [(NodeIdentity.generate(), MaskingKey()) for _ in range(n)]
        self.keys: dict[str, MaskingKey] = {i.node_id: k for i, k in self.parties}
        self.idents: dict[str, NodeIdentity] = {i.node_id: i for i, _ in self.parties}
        anns: dict[str, MaskKeyAnnouncement] = {
            i.node_id: k.announce(i, m.round_id, m.manifest_sha, SAMPLES) for i, k in self.parties
        }
        self.plan = SecAggRound.build(m.manifest, m.manifest_sha, anns)
        self.roster: list[str] = sorted(anns)
        self.bundles: dict[str, ShareBundle] = {
            p: make_bundle(self.idents[p], self.keys[p], self.plan) for p in self.roster
        }
        self.shared = list(self.roster)
        rid = m.round_id
        self.subs = {
            p: ParticipantSubmission.create(self.idents[p], rid, p.encode(), SAMPLES, 0.0)
            for p in self.roster
        }

    def mask(self, delta: dict[str, torch.Tensor], me: str, shared: list[str]) -> np.ndarray:
        m = self.signed
        return mask_delta(delta, self.keys[me], me, self.plan, shared, m.manifest, self.shapes)

    def request(self, survivors: list[str]) -> UnmaskRequest:
        return unmask_request(self.plan, self.shared, survivors)

    def reveal(self, me: str, req: UnmaskRequest) -> Reveal:
        data = confirm_bytes(req.round_id, req.sha)
        sigs = {p: self.idents[p].sign(data).hex() for p in req.survivors}
        return reveal(me, self.keys[me], self.plan, self.bundles, req, sigs)

    def masked_sum(
        self, delta: dict[str, torch.Tensor], survivors: list[str], dropped: list[str]
    ) -> np.ndarray:
        """Σ of the survivors' masked vectors: each masked against the dropped members only."""
        gone = set(dropped)
        total: np.ndarray | None = None
        for p in survivors:
            peers = [d for d in self.plan.neighbours[p] if d in gone]
            m = self.signed.manifest
            vec = masked_vector(delta, self.keys[p], p, self.plan, peers, m, self.shapes)
            total = vec if total is None else total + vec
        assert total is not None
        return total

    def resize(self, params: int) -> None:
        """The model shapes for P parameters (the manifest, roster and shares do not change)."""
        self.shapes = setup_shapes(params)

    def remove(
        self, survivors: list[str], masked: np.ndarray, unmasked: Unmasked
    ) -> dict[str, torch.Tensor]:
        """The coordinator after recovery: sum the survivors' vectors, remove the masks, mean."""
        m = self.signed
        agg = SecureFedAvgAggregator(m.manifest, self.shapes, self.plan, self.shared)
        zeros = np.zeros_like(masked)
        for i, p in enumerate(survivors):
            agg.add(self.subs[p], masked if i == 0 else zeros)
        return agg.aggregate(unmasked)


# --- Flower ----------------------------------------------------------------------------------


class FlowerParty:
    """One client's SecAgg+ state as Flower's secaggplus_mod keeps it."""

    def __init__(self, nid: int):
        self.nid = nid
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
        self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        self.rd_seed = b""
        self.ss2: dict[int, bytes] = {}
        self.seed_shares: dict[int, bytes] = {}
        self.sk1_shares: dict[int, bytes] = {}


class Flower:
    """The same roster, graph and threshold through Flower's primitives."""

    def __init__(self, hn: Hearthnet):
        self.nid = {p: i + 1 for i, p in enumerate(hn.roster)}
        self.parties = {self.nid[p]: FlowerParty(self.nid[p]) for p in hn.roster}
        self.near = {
            self.nid[p]: sorted(self.nid[q] for q in hn.plan.neighbours[p]) for p in hn.roster
        }
        self.threshold = {self.nid[p]: hn.plan.threshold(p) for p in hn.roster}

    def share_keys(self, me: int) -> dict[int, bytes]:
        """Stage 1 (`_share_keys`): seed, Shamir shares of it and of sk1, one Fernet box per
        neighbour (the node keeps its own share pair)."""
        st = self.parties[me]
        group = sorted([me, *self.near[me]])
        st.rd_seed = os.urandom(32)
        seed_shares = fl_shamir.create_shares(st.rd_seed, self.threshold[me], len(group))
        sk1_shares = fl_shamir.create_shares(st.sk1, self.threshold[me], len(group))
        out = {}
        for idx, nid in enumerate(group):
            if nid == me:
                st.seed_shares[me], st.sk1_shares[me] = seed_shares[idx], sk1_shares[idx]
                continue
            key = fl_sym.generate_shared_key(
                bytes_to_private_key(st.sk2), bytes_to_public_key(self.parties[nid].pk2)
            )
            st.ss2[nid] = key
            plain = share_keys_plaintext_concat(me, nid, seed_shares[idx], sk1_shares[idx])
            out[nid] = fl_sym.encrypt(key, plain)
        return out

    def mask(self, me: int, params: Arrays, peers: list[int]) -> Arrays:
        """Stage 2's second half (`_collect_masked_vectors`) against `peers`."""
        st = self.parties[me]
        q_ratio = round(SAMPLES / FL_MAX_WEIGHT * FL_QRANGE)
        dq_ratio = q_ratio / FL_QRANGE
        vec = factor_combine(
            q_ratio, quantize(parameters_multiply(params, dq_ratio), FL_CLIP, FL_QRANGE)
        )
        dims = [a.shape for a in vec]
        vec = parameters_addition(vec, pseudo_rand_gen(st.rd_seed, FL_MOD, dims))
        for nid in peers:
            key = fl_sym.generate_shared_key(
                bytes_to_private_key(st.sk1), bytes_to_public_key(self.parties[nid].pk1)
            )
            mask = pseudo_rand_gen(key, FL_MOD, dims)
            add = me > nid  # Flower's sign convention
            vec = parameters_addition(vec, mask) if add else parameters_subtraction(vec, mask)
        return parameters_mod(vec, FL_MOD)

    def open_boxes(self, me: int, boxes: dict[int, bytes]) -> None:
        """Stage 2's first half for `me`'s k boxes, timed as its neighbours opening them: the
        same k Fernet decryptions and checks as `me` opening its own inbox."""
        for dst, box in boxes.items():
            st = self.parties[dst]
            src, to, _, _ = share_keys_plaintext_separate(fl_sym.decrypt(self.key2(dst, me), box))
            if src != me or to != dst or st.nid != dst:
                raise ValueError("misrouted share box")

    def key2(self, a: int, b: int) -> bytes:
        return fl_sym.generate_shared_key(
            bytes_to_private_key(self.parties[a].sk2), bytes_to_public_key(self.parties[b].pk2)
        )

    def revealed(self, owner: int, alive: set[int]) -> list[bytes]:
        """What the coordinator collects for `owner` in stage 3: its neighbours' (and its own,
        if it survived) shares of its seed if it survived, of sk1 if it dropped."""
        st = self.parties[owner]
        group = sorted([owner, *self.near[owner]])
        secret = st.rd_seed if owner in alive else st.sk1
        shares = fl_shamir.create_shares(secret, self.threshold[owner], len(group))
        return [sh for nid, sh in zip(group, shares, strict=True) if nid in alive]

    def recover(self, collected: dict[int, list[bytes]], alive: set[int]) -> dict[int, bytes]:
        """The workflow's share combination, one secret per owner with shares."""
        out = {}
        for nid, share_list in collected.items():
            if len(share_list) < self.threshold[nid]:
                raise ValueError("not enough shares")
            out[nid] = fl_shamir.combine_shares(share_list)
        return out

    def masked_sum(self, params: Arrays, alive: list[int]) -> Arrays:
        total: Arrays | None = None
        live = set(alive)
        for me in alive:
            vec = self.mask(me, params, [d for d in self.near[me] if d not in live])
            total = vec if total is None else parameters_addition(total, vec)
        assert total is not None
        return parameters_mod(total, FL_MOD)

    def add_up(self, vectors: list[Arrays]) -> Arrays:
        """The sum at the end of stage 2."""
        total = vectors[0]
        for v in vectors[1:]:
            total = parameters_addition(total, v)
        return parameters_mod(total, FL_MOD)

    def remove(self, total: Arrays, secrets: dict[int, bytes], alive: list[int]) -> Arrays:
        """`unmask_stage` after the shares are combined: remove the survivors' self masks and
        the dropped members' pairwise masks towards survivors."""
        live = set(alive)
        shape = get_parameters_shape(total)
        for nid, secret in secrets.items():
            if nid in live:
                total = parameters_subtraction(total, pseudo_rand_gen(secret, FL_MOD, shape))
                continue
            private = bytes_to_private_key(secret)
            for peer in self.near[nid]:
                if peer not in live:
                    continue
                key = fl_sym.generate_shared_key(
                    private, bytes_to_public_key(self.parties[peer].pk1)
                )
                mask = pseudo_rand_gen(key, FL_MOD, shape)
                if nid > peer:
                    total = parameters_addition(total, mask)
                else:
                    total = parameters_subtraction(total, mask)
        return total

    def finish(self, total: Arrays, alive: list[int]) -> Arrays:
        """The end of `unmask_stage`: the mean, dequantised."""
        q_total, recon = factor_extract(parameters_mod(total, FL_MOD))
        out = dequantize(recon, FL_CLIP, FL_QRANGE)
        offset = -(len(alive) - 1) * FL_CLIP
        for v in out:
            v += offset
            v *= FL_QRANGE / q_total
        return out


# --- the configurations --------------------------------------------------------------------


def sample(items: list[int], limit: int | None) -> list[int]:
    return items if limit is None else items[:: max(1, len(items) // limit)][:limit]


def run_n(n: int, ps: tuple[int, ...], repeats: int, sampled: bool) -> list[dict[str, Any]]:
    """Every (P, drop-out) row for one roster size: the roster, keys, graph and shares are
    built once (they do not depend on P)."""
    t0 = time.perf_counter()
    hn = Hearthnet(n, ps[0])
    fl = Flower(hn)
    limit = 4 if sampled else None  # Flower owners timed per kind when sampled, then scaled
    reps = 1 if sampled else repeats
    me = hn.roster[0]
    fme = fl.nid[me]
    part: dict[str, float] = {
        "hn_share_s": best(lambda: make_bundle(hn.idents[me], hn.keys[me], hn.plan), reps),
        "fl_share_s": best(lambda: fl.share_keys(fme), reps),
    }
    boxes = fl.share_keys(fme)
    part["fl_open_s"] = best(lambda: fl.open_boxes(fme, boxes), reps)
    for st in fl.parties.values():
        if st.nid != fme:
            st.rd_seed = os.urandom(32)
    print(f"n={n}: setup {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    rows = []
    for drop in (0.0, 0.3):
        dropped_n = math.floor(drop * n)
        step = max(1, n // max(1, dropped_n))
        dropped = [hn.roster[i] for i in range(n - 1, 0, -step)][:dropped_n]
        survivors = [p for p in hn.roster if p not in set(dropped)]
        req = hn.request(survivors)
        reveals: dict[str, Reveal] = {p: hn.reveal(p, req) for p in survivors}
        sigs = {p: hn.idents[p].sign(confirm_bytes(req.round_id, req.sha)).hex() for p in survivors}

        def hn_answer(req: UnmaskRequest = req, sigs: dict[str, str] = sigs) -> None:
            check_confirmations(req, sigs)  # a member checks every survivor signed this request
            hn.reveal(me, req)

        hn_open = best(hn_answer, reps)
        got: list[Unmasked] = []

        def hn_recover(
            req: UnmaskRequest = req,
            reveals: dict[str, Reveal] = reveals,
            got: list[Unmasked] = got,
        ) -> None:
            for p, rev in reveals.items():
                check_reveal(hn.plan, req, p, rev, hn.bundles)
            got[:] = [recover_all(hn.plan, req, reveals)]

        hn_recover_s = best(hn_recover, reps)
        unmasked = got[0]

        alive = [fl.nid[p] for p in survivors]
        live = set(alive)
        dead = [fl.nid[p] for p in dropped]
        owners = {"self": sample(alive, limit), "key": sample(dead, limit)}
        scale = {"self": len(alive) / max(1, len(owners["self"]))}
        scale["key"] = len(dead) / max(1, len(owners["key"]))
        fl_recover_s = 0.0
        secrets: dict[int, bytes] = {}
        for kind, chosen in owners.items():
            collected = {o: fl.revealed(o, live) for o in chosen}
            start = time.perf_counter()
            secrets.update(fl.recover(collected, live))
            fl_recover_s += (time.perf_counter() - start) * scale[kind]

        for params in ps:
            row: dict[str, Any] = {
                "n": n,
                "dropouts": dropped_n,
                "degree": hn.plan.params_of[n].degree,
                "threshold": hn.plan.params_of[n].threshold,
                **part,
                "hn_open_s": hn_open,
                "hn_recover_s": hn_recover_s,
                "fl_recover_s": fl_recover_s,
            }
            r = 1 if n >= 32 and params >= 10_000_000 else reps
            row.update(masking(hn, fl, params, survivors, dropped, unmasked, secrets, r, limit))
            row["fl_unmask_s"] = row["fl_recover_s"] + row["fl_remove_s"]
            row["hn_unmask_s"] = row["hn_recover_s"] + row["hn_remove_s"]
            for k in ("share", "mask", "open", "unmask"):
                row[f"{k}_ratio_fl_over_hn"] = round(row[f"fl_{k}_s"] / row[f"hn_{k}_s"], 2)
            row["hn_participant_s"] = row["hn_share_s"] + row["hn_mask_s"] + row["hn_open_s"]
            row["fl_participant_s"] = row["fl_share_s"] + row["fl_mask_s"] + row["fl_open_s"]
            for k in list(row):
                if k.endswith("_s"):
                    row[k] = round(row[k], 4)
            row["repetitions"] = r
            row["flower_measured"] = (
                f"Shamir on {limit} owners per kind and mask removal on {limit} secrets per "
                "kind, scaled to all; input vector random, result unchecked"
                if sampled
                else "every step, result checked"
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


_MASK_CACHE: dict[tuple[int, int], tuple[float, float]] = {}


def masking(
    hn: Hearthnet,
    fl: Flower,
    params: int,
    survivors: list[str],
    dropped: list[str],
    unmasked: Unmasked,
    secrets: dict[int, bytes],
    reps: int,
    limit: int | None,
) -> dict[str, Any]:
    """The P-dependent steps: one participant masking, the coordinator summing the survivors'
    vectors and removing the masks."""
    n = len(hn.roster)
    hn.resize(params)
    gen = torch.Generator().manual_seed(n)
    keys = expected_shapes(hn.signed.manifest, hn.shapes)
    delta = {k: torch.randn(s, generator=gen) * 1e-3 for k, s in sorted(keys.items())}
    flat = [delta[k].numpy() for k in sorted(delta)]
    clipped = clip_gradient(delta, hn.signed.manifest.clip_norm)
    me = hn.roster[0]
    fme = fl.nid[me]
    out: dict[str, Any] = {"params": sum(a.size for a in flat)}
    if (n, params) not in _MASK_CACHE:  # masking precedes drop-outs: one measurement per (n, P)
        _MASK_CACHE[n, params] = (
            best(lambda: hn.mask(delta, me, hn.shared), reps),
            best(lambda: fl.mask(fme, flat, fl.near[fme]), reps),
        )
    out["hn_mask_s"], out["fl_mask_s"] = _MASK_CACHE[n, params]

    masked = hn.masked_sum(delta, survivors, dropped)
    if n <= 10 and params <= 1_000_000:
        full = np.zeros_like(masked)
        for p in survivors:
            full += hn.mask(delta, p, hn.shared)
        assert np.array_equal(full, masked), "masked-sum shortcut differs from full masking"
    result: dict[str, torch.Tensor] = {}

    def hn_remove() -> None:
        result.update(hn.remove(survivors, masked, unmasked))

    out["hn_remove_s"] = best(hn_remove, reps)
    err = max(float((result[k] - clipped[k]).abs().max()) for k in clipped)
    assert err <= 1e-6, f"hearthnet secure mean off by {err}"
    out["hn_max_abs_err"] = err

    alive = [fl.nid[p] for p in survivors]
    if limit is None:
        fl_sum = fl.masked_sum(flat, alive)
    else:
        rng = np.random.default_rng(0)
        fl_sum = [np.array([round(SAMPLES / FL_MAX_WEIGHT * FL_QRANGE) * len(alive)])]
        fl_sum += [rng.integers(0, FL_MOD, a.shape) for a in flat]
    zeros = [np.zeros_like(a) for a in fl_sum]
    vectors = [fl_sum] + [zeros] * (len(alive) - 1)
    fl_out: Arrays = []

    def fl_remove() -> None:
        fl_out[:] = fl.finish(fl.remove(fl.add_up(vectors), secrets, alive), alive)

    if limit is None:
        out["fl_remove_s"] = best(fl_remove, reps)
        err = max(float(np.abs(o - p).max()) for o, p in zip(fl_out, flat, strict=True))
        assert err <= 1e-4, f"Flower secure mean off by {err}"
        out["fl_max_abs_err"] = err
    else:  # time the sum once, each kind of secret on its sample, and scale
        start = time.perf_counter()
        total = fl.add_up(vectors)
        t = time.perf_counter() - start
        live = set(alive)
        for kind in (True, False):
            chosen = {o: s for o, s in secrets.items() if (o in live) == kind}
            if not chosen:
                continue
            count = len(alive) if kind else len(dropped)
            start = time.perf_counter()
            total = fl.remove(total, chosen, alive)
            t += (time.perf_counter() - start) * count / len(chosen)
        start = time.perf_counter()
        fl.finish(total, alive)
        out["fl_remove_s"] = t + time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 10, P = 1M only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ns = (10,) if args.quick else (10, 32, 100)
    ps = (1_000_000,) if args.quick else (1_000_000, 10_000_000)
    rows = []
    started = time.perf_counter()
    for n in ns:
        rows += run_n(n, ps, 3, sampled=n >= 100)
    target = next(
        (r for r in rows if r["n"] == 10 and r["params"] > 9_000_000 and r["dropouts"] == 3), None
    )
    result: dict[str, Any] = {
        "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1),
        "targets": {"hn_mask_s_le_at_n10_p10m": 1.0, "hn_unmask_s_le_at_n10_p10m_3_dropouts": 2.0},
        "at_n10_p10m_3_dropouts": target,
        "notes": [
            "Flower's mask PRG is numpy's RandomState (Mersenne Twister) seeded with 32 bits: "
            "not cryptographic; hearthnet's is ChaCha20 over Z/2^64.",
            "Flower's shares are ad-hoc concatenated bytes (pickled in older flwr releases); "
            "hearthnet's are fixed-size canonical bytes.",
            "Same roster, neighbour graph and threshold for both; drop-outs after the share phase.",
            "Coordinator input is the survivors' masked sum built by masking against the dropped "
            "members only (equal to full masking, checked at n = 10, P = 1M); at n = 100, "
            "P = 10M, 30 % Flower unmasks a random vector once (see flower_input).",
            "FEDLEARN_MAX_PARTICIPANTS raised to 128 in this process to run n = 100.",
        ],
    }
    if target is not None:
        result["targets_met"] = {
            "mask": target["hn_mask_s"] <= 1.0,
            "unmask": target["hn_unmask_s"] <= 2.0,
        }
    write_result("secagg", result, args.out)


if __name__ == "__main__":
    main()

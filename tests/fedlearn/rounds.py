"""Helpers for round tests: a cluster of real nodes on loopback, each with private text."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hearthnet.config import config_from_dict
from hearthnet.constants import FEDLEARN_CAP_PREFIX as CAP
from hearthnet.identity import NodeIdentity
from hearthnet.node import Node

CORPUS = {
    "alice": "The river Niers floods the meadows near Goch every spring.",
    "bob": "Our fire brigade practises with the pumps on the first Monday of the month.",
    "carol": "Farmers in the Lower Rhine sow winter wheat in October after the beet harvest.",
    "dave": "The village choir meets in the old school hall on Thursday evenings.",
}


def write_corpus(root: Path, name: str, topic: str, lines: int = 12) -> None:
    root.mkdir(parents=True, exist_ok=True)
    base = CORPUS.get(name, CORPUS["alice"])
    text = "\n\n".join(f"{base} Note {i}: {base.lower()}" for i in range(lines))
    (root / f"{topic}.txt").write_text(text)


@dataclass
class Cluster:
    nodes: dict[str, Node]
    tmp: Path

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    async def call(self, name: str, cap: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        return await self.nodes[name].bus.call(CAP + cap, body or {}, **kw)


def node_config_for(
    tmp: Path,
    name: str,
    model_dir: Path,
    identities: dict[str, NodeIdentity],
    peers: list[str],
    llm_enabled: bool = False,
    fedlearn: dict[str, Any] | None = None,
    flag: bool = True,
    port: int = 0,
) -> Any:
    return config_from_dict(
        {
            "node": {"name": name, "data_dir": str(tmp / name), "network_id": "test-net"},
            "listen": {"host": "127.0.0.1", "port": port},
            "peers": [{"url": u, "any_node": True} for u in peers],
            "trust": {"roster": [i.node_id for i in identities.values()]},
            "experimental": {"fedlearn": flag},
            "fedlearn": {"min_round_participants": 1, **(fedlearn or {})},
            "llm": {
                "enabled": llm_enabled,
                "base_model": str(model_dir),
                "cache_dir": str(tmp / "model-cache"),
                "device": "cpu",
            },
        },
        tmp,
    )


async def start_cluster(
    tmp: Path,
    names: list[str],
    model_dir: Path,
    topic: str = "village",
    llm_enabled: tuple[str, ...] = (),
    fedlearn: dict[str, Any] | None = None,
) -> Cluster:
    identities = {n: NodeIdentity.generate() for n in names}
    nodes: dict[str, Node] = {}
    urls: list[str] = []
    for name in names:
        write_corpus(tmp / name / "training", name, topic)
        config = node_config_for(
            tmp, name, model_dir, identities, list(urls), name in llm_enabled, fedlearn
        )
        node = Node(config, identities[name])
        await node.start()
        nodes[name] = node
        urls.append(node.listen_url)
    for a in names:
        for b in names:
            if a != b:
                await nodes[a].wait_for_peer(nodes[b].node_id, 10.0)
    return Cluster(nodes, tmp)


async def stop_cluster(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        await node.stop()


def small_draft(**overrides: Any) -> dict[str, Any]:
    draft: dict[str, Any] = {
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_rank": 4,
        "lora_alpha": 8,
        "train_steps": 10,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "seed": 7,
        "min_participants": 2,
        "max_participants": 4,
        "topic": "village",
        "consent_text": "I share a LoRA delta trained on my village notes.",
        "deadline_in_s": 60,
    }
    draft.update(overrides)
    return draft


async def wait_status(cluster: Cluster, name: str, round_id: str, timeout: float = 120) -> Any:
    return await asyncio.wait_for(
        cluster.call(
            name,
            "round.status",
            {"round_id": round_id, "wait": True, "timeout_s": timeout},
            timeout=timeout + 5,
        ),
        timeout + 10,
    )

"""Training data providers (docs/architecture.md): the trainer never reaches into other storage.

`CustomFileProvider` reads operator-curated files for a topic: `<root>/<topic>.jsonl|.txt` and
`<root>/<topic>/*.jsonl|*.txt`. JSON lines hold `{"text": ...}` or chat `{"messages": [...]}`
(rendered with the model's chat template); plain text is split into paragraphs at blank lines.
Every sample counts once: `num_samples` is what was really trained on.

A share of each topic's texts (`[fedlearn] held_out_fraction`) is held out of training so that
the node can judge an adapter on text no training here has seen (`fedlearn evaluate`, `apply
--scope node`). The split is by an HMAC of each text under a per-node secret (so nobody else can
tell which texts are held out), not by position: it does not move when files are reordered or
added to, and every copy of a held-out text is held out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from hearthnet import constants as C
from hearthnet.errors import ErrorCode, HearthnetError

ChatRenderer = Callable[[list[dict[str, str]]], str]
_TOPIC_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class TrainingDataProvider(Protocol):
    """Where a node's training text for a topic comes from; the trainer and the held-out
    evaluation read only through this."""

    def samples(self, topic: str) -> list[str]:
        """The topic's training texts (the held-out slice excluded)."""

    def held_out(self, topic: str) -> list[str]:
        """The topic's held-out texts, never trained on; empty when there are too few."""


def held_out_salt(data_dir: Path) -> bytes:
    """This node's secret key for the held-out split, created once (mode 600). Secret so that
    nobody who knows or guesses a node's texts — a coordinator shaping a poisoned adapter, say —
    can tell which of them the node judges adapters on; persistent so the split never moves."""
    path = Path(data_dir) / C.FEDLEARN_HELD_OUT_SALT_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        salt = path.read_bytes()
        if len(salt) != 32:
            raise HearthnetError(
                ErrorCode.DATA_INVALID,
                f"{path} is damaged (expected 32 bytes); delete it to draw a new held-out split",
            ) from None
        return salt
    salt = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
        fh.flush()
        os.fsync(fh.fileno())
    return salt


def _held_out_key(text: str, salt: bytes) -> bytes:
    return hmac.new(b"hearthnet-held-out\0" + salt, text.encode(), hashlib.sha256).digest()


def split_held_out(
    texts: list[str], fraction: float, salt: bytes = b""
) -> tuple[list[str], list[str]]:
    """(training, held out). A text is held out when its keyed hash (HMAC with the node's
    `salt`), read as a number in [0, 1),
    is below `fraction`: a text's side never changes when others are added or reordered. A topic
    with at least FEDLEARN_HELD_OUT_MIN_SAMPLES distinct texts that none falls under holds out
    the one of smallest hash. One copy of each held-out text is returned; all leave training."""
    keys = {t: _held_out_key(t, salt) for t in set(texts)}
    distinct = sorted(keys, key=keys.__getitem__)
    if fraction <= 0 or len(distinct) < C.FEDLEARN_HELD_OUT_MIN_SAMPLES:
        return list(texts), []
    bound = int(fraction * 2**64)
    held = [t for t in distinct if int.from_bytes(keys[t][:8], "big") < bound]
    held = held[: len(distinct) - 1] or distinct[:1]
    kept = set(held)
    return [t for t in texts if t not in kept], held


def _invalid(message: str) -> HearthnetError:
    return HearthnetError(ErrorCode.DATA_INVALID, message)


class CustomFileProvider:
    """Training text from the operator's files: `<root>/<topic>.jsonl|.txt` or files in
    `<root>/<topic>/`, split by the node's secret held-out key."""

    def __init__(
        self,
        root: Path,
        render_chat: ChatRenderer | None = None,
        held_out_fraction: float = C.FEDLEARN_HELD_OUT_FRACTION_DEFAULT,
        held_out_salt: bytes = b"",
    ):
        self.root = Path(root)
        self.render_chat = render_chat
        self.held_out_fraction = held_out_fraction
        self.held_out_salt = held_out_salt

    def files(self, topic: str) -> list[Path]:
        """The topic's text files, after refusing a topic name that could escape `root`."""
        if not _TOPIC_RE.match(topic) or len(topic) > C.FEDLEARN_TOPIC_MAX_LEN:
            raise _invalid(f"invalid topic {topic[:64]!r}")
        found = [self.root / f"{topic}{ext}" for ext in (".jsonl", ".txt")]
        folder = self.root / topic
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if p.suffix in (".jsonl", ".txt"))
        return [p for p in found if p.is_file()]

    def samples(self, topic: str) -> list[str]:
        """The topic's texts less the held-out slice."""
        train, _ = split_held_out(self.read(topic), self.held_out_fraction, self.held_out_salt)
        return train

    def held_out(self, topic: str) -> list[str]:
        """The topic's held-out texts; empty (not an error) when the node has no text for the
        topic at all."""
        try:
            texts = self.read(topic)
        except HearthnetError as err:
            if err.code is ErrorCode.DATA_INVALID and not self.files(topic):
                return []  # no text for the topic at all
            raise
        return split_held_out(texts, self.held_out_fraction, self.held_out_salt)[1]

    def read(self, topic: str) -> list[str]:
        """Every text of the topic, in file order."""
        out: list[str] = []
        for path in self.files(topic):
            if path.stat().st_size > C.DATA_MAX_FILE_BYTES:
                raise _invalid(f"{path.name} is larger than {C.DATA_MAX_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8", errors="strict")
            out += self._jsonl(path, text) if path.suffix == ".jsonl" else self._paragraphs(text)
            if len(out) > C.DATA_MAX_SAMPLES:
                raise _invalid(f"topic {topic} has more than {C.DATA_MAX_SAMPLES} samples")
        if not out:
            raise _invalid(f"no training data for topic {topic!r} under {self.root}")
        return out

    @staticmethod
    def _paragraphs(text: str) -> list[str]:
        parts = (p.strip() for p in re.split(r"\n\s*\n", text))
        return [p[: C.DATA_MAX_SAMPLE_CHARS] for p in parts if p]

    def _jsonl(self, path: Path, text: str) -> list[str]:
        out = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row: Any = json.loads(line)
            except json.JSONDecodeError:
                raise _invalid(f"{path.name}:{lineno}: not JSON") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                sample = row["text"]
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                messages = row["messages"]
                if not all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    for m in messages
                ):
                    raise _invalid(f"{path.name}:{lineno}: messages need role and content")
                if self.render_chat is None:
                    raise _invalid(f"{path.name}:{lineno}: chat data needs the model's template")
                sample = self.render_chat(messages)
            else:
                raise _invalid(f"{path.name}:{lineno}: expected {{'text'}} or {{'messages'}}")
            if sample.strip():
                out.append(sample[: C.DATA_MAX_SAMPLE_CHARS])
        return out

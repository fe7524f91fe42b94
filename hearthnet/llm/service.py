"""LLMService: the node's base model, sessions with their own adapters, evaluation.

One 4-bit model serves every session. Adapters are loaded into it as named PEFT adapters and a
request selects its session's adapter (or none) under a lock, so a request never sees another
session's adapter. The node default adapter changes only by explicit operator action. All model
work is blocking: the node runs these methods in worker threads, never on its event loop.
"""

from __future__ import annotations

import functools
import math
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hearthnet import constants as C
from hearthnet.config import LLMSection
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm import model as M
from hearthnet.logs import get_logger

log = get_logger("hearthnet.llm")


@dataclass
class Session:
    """One client's conversation state: the adapter its requests run with (or none)."""

    id: str
    adapter_sha: str | None
    service: LLMService = field(repr=False)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        """Generate with this session's adapter."""
        return self.service.generate(prompt, self.adapter_sha, max_new_tokens, temperature)

    def apply_adapter(self, sha: str | None) -> None:
        """Switch this session to `sha` (a known adapter) or to the base model (None)."""
        if sha is not None:
            self.service.require_adapter(sha)
        self.adapter_sha = sha

    def close(self) -> None:
        """Forget the session, freeing its slot under LLM_MAX_SESSIONS."""
        self.service.sessions.pop(self.id, None)


class LLMService:
    """The node's base model and its sessions. It knows nothing of rounds: it reports plain
    facts about the model (`base_model_sha`, `model_shapes`, `hidden_size`, `num_layers`) and
    serves PEFT directories registered by sha; the join checks and the adapter writer are in
    `hearthnet.fedlearn` (`requirements`, `peft_adapter`), which imports this, never the
    reverse."""

    def __init__(self, llm: LLMSection, data_dir: Path):
        self.settings = llm
        self.cache_root = llm.cache_dir or data_dir / C.LLM_CACHE_DIR_NAME
        self.adapter_root = data_dir / C.ADAPTERS_DIR_NAME
        self.sessions: dict[str, Session] = {}
        self.node_default: str | None = None
        self._known: dict[str, Path] = {}  # adapter sha -> PEFT directory
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        self._model: Any = None
        self._peft: Any = None
        self.tokenizer: Any = None

    # --- loading ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Resolve and hash the base model and read its shapes; nothing is converted or loaded
        yet (a coordinator needs no more; `model_dir` converts a GGUF on first use)."""
        self.source = M.resolve_source(self.settings.base_model)
        self.base_model_sha = M.weights_sha(self.source, self.cache_root)
        self.base_model_id = self.source.model_id
        self.device = M.compute_device(self.settings.device)
        config = M.base_config(self.source, self.cache_root, self.base_model_sha)
        self.model_shapes = M.config_linear_shapes(config)
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_hidden_layers"])
        for path in sorted(self.adapter_root.glob("*/adapter_config.json")):
            self._known[path.parent.name] = path.parent

    @property
    def prepared(self) -> bool:
        """Whether the base model's identity and shapes are known (`prepare` ran)."""
        return hasattr(self, "model_shapes")

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory (`[llm] enabled = true`)."""
        return self._model is not None

    @functools.cached_property
    def model_dir(self) -> Path:
        """The Hugging Face directory to load or train from: a GGUF is converted here, once
        (~25 s for SmolLM2), when the model is first needed rather than at every start."""
        return M.model_dir(self.source, self.cache_root, self.base_model_sha)

    def load(self) -> None:
        """Prepare, then load tokenizer and 4-bit weights (slow: run off the event loop)."""
        self.prepare()
        self.tokenizer = M.load_tokenizer(self.model_dir)
        self._model = M.load_4bit(self.model_dir, self.device)
        log.info(
            "base model loaded",
            model=self.base_model_id,
            sha=self.base_model_sha[:16],
            device=self.device,
        )

    # --- adapters -----------------------------------------------------------------------------

    def register_adapter(self, sha: str, directory: Path) -> None:
        """Make the PEFT adapter in `directory` available under its SHA."""
        self._known[sha] = directory

    def require_adapter(self, sha: str) -> Path:
        """The directory of adapter `sha`; `adapter_not_found` when this node does not hold it."""
        directory = self._known.get(sha)
        if directory is None:
            raise HearthnetError(ErrorCode.ADAPTER_NOT_FOUND, f"no adapter {sha}")
        return directory

    def adapters(self) -> list[dict[str, Any]]:
        """The adapters held, whether each is loaded, and which is the node default."""
        return [
            {"sha": sha, "loaded": sha in self._loaded, "node_default": sha == self.node_default}
            for sha in sorted(self._known)
        ]

    def set_node_adapter(self, sha: str | None) -> None:
        """Operator action only: the adapter new sessions start with."""
        if sha is not None:
            self.require_adapter(sha)
        self.node_default = sha

    @staticmethod
    def _name(sha: str) -> str:
        return "a" + sha[:40]

    def _activate(self, sha: str | None) -> Any:
        """The model to run with `sha`'s adapter selected (or no adapter); lock held."""
        if sha is None:
            return None
        if sha not in self._loaded:
            if len(self._loaded) >= C.LLM_MAX_LOADED_ADAPTERS:
                raise HearthnetError(ErrorCode.INSUFFICIENT_RESOURCES, "too many adapters loaded")
            directory = str(self.require_adapter(sha))
            if self._peft is None:
                from peft import PeftModel

                self._peft = PeftModel.from_pretrained(
                    self._model, directory, adapter_name=self._name(sha)
                )
            else:
                self._peft.load_adapter(directory, adapter_name=self._name(sha))
            self._peft.eval()
            self._loaded.add(sha)
        self._peft.set_adapter(self._name(sha))
        return self._peft

    def _run(self, sha: str | None, fn: Any) -> Any:
        if self._model is None:
            raise HearthnetError(
                ErrorCode.MODEL_UNAVAILABLE,
                "the base model is not loaded on this node: set [llm] enabled = true",
            )
        with self._lock, torch.inference_mode():
            model = self._activate(sha)
            if model is None and self._peft is not None:
                with self._peft.disable_adapter():
                    return fn(self._peft)
            return fn(model if model is not None else self._model)

    # --- sessions and generation --------------------------------------------------------------

    def open_session(self, adapter_sha: str | None = None) -> Session:
        """A new session with `adapter_sha` (or the node default); bounded by LLM_MAX_SESSIONS."""
        if len(self.sessions) >= C.LLM_MAX_SESSIONS:
            raise HearthnetError(ErrorCode.INSUFFICIENT_RESOURCES, "too many open sessions")
        sha = adapter_sha if adapter_sha is not None else self.node_default
        if sha is not None:
            self.require_adapter(sha)
        session = Session(secrets.token_hex(8), sha, self)
        self.sessions[session.id] = session
        return session

    def generate(
        self,
        prompt: str,
        adapter_sha: str | None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
    ) -> str:
        """Generate a continuation of `prompt` with adapter `adapter_sha` (None: the base model)."""
        if not 1 <= max_new_tokens <= C.LLM_MAX_NEW_TOKENS:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "max_new_tokens out of range")
        if len(prompt) > C.LLM_MAX_PROMPT_CHARS:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "prompt too long")
        inputs = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        ).to(self.device)

        def run(model: Any) -> str:
            sampling = (
                {"do_sample": True, "temperature": temperature}
                if temperature > 0
                else {"do_sample": False}
            )
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
            return str(
                self.tokenizer.decode(
                    out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True
                )
            )

        return str(self._run(adapter_sha, run))

    def perplexity(self, texts: list[str], adapter_sha: str | None = None) -> float:
        """exp(mean token negative log-likelihood) over `texts`, each up to the training length."""
        if not texts or len(texts) > C.LLM_EVAL_MAX_TEXTS:
            raise HearthnetError(ErrorCode.BAD_REQUEST, "perplexity needs 1..1000 texts")

        def run(model: Any) -> float:
            total, count = 0.0, 0
            for text in texts:
                ids = self.tokenizer(
                    text, return_tensors="pt", truncation=True, max_length=C.TRAIN_MAX_SEQ_TOKENS
                )["input_ids"].to(self.device)
                if ids.shape[1] < 2:
                    continue
                loss = model(input_ids=ids, labels=ids).loss
                total += float(loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
            if count == 0:
                raise HearthnetError(ErrorCode.BAD_REQUEST, "texts are too short to evaluate")
            mean = total / count  # exp overflows above ~709.78: such a model is infinitely bad
            return math.exp(mean) if mean < C.LLM_MAX_LOG_PERPLEXITY else math.inf

        return float(self._run(adapter_sha, run))

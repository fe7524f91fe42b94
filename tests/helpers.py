"""Assertions shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hearthnet.config import LLMSection
from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm.service import LLMService


@contextmanager
def raises_code(
    code: ErrorCode, match: str | None = None
) -> Iterator[pytest.ExceptionInfo[HearthnetError]]:
    """Expect a HearthnetError and check its code too: a refusal for the wrong
    reason (another check firing first) must fail the test, not pass it."""
    with pytest.raises(HearthnetError, match=match) as info:
        yield info
    assert info.value.code is code, (
        f"expected {code.value}, got {info.value.code.value}: {info.value.message}"
    )


def loaded_service(model_dir: Path, data_dir: Path) -> LLMService:
    """An LLMService on `model_dir`, CPU, default limits, weights loaded."""
    svc = LLMService(LLMSection(base_model=model_dir, device="cpu"), data_dir)
    svc.load()
    return svc

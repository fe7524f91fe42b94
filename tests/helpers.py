"""Assertions shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from hearthnet.errors import ErrorCode, HearthnetError


@contextmanager
def raises_code(
    code: ErrorCode, match: str | None = None
) -> Iterator[pytest.ExceptionInfo[HearthnetError]]:
    """`pytest.raises(HearthnetError)` that also checks the error code: a refusal for the wrong
    reason (another check firing first) must fail the test, not pass it."""
    with pytest.raises(HearthnetError, match=match) as info:
        yield info
    assert info.value.code is code, (
        f"expected {code.value}, got {info.value.code.value}: {info.value.message}"
    )

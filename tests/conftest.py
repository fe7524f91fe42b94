import os

import pytest

from hearthnet.identity import NodeIdentity

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity.generate()

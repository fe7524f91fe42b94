"""The capability table is the one declaration: the service answers exactly its rows."""

import inspect

from pydantic import BaseModel

from hearthnet.bus.bus import FEATURE_NAMESPACES
from hearthnet.constants import FEDLEARN_CAP_PREFIX, FEDLEARN_FEATURE
from hearthnet.fedlearn.capabilities import FedLearnService
from hearthnet.fedlearn.capability_table import CAPABILITIES
from hearthnet.fedlearn.publish import FETCH_CAPABILITY


def test_every_row_has_a_handler_and_models():
    names = [cap.full_name for cap in CAPABILITIES]
    assert len(set(names)) == len(names)
    for cap in CAPABILITIES:
        assert cap.full_name.startswith(FEDLEARN_CAP_PREFIX)
        handler = getattr(FedLearnService, cap.handler)
        assert inspect.iscoroutinefunction(handler), cap.name
        assert issubclass(cap.request, BaseModel) and issubclass(cap.response, BaseModel)
        assert cap.description
    # operator actions never answer a peer
    local = {cap.name for cap in CAPABILITIES if cap.local_only}
    for name in ("round.announce", "round.join", "round.finalize", "adapter.apply"):
        assert name in local
    assert "round.submit" not in local and "adapter.fetch" not in local


def test_no_handler_without_a_row():
    rows = {cap.handler for cap in CAPABILITIES}
    prefixes = ("_round_", "_adapter_")
    singles = ("_reputation", "_privacy")
    handlers = {n for n in vars(FedLearnService) if n.startswith(prefixes) or n in singles}
    assert handlers == rows


def test_one_spelling_of_the_namespace():
    assert FEATURE_NAMESPACES == {FEDLEARN_FEATURE: FEDLEARN_CAP_PREFIX}
    assert FETCH_CAPABILITY in {cap.full_name for cap in CAPABILITIES}

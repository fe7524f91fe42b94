import pytest

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.llm.capabilities import AdapterListResponse
from tests.bus.conftest import make_node

__all__ = ["make_node"]


async def test_llm_capabilities_on_a_node(make_node, tiny_model_dir):
    a = await make_node(
        "a", llm={"enabled": True, "base_model": str(tiny_model_dir), "device": "cpu"}
    )
    b = await make_node("b", peers=[a.listen_url])
    await b.wait_for_peer(a.node_id)
    out = await a.bus.call("llm.generate", {"prompt": "Hello", "max_new_tokens": 4})
    assert isinstance(out.text, str) and out.adapter_sha is None
    again = await a.bus.call(
        "llm.generate", {"prompt": "Hello", "max_new_tokens": 4, "session_id": out.session_id}
    )
    assert again.text == out.text and again.session_id == out.session_id
    listing = await b.bus.call(
        "llm.adapter.list", peer=a.node_id, response_model=AdapterListResponse
    )
    assert listing.base_model_sha == a.llm.base_model_sha and listing.adapters == []
    with pytest.raises(HearthnetError) as exc:  # a peer cannot use this node's compute
        await b.bus.call("llm.generate", {"prompt": "x"}, peer=a.node_id)
    assert exc.value.code is ErrorCode.UNKNOWN_CAPABILITY
    with pytest.raises(HearthnetError) as exc:
        await a.bus.call("llm.session.apply_adapter", {"sha": "0" * 64})
    assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND
    with pytest.raises(HearthnetError) as exc:
        await a.bus.call("llm.adapter.set_default", {"sha": "1" * 64})
    assert exc.value.code is ErrorCode.ADAPTER_NOT_FOUND

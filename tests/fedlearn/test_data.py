import json

import pytest

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.data import CustomFileProvider, held_out_salt, split_held_out
from tests.helpers import raises_code


def test_text_jsonl_and_chat_samples(tmp_path):
    (tmp_path / "village-chat.txt").write_text("First paragraph.\n\nSecond one\nspans lines.\n\n\n")
    folder = tmp_path / "village-chat"
    folder.mkdir()
    rows = [
        {"text": "a plain sample"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    ]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (folder / "ignored.csv").write_text("x")
    provider = CustomFileProvider(tmp_path, render_chat=lambda m: "|".join(x["content"] for x in m))
    samples = provider.read("village-chat")
    assert samples == [
        "a plain sample",
        "hi|yo",
        "First paragraph.",
        "Second one\nspans lines.",
    ] or sorted(samples) == sorted(
        ["First paragraph.", "Second one\nspans lines.", "a plain sample", "hi|yo"]
    )
    assert len(samples) == 4  # counted honestly
    # Four distinct texts: one is held out of training, and never trained on.
    held = provider.held_out("village-chat")
    train = provider.samples("village-chat")
    assert len(held) == 1 and held[0] in samples
    assert sorted(train + held) == sorted(samples) and held[0] not in train


def test_held_out_split_is_by_content_and_keeps_copies_out_of_training():
    texts = [f"notice {i}: the bakery opens at {6 + i}" for i in range(200)]
    train, held = split_held_out(texts, 0.1)
    assert 8 <= len(held) <= 35 and not set(held) & set(train)
    assert len(train) + len(held) == len(texts)
    # Reordered, and with more texts added, every held-out text stays held out.
    more = [*reversed(texts), *(f"extra {i}" for i in range(50)), held[0], held[0]]
    train2, held2 = split_held_out(more, 0.1)
    assert set(held) <= set(held2)
    assert held[0] not in train2  # every copy of a held-out text leaves training
    # A small topic still holds one back; too few texts or fraction 0 hold none.
    assert len(split_held_out(texts[:4], 0.01)[1]) == 1
    assert split_held_out(texts[:3], 0.5) == (texts[:3], [])
    assert split_held_out(texts, 0.0) == (texts, [])


def test_held_out_of_a_topic_without_text_is_empty(tmp_path):
    provider = CustomFileProvider(tmp_path)
    assert provider.held_out("village") == []
    with pytest.raises(HearthnetError) as exc:
        provider.samples("village")
    assert exc.value.code is ErrorCode.DATA_INVALID


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json\n", "not JSON"),
        ('{"nope": 1}\n', "expected"),
        ('{"messages": [{"role": "user"}]}\n', "role and content"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, fragment):
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n' + content)
    with pytest.raises(HearthnetError) as exc:
        CustomFileProvider(tmp_path).samples("t")
    assert exc.value.code is ErrorCode.DATA_INVALID
    assert "t.jsonl:2" in exc.value.message and fragment in exc.value.message


def test_topic_cannot_escape_the_root(tmp_path):
    for topic in ("../etc", "a/b", "", "UPPER"):
        with raises_code(ErrorCode.DATA_INVALID):
            CustomFileProvider(tmp_path).samples(topic)
    with raises_code(ErrorCode.DATA_INVALID) as exc:
        CustomFileProvider(tmp_path).samples("empty")
    assert "no training data" in exc.value.message
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with raises_code(ErrorCode.DATA_INVALID) as exc:
        CustomFileProvider(tmp_path).samples("c")  # chat data without a template
    assert "template" in exc.value.message


def test_the_split_is_keyed_by_a_secret_per_node_salt(tmp_path):
    texts = [f"notice {i}: the bakery opens at {6 + i}" for i in range(200)]
    salt = held_out_salt(tmp_path)
    assert len(salt) == 32 and (tmp_path / "held-out.salt").stat().st_mode & 0o777 == 0o600
    assert held_out_salt(tmp_path) == salt  # persistent: the split never moves
    mine = split_held_out(texts, 0.1, salt)[1]
    assert mine == split_held_out(texts, 0.1, salt)[1]
    # Someone who knows the texts but not the salt cannot compute the split.
    assert mine != split_held_out(texts, 0.1)[1]
    (tmp_path / "other").mkdir()
    assert mine != split_held_out(texts, 0.1, held_out_salt(tmp_path / "other"))[1]
    (tmp_path / "held-out.salt").write_bytes(b"short")
    with raises_code(ErrorCode.DATA_INVALID):
        held_out_salt(tmp_path)

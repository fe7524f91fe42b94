import json

import pytest

from hearthnet.errors import ErrorCode, HearthnetError
from hearthnet.fedlearn.data import CustomFileProvider


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
    samples = provider.samples("village-chat")
    assert samples == [
        "a plain sample",
        "hi|yo",
        "First paragraph.",
        "Second one\nspans lines.",
    ] or sorted(samples) == sorted(
        ["First paragraph.", "Second one\nspans lines.", "a plain sample", "hi|yo"]
    )
    assert len(samples) == 4  # counted honestly


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
        with pytest.raises(HearthnetError):
            CustomFileProvider(tmp_path).samples(topic)
    with pytest.raises(HearthnetError) as exc:
        CustomFileProvider(tmp_path).samples("empty")
    assert "no training data" in exc.value.message
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(HearthnetError) as exc:
        CustomFileProvider(tmp_path).samples("c")  # chat data without a template
    assert "template" in exc.value.message

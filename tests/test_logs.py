import json

import pytest
import structlog

from hearthnet.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging():
    """These tests point structlog at pytest's captured stderr, which closes after each test:
    put the defaults back, or every later test that logs fails writing to a closed file."""
    yield
    structlog.reset_defaults()


def test_json_lines_and_secret_redaction(capsys):
    configure_logging("json", "info")
    get_logger("t").info("hello", peer="hnabc", private_key="SECRET-1", mask_seed="SECRET-2")
    get_logger("t").debug("hidden at info level")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "hello" and record["peer"] == "hnabc"
    assert record["level"] == "info" and "timestamp" in record
    assert "SECRET" not in lines[0]


def test_console_format_is_human_readable(capsys):
    configure_logging("console", "debug")
    get_logger("t").debug("listening", port=7400)
    err = capsys.readouterr().err
    assert "listening" in err and "port=7400" in err
    assert not err.lstrip().startswith("{")

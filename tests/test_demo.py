"""The demo's own verdict and clean-up (issue 12): a broken outcome is a failure, never "done"."""

import pytest

from hearthnet.demo import check_outcome, clean_up, main


def test_an_adapter_that_does_not_lower_perplexity_fails_the_demo():
    check_outcome(256.45, 3.0, "A notice.", "Hearthdale notice: the bread market …")
    for base, tuned in ((256.45, 46415743.75), (256.45, 256.45), (256.45, float("nan"))):
        with pytest.raises(SystemExit) as exc:
            check_outcome(base, tuned, "A notice.", "Hearthdale notice.")
        assert str(exc.value.code).startswith("demo FAILED: ")
    with pytest.raises(SystemExit) as exc:
        check_outcome(256.45, 3.0, "A notice.", "  \n")
    assert "generation with the adapter is empty" in str(exc.value.code)


def _workdir(tmp_path):
    work = tmp_path / "demo"
    (work / "models" / "sha").mkdir(parents=True)
    (work / "models" / "sha" / "model.safetensors").write_bytes(b"\0" * 1000)
    (work / "alice").mkdir()
    (work / "alice.log").write_text("node started\n")
    return work


def test_clean_up_removes_its_own_directory_unless_kept(tmp_path):
    work = _workdir(tmp_path)
    assert "kept" in clean_up(work, own=True, keep=True, ok=True) and work.exists()
    assert "kept" in clean_up(work, own=False, keep=False, ok=True) and work.exists()
    failed = clean_up(work, own=True, keep=False, ok=False)  # the logs explain a failure
    assert "node logs" in failed and (work / "alice.log").exists()
    assert not (work / "models").exists()
    assert "removed" in clean_up(work, own=True, keep=False, ok=True) and not work.exists()


def test_a_workdir_that_is_not_the_demos_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["--workdir", str(tmp_path)])
    assert "is not empty" in str(exc.value.code)
    assert (tmp_path / "precious.txt").read_text() == "mine"

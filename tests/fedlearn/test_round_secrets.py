"""Round secrets sealed at rest (fedlearn/round_secrets.py): they open only on the node and
round that sealed them, and anything but the regular file this node wrote is refused cleanly."""

import os

from hearthnet.errors import ErrorCode
from hearthnet.fedlearn import round_secrets
from hearthnet.fedlearn.masks import MaskingKey
from hearthnet.identity import NodeIdentity
from tests.helpers import raises_code

RID = "01JWM2P3T9Q8XKZ4N6V7B5C0DE"
OTHER = "01JWM2P3T9Q8XKZ4N6V7B5C0DF"
SHA = "ab" * 32


def test_sealed_secrets_round_trip_and_open_nowhere_else(tmp_path):
    me, other = NodeIdentity.generate(), NodeIdentity.generate()
    key = MaskingKey()
    round_secrets.seal(tmp_path, me, RID, SHA, key)
    path = tmp_path / round_secrets.DIR_NAME / f"{RID}.sealed"
    assert path.stat().st_mode & 0o777 == 0o600
    assert key.to_bytes() not in path.read_bytes()  # sealed, not stored
    back = round_secrets.unseal(tmp_path, me, RID, SHA)
    assert back is not None and back.to_bytes() == key.to_bytes()
    assert round_secrets.unseal(tmp_path, me, OTHER, SHA) is None
    with raises_code(ErrorCode.EVENTLOG_INVALID, "remove"):
        round_secrets.unseal(tmp_path, other, RID, SHA)  # another node's key
    with raises_code(ErrorCode.EVENTLOG_INVALID):
        round_secrets.unseal(tmp_path, me, RID, "cd" * 32)  # bound to the manifest
    os.rename(path, path.with_name(f"{OTHER}.sealed"))
    with raises_code(ErrorCode.EVENTLOG_INVALID):
        round_secrets.unseal(tmp_path, me, OTHER, SHA)  # bound to the round
    round_secrets.discard(tmp_path, OTHER)
    assert not list((tmp_path / round_secrets.DIR_NAME).iterdir())


def test_a_symlink_fifo_or_directory_is_refused_not_followed(tmp_path):
    me = NodeIdentity.generate()
    folder = tmp_path / round_secrets.DIR_NAME
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    target = tmp_path / "elsewhere"
    round_secrets.seal(tmp_path, me, RID, SHA, MaskingKey())
    os.rename(folder / f"{RID}.sealed", target)
    (folder / f"{RID}.sealed").symlink_to(target)
    with raises_code(ErrorCode.EVENTLOG_INVALID):
        round_secrets.unseal(tmp_path, me, RID, SHA)
    (folder / f"{RID}.sealed").unlink()
    os.mkfifo(folder / f"{RID}.sealed")
    with raises_code(ErrorCode.EVENTLOG_INVALID):  # and does not block
        round_secrets.unseal(tmp_path, me, RID, SHA)
    (folder / f"{RID}.sealed").unlink()
    (folder / f"{RID}.sealed").mkdir()
    with raises_code(ErrorCode.EVENTLOG_INVALID):
        round_secrets.unseal(tmp_path, me, RID, SHA)


def test_a_secrets_folder_others_can_read_or_a_symlinked_one_is_refused(tmp_path):
    me = NodeIdentity.generate()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / round_secrets.DIR_NAME).symlink_to(tmp_path / "elsewhere")
    with raises_code(ErrorCode.KEY_FILE_INSECURE, "chmod 700"):
        round_secrets.seal(tmp_path, me, RID, SHA, MaskingKey())
    (tmp_path / round_secrets.DIR_NAME).unlink()
    (tmp_path / round_secrets.DIR_NAME).mkdir(mode=0o755)
    (tmp_path / round_secrets.DIR_NAME).chmod(0o755)
    with raises_code(ErrorCode.KEY_FILE_INSECURE):
        round_secrets.seal(tmp_path, me, RID, SHA, MaskingKey())

"""Every limit hearthnet enforces, in one place.

Validation, config defaults and documentation all read these names; no limit is written anywhere
else. The FEDLEARN_* values are those of spec M28 §7.
"""

from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB

# --- fedlearn (spec M28 §7) -------------------------------------------------------------------
FEDLEARN_MIN_LORA_RANK: Final = 4
FEDLEARN_MAX_LORA_RANK: Final = 64
FEDLEARN_MAX_LORA_TARGET_MODULES: Final = 8
FEDLEARN_MAX_TRAIN_STEPS: Final = 1000
FEDLEARN_MAX_PARTICIPANTS: Final = 32
FEDLEARN_MIN_PARTICIPANTS: Final = 3
FEDLEARN_DP_NOISE_SCALE_DEFAULT: Final = 0.0
FEDLEARN_CLIP_NORM_DEFAULT: Final = 1.0
FEDLEARN_SUBMISSION_MAX_BYTES: Final = 64 * MIB
FEDLEARN_TRAINING_VRAM_BUDGET_MB_DEFAULT: Final = 8192
FEDLEARN_TRAINING_DISK_BUDGET_MB_DEFAULT: Final = 4096
# Absolute ceilings for the operator-set budgets, so a typo cannot disable the resource check.
FEDLEARN_TRAINING_BUDGET_MB_CEILING: Final = 1024 * 1024

# --- identity and signing ----------------------------------------------------------------------
NODE_ID_PREFIX: Final = "hn"
NODE_ID_CHECKSUM_BYTES: Final = 4
KEY_FILE_NAME: Final = "node.key"
KEY_FILE_MAX_BYTES: Final = 4 * KIB
# Largest signed JSON document we parse (manifests, receipts, control frames).
SIGNED_JSON_MAX_BYTES: Final = 1 * MIB
# JSON nesting deeper than this is refused before parsing deeper structures.
JSON_MAX_DEPTH: Final = 32

# --- config ------------------------------------------------------------------------------------
CONFIG_FILE_NAME: Final = "node.toml"
CONFIG_FILE_MAX_BYTES: Final = 256 * KIB
NODE_NAME_MAX_LEN: Final = 64
NETWORK_ID_MAX_LEN: Final = 64
DEFAULT_NETWORK_ID: Final = "hearthnet-local"
DEFAULT_LISTEN_HOST: Final = "127.0.0.1"
DEFAULT_LISTEN_PORT: Final = 7400
MAX_PEERS: Final = 256
MAX_ROSTER_SIZE: Final = 4096

# --- event log ---------------------------------------------------------------------------------
EVENTLOG_FILE_NAME: Final = "events.sqlite3"
EVENT_TYPE_MAX_LEN: Final = 128
EVENT_PAYLOAD_MAX_BYTES: Final = 256 * KIB
EVENTLOG_READ_MAX_ROWS: Final = 10_000
EVENTLOG_SUBSCRIBER_QUEUE_MAX: Final = 1024
EVENTLOG_MAX_SUBSCRIBERS: Final = 256
# SQLite waits this long for a lock before reporting the database busy.
EVENTLOG_BUSY_TIMEOUT_S: Final = 10.0
GENESIS_HASH: Final = "0" * 64

# --- blob store --------------------------------------------------------------------------------
BLOBS_DIR_NAME: Final = "blobs"
# A blob is at most one submission or one aggregated adapter.
BLOB_MAX_BYTES: Final = FEDLEARN_SUBMISSION_MAX_BYTES
BLOB_READ_CHUNK_BYTES: Final = 1 * MIB

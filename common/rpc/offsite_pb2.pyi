from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelCardRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EmulatorOffer(_message.Message):
    __slots__ = ("id", "method", "layout", "parameters", "bytes", "files", "report_card")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    REPORT_CARD_FIELD_NUMBER: _ClassVar[int]
    id: str
    method: str
    layout: str
    parameters: int
    bytes: int
    files: _containers.RepeatedScalarFieldContainer[str]
    report_card: ReportCard
    def __init__(self, id: _Optional[str] = ..., method: _Optional[str] = ..., layout: _Optional[str] = ..., parameters: _Optional[int] = ..., bytes: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ..., report_card: _Optional[_Union[ReportCard, _Mapping]] = ...) -> None: ...

class ReportCard(_message.Message):
    __slots__ = ("perplexity", "full_perplexity", "perplexity_ratio", "windows")
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    FULL_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_RATIO_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    perplexity: float
    full_perplexity: float
    perplexity_ratio: float
    windows: int
    def __init__(self, perplexity: _Optional[float] = ..., full_perplexity: _Optional[float] = ..., perplexity_ratio: _Optional[float] = ..., windows: _Optional[int] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("model_name", "architecture", "depth", "hidden_size", "vocab_size", "tokenizer_sha256", "base_fingerprint", "emulators", "owner_public_key", "max_adapter_bytes", "chunk_bytes", "head", "represent_policy")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    EMULATORS_FIELD_NUMBER: _ClassVar[int]
    OWNER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    REPRESENT_POLICY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    architecture: str
    depth: int
    hidden_size: int
    vocab_size: int
    tokenizer_sha256: str
    base_fingerprint: str
    emulators: _containers.RepeatedCompositeFieldContainer[EmulatorOffer]
    owner_public_key: str
    max_adapter_bytes: int
    chunk_bytes: int
    head: ArtifactOffer
    represent_policy: RepresentPolicy
    def __init__(self, model_name: _Optional[str] = ..., architecture: _Optional[str] = ..., depth: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tokenizer_sha256: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., emulators: _Optional[_Iterable[_Union[EmulatorOffer, _Mapping]]] = ..., owner_public_key: _Optional[str] = ..., max_adapter_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., head: _Optional[_Union[ArtifactOffer, _Mapping]] = ..., represent_policy: _Optional[_Union[RepresentPolicy, _Mapping]] = ...) -> None: ...

class RepresentPolicy(_message.Message):
    __slots__ = ("represent", "head_artifact", "log_probs", "max_top_k", "token_budget", "budget_window_seconds")
    REPRESENT_FIELD_NUMBER: _ClassVar[int]
    HEAD_ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BUDGET_WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    represent: bool
    head_artifact: bool
    log_probs: str
    max_top_k: int
    token_budget: int
    budget_window_seconds: float
    def __init__(self, represent: _Optional[bool] = ..., head_artifact: _Optional[bool] = ..., log_probs: _Optional[str] = ..., max_top_k: _Optional[int] = ..., token_budget: _Optional[int] = ..., budget_window_seconds: _Optional[float] = ...) -> None: ...

class ArtifactOffer(_message.Message):
    __slots__ = ("id", "bytes", "files")
    ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    id: str
    bytes: int
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., bytes: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class RepresentRequest(_message.Message):
    __slots__ = ("token_ids", "dtype", "log_probs", "top_k", "last_only")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    LAST_ONLY_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    log_probs: str
    top_k: int
    last_only: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., log_probs: _Optional[str] = ..., top_k: _Optional[int] = ..., last_only: _Optional[bool] = ...) -> None: ...

class RepresentResponse(_message.Message):
    __slots__ = ("positions", "hidden_size", "dtype", "hidden", "log_probs", "top_k_ids", "top_k_log_probs", "vocab_size")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    positions: int
    hidden_size: int
    dtype: str
    hidden: bytes
    log_probs: bytes
    top_k_ids: bytes
    top_k_log_probs: bytes
    vocab_size: int
    def __init__(self, positions: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden: _Optional[bytes] = ..., log_probs: _Optional[bytes] = ..., top_k_ids: _Optional[bytes] = ..., top_k_log_probs: _Optional[bytes] = ..., vocab_size: _Optional[int] = ...) -> None: ...

class PullArtifactRequest(_message.Message):
    __slots__ = ("artifact", "file", "offset")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    artifact: str
    file: str
    offset: int
    def __init__(self, artifact: _Optional[str] = ..., file: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("file", "offset", "data", "file_size", "file_sha256")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FILE_SHA256_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    file_size: int
    file_sha256: str
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., file_size: _Optional[int] = ..., file_sha256: _Optional[str] = ...) -> None: ...

class FileEntry(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PushAdapterHeader(_message.Message):
    __slots__ = ("emulator", "files")
    EMULATOR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    emulator: str
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    def __init__(self, emulator: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("file", "offset", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: PushAdapterHeader
    chunk: FileChunk
    def __init__(self, header: _Optional[_Union[PushAdapterHeader, _Mapping]] = ..., chunk: _Optional[_Union[FileChunk, _Mapping]] = ...) -> None: ...

class ValidationCheck(_message.Message):
    __slots__ = ("name", "passed", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    passed: bool
    detail: str
    def __init__(self, name: _Optional[str] = ..., passed: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PushAdapterResponse(_message.Message):
    __slots__ = ("adapter_id", "method", "bytes", "parameters", "checks", "already_stored")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    method: str
    bytes: int
    parameters: int
    checks: _containers.RepeatedCompositeFieldContainer[ValidationCheck]
    already_stored: bool
    def __init__(self, adapter_id: _Optional[str] = ..., method: _Optional[str] = ..., bytes: _Optional[int] = ..., parameters: _Optional[int] = ..., checks: _Optional[_Iterable[_Union[ValidationCheck, _Mapping]]] = ..., already_stored: _Optional[bool] = ...) -> None: ...

class Example(_message.Message):
    __slots__ = ("prompt", "completion", "choices", "text")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    completion: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    text: str
    def __init__(self, prompt: _Optional[str] = ..., completion: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., text: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("adapter_id", "examples", "use_owner_data", "limit", "batch_size", "delivery")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    USE_OWNER_DATA_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    examples: _containers.RepeatedCompositeFieldContainer[Example]
    use_owner_data: bool
    limit: int
    batch_size: int
    delivery: str
    def __init__(self, adapter_id: _Optional[str] = ..., examples: _Optional[_Iterable[_Union[Example, _Mapping]]] = ..., use_owner_data: _Optional[bool] = ..., limit: _Optional[int] = ..., batch_size: _Optional[int] = ..., delivery: _Optional[str] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("examples", "tokens", "loss", "perplexity", "accuracy", "scored_choices", "seconds", "peak_rss_bytes", "accuracy_norm", "correct")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SCORED_CHOICES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_NORM_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    examples: int
    tokens: int
    loss: float
    perplexity: float
    accuracy: float
    scored_choices: int
    seconds: float
    peak_rss_bytes: int
    accuracy_norm: float
    correct: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, examples: _Optional[int] = ..., tokens: _Optional[int] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., accuracy: _Optional[float] = ..., scored_choices: _Optional[int] = ..., seconds: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., accuracy_norm: _Optional[float] = ..., correct: _Optional[_Iterable[bool]] = ...) -> None: ...

class EvaluateEvent(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    report: EvaluationReport
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., report: _Optional[_Union[EvaluationReport, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("adapter_id", "prompt", "max_new_tokens", "temperature", "seed", "planned_length", "top_p", "stop", "delivery")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PLANNED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    prompt: str
    max_new_tokens: int
    temperature: float
    seed: int
    planned_length: int
    top_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    delivery: str
    def __init__(self, adapter_id: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., planned_length: _Optional[int] = ..., top_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., delivery: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("text", "token_id", "done", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    done: bool
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter_id", "method", "emulator", "bytes", "parameters", "created")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EMULATOR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    method: str
    emulator: str
    bytes: int
    parameters: int
    created: str
    def __init__(self, adapter_id: _Optional[str] = ..., method: _Optional[str] = ..., emulator: _Optional[str] = ..., bytes: _Optional[int] = ..., parameters: _Optional[int] = ..., created: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

"""The daemon's configuration: one table of `serve` options, read from flags, OFFSITE_* variables and a TOML file.

SERVE_OPTIONS is the only place that knows the keys, their types, defaults and help: the `serve` flags are built
from it (`add_serve_arguments`) and the config file is checked against it, so the two cannot drift. A key is its long
flag with underscores (`--metrics-port` → `metrics_port`); its variable is `OFFSITE_` + the key in capitals.

Precedence, lowest first: built-in default, config file, environment, flag. Relative paths in a config file are
taken from the file's own directory, so a daemon started from anywhere (systemd, a container) finds them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..common.contract import (
    CHUNK_BYTES,
    DEFAULT_EMULATOR,
    DEFAULT_MODEL,
    MAX_ADAPTERS_PER_TENANT,
    MAX_CHUNK_BYTES,
    MAX_STREAMS_PER_TENANT,
    MAX_TENANT_BYTES,
    MAX_TOP_K,
    KiB,
    MiB,
)
from .audit_chain import DEFAULT_KEEP, DEFAULT_MAX_MIB
from .limits import (
    GIL_SWITCH_MS,
    MAX_STREAMS_TOTAL,
    MODEL_QUEUE_PER_TENANT,
    MODEL_QUEUE_TOTAL,
    MODEL_WORKERS,
    UNARY_RESERVE,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

ENV_PREFIX = "OFFSITE_"
CONFIG_ENV = "OFFSITE_CONFIG"  # names the config file when --config is not given
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_HOST = "127.0.0.1"  # metrics name tenants: loopback unless the owner opens them up
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
# Represent's log-probs policy: what a tenant may ask for, least revealing first (see docs/security.md)
LOG_PROBS_POLICIES = ("none", "top_k", "full")
DEFAULT_LOG_PROBS_POLICY = "top_k"
DEFAULT_REPRESENT_TOP_K = 20  # the most log-probs per position under top_k, as public logit APIs offer
# Represent positions a tenant may receive per window: a remote PEMA memory of SST-2's 67k training rows is about
# 2M; distilling the emulator's middle against the full model wants far more (issue 16, finding 10)
DEFAULT_REPRESENT_TOKEN_BUDGET = 5_000_000
DEFAULT_REPRESENT_BUDGET_WINDOW_SECONDS = 86_400.0
REDACTED = "<redacted>"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

# What a key's value may be; `list` is a list of strings
Kind = type


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key (or variable, or flag) at fault."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _check_listen(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:50051")


def _check_port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port (0-65535)")


def _check_not_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"{value} is negative (0 turns the budget off)")


def _check_count(value: int) -> None:
    if value < 0:
        raise ValueError(f"{value} is negative")


def _check_at_least_one(value: int) -> None:
    if value < 1:
        raise ValueError(f"{value} is less than 1")


def _check_positive(value: float) -> None:
    if not value > 0:
        raise ValueError(f"{value} is not a positive number of seconds")


def _check_top_k(value: int) -> None:
    if not 1 <= value <= MAX_TOP_K:
        raise ValueError(f"{value} is outside 1..{MAX_TOP_K}")


def _check_chunk_kib(value: int) -> None:
    if not 1 <= value * KiB <= MAX_CHUNK_BYTES:
        raise ValueError(f"{value} KiB is outside 1..{MAX_CHUNK_BYTES // KiB} KiB (what a client accepts per chunk)")


def _check_emulators(values: list[str]) -> None:
    from .emulator import EmulatorSpec  # imports transformers: only when there is something to check

    for text in values:
        EmulatorSpec.parse(text)


@dataclass(frozen=True)
class Option:
    key: str
    kind: Kind
    default: Any
    help: str
    required: bool = False  # must be set by one of the sources
    path: bool = False  # a file or directory: taken relative to the config file's directory
    secret: bool = False  # shown as REDACTED by `config show`
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], None] | None = None  # raises ValueError with the reason

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """The flag, defaulting to SUPPRESS so that only flags actually given reach the namespace."""
        common: dict[str, Any] = {"dest": self.key, "default": argparse.SUPPRESS, "help": self.help}
        if self.kind is bool:
            parser.add_argument(self.flag, action=argparse.BooleanOptionalAction, **common)
        elif self.kind is list:
            parser.add_argument(self.flag, action="append", **common)
        else:
            parser.add_argument(self.flag, type=self.kind, choices=self.choices, **common)


SERVE_OPTIONS: tuple[Option, ...] = (
    Option("model", str, DEFAULT_MODEL, "HF directory, .gguf file, hub id, or smollm2-135m"),
    Option(
        "device_map",
        str,
        None,
        "place the full model with accelerate: auto, balanced, sequential, cpu, cuda:0, ... (default: the CPU, "
        "unplaced)",
    ),
    Option("store", str, None, "the owner's store directory", required=True, path=True),
    Option("listen", str, DEFAULT_LISTEN, "HOST:PORT (port 0 picks a free one)", check=_check_listen),
    Option(
        "emulator",
        list,
        [DEFAULT_EMULATOR],
        f"METHOD:L-N-R[,key=value...], e.g. distill:2-8-2,steps=100 (bridge=1 also ships the hybrid PEMA's "
        f"bridge); repeatable (default {DEFAULT_EMULATOR})",
        check=_check_emulators,
    ),
    Option("eval_data", str, None, "the owner's own validation set (JSONL)", path=True),
    Option(
        "pull_chunk_kib",
        int,
        CHUNK_BYTES // KiB,
        "KiB per PullArtifact chunk (bench/transport.py measures 64, 1024, 4096)",
        check=_check_chunk_kib,
    ),
    Option(
        "release_margin",
        float,
        None,
        "refuse to serve an emulator whose held-out perplexity is below full × (1 + MARGIN), e.g. 0.5",
    ),
    Option("max_adapters", int, MAX_ADAPTERS_PER_TENANT, "adapters per tenant"),
    Option("max_tenant_mib", int, MAX_TENANT_BYTES // MiB, "adapter MiB a tenant may store"),
    Option("max_streams", int, MAX_STREAMS_PER_TENANT, "concurrent streaming calls per tenant"),
    Option(
        "max_streams_total",
        int,
        MAX_STREAMS_TOTAL,
        "concurrent streaming calls, all tenants together (each holds a worker thread)",
        check=_check_at_least_one,
    ),
    Option(
        "unary_reserve",
        int,
        UNARY_RESERVE,
        "worker threads streams can never take, kept for health checks and small calls",
        check=_check_at_least_one,
    ),
    Option(
        "shutdown_notice_seconds",
        float,
        0.0,
        "on SIGTERM, seconds of health NOT_SERVING while calls are still served, before the drain (a load "
        "balancer's health-check interval)",
    ),
    # The model queue (owner/model_queue.py): forwards run there in turns, off the threads that answer small calls
    Option("model_workers", int, MODEL_WORKERS, "threads running model forwards", check=_check_at_least_one),
    Option(
        "gil_switch_ms",
        float,
        GIL_SWITCH_MS,
        "the interpreter's switch interval: how long one thread may hold the GIL while others wait (bench/load.py)",
        check=_check_positive,
    ),
    Option(
        "model_queue_per_tenant",
        int,
        MODEL_QUEUE_PER_TENANT,
        "model calls (Represent, Evaluate, Generate) a tenant may have queued or running; more: RESOURCE_EXHAUSTED",
        check=_check_at_least_one,
    ),
    Option(
        "model_queue_total",
        int,
        MODEL_QUEUE_TOTAL,
        "model calls queued or running, all tenants together",
        check=_check_at_least_one,
    ),
    # The representation policy (finding 10 of issue 16): what Represent and the head artifact give a tenant
    Option("represent", bool, True, "serve Represent, the full model's final-layer states (--no-represent: off)"),
    Option("head_artifact", bool, True, "offer the LM head and final norm for pull (--no-head-artifact: off)"),
    Option(
        "represent_log_probs",
        str,
        DEFAULT_LOG_PROBS_POLICY,
        "the most Represent log-probs a tenant may ask for: none, top_k or full (the whole distribution)",
        choices=LOG_PROBS_POLICIES,
    ),
    Option(
        "represent_top_k",
        int,
        DEFAULT_REPRESENT_TOP_K,
        "the most log-probs per position under top_k",
        check=_check_top_k,
    ),
    Option(
        "represent_token_budget",
        int,
        DEFAULT_REPRESENT_TOKEN_BUDGET,
        "Represent positions a tenant may receive per budget window (0: no budget)",
        check=_check_not_negative,
    ),
    Option(
        "represent_budget_window_seconds",
        float,
        DEFAULT_REPRESENT_BUDGET_WINDOW_SECONDS,
        "the sliding window of represent_token_budget, in seconds",
        check=_check_positive,
    ),
    Option(
        "audit_max_mib",
        int,
        DEFAULT_MAX_MIB,
        "rotate audit.jsonl to audit.jsonl.1 when it would pass this many MiB (0: never)",
        check=_check_count,
    ),
    Option("audit_keep", int, DEFAULT_KEEP, "rotated audit files kept (.1 is the newest)", check=_check_count),
    Option("tls_cert", str, None, "TLS: the server certificate (PEM), e.g. certs/server.pem", path=True),
    # the path only, but `config show` output gets pasted into tickets: it need not point at the key
    Option("tls_key", str, None, "TLS: its private key (PEM)", path=True, secret=True),
    Option("client_ca", str, None, "mTLS: require client certificates signed by this CA, e.g. certs/ca.pem", path=True),
    Option("insecure", bool, False, "allow a non-loopback address without TLS"),
    Option("metrics_port", int, 0, "serve Prometheus metrics on this port (0: off)", check=_check_port),
    Option("metrics_host", str, DEFAULT_METRICS_HOST, "the address the metrics endpoint binds"),
    Option(
        "log_format", str, "text", "stderr logs: text (for people) or json (a JSON object a line)", choices=LOG_FORMATS
    ),
    Option("log_level", str, "info", "the least severe log level written", choices=LOG_LEVELS),
    Option("json", bool, False, "print one JSON object as the ready line"),
)
OPTIONS_BY_KEY: dict[str, Option] = {option.key: option for option in SERVE_OPTIONS}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help=f"a TOML file of these options, keys named like the flags (default ${CONFIG_ENV})"
    )
    for option in SERVE_OPTIONS:
        option.add_to(parser)


@dataclass(frozen=True)
class Effective:
    """The configuration in force, and where each value came from ("default", "file", "env", "flag")."""

    values: dict[str, Any]
    sources: dict[str, str]
    file: Path | None

    def namespace(self) -> argparse.Namespace:
        return argparse.Namespace(**self.values, config=str(self.file) if self.file else None)

    def redacted(self) -> dict[str, Any]:
        return {
            key: REDACTED if OPTIONS_BY_KEY[key].secret and value is not None else value
            for key, value in self.values.items()
        }


def _kind_name(kind: Kind) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list of strings"}[
        kind
    ]


def _value_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a table"}.get(
        type(value), type(value).__name__
    )


def _coerce(option: Option, value: Any, where: str) -> Any:
    """`value` as the option's type, or ValueError naming `where` (the key, variable or flag)."""
    kind = option.kind
    if kind is list and isinstance(value, str):
        value = [value]  # one emulator may be written without the brackets
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    fits = (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
        if kind is list
        else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    )
    if not fits:
        raise ValueError(f"{where} must be {_kind_name(kind)}, not {_value_name(value)} ({value!r})")
    if option.choices and value not in option.choices:
        raise ValueError(f"{where} must be one of {', '.join(option.choices)}, not {value!r}")
    if option.check:
        try:
            option.check(value)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return value


def _parse_env(option: Option, text: str) -> Any:
    if option.kind is bool:
        word = text.strip().lower()
        if word in TRUE_WORDS | FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{option.env} must be one of {', '.join(sorted(TRUE_WORDS | FALSE_WORDS))}, not {text!r}")
    if option.kind is list:
        return text.split()  # emulator specs hold commas, never spaces
    if option.kind in (int, float):
        try:
            return option.kind(text)
        except ValueError:
            raise ValueError(f"{option.env} must be {_kind_name(option.kind)}, not {text!r}") from None
    return text


def _unknown(key: str) -> str:
    close = difflib.get_close_matches(key, OPTIONS_BY_KEY, n=1)
    hint = (
        f"did you mean {close[0]!r}?" if close else "the keys are the serve flags with underscores, e.g. metrics_port"
    )
    return f"unknown key {key!r}; {hint}"


def read_file(path: Path) -> dict[str, Any]:
    """The file's settings, type-checked and with relative paths resolved; ConfigError lists every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError([f"cannot read the config file {path}: {error.strerror or error}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path} is not valid TOML: {error}"]) from None
    problems: list[str] = []
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        option = OPTIONS_BY_KEY.get(key)
        if option is None:
            problems.append(f"{path}: {_unknown(key)}")
            continue
        try:
            value = _coerce(option, value, f"key {key!r}")
        except ValueError as error:
            problems.append(f"{path}: {error}")
            continue
        if option.path and value is not None:
            value = str((path.parent / value).resolve()) if not Path(value).is_absolute() else value
        settings[key] = value
    if problems:
        raise ConfigError(problems)
    return settings


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """OFFSITE_<KEY> variables; an empty one counts as unset, as compose files often leave them."""
    problems: list[str] = []
    settings: dict[str, Any] = {}
    for option in SERVE_OPTIONS:
        text = environ.get(option.env, "")
        if not text:
            continue
        try:
            settings[option.key] = _coerce(option, _parse_env(option, text), option.env)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError(problems)
    return settings


def resolve(
    flags: Mapping[str, Any],
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    require: bool = True,
) -> Effective:
    """Defaults < file < environment < flags. `flags` holds only the flags given (see Option.add_to).

    `require=False` leaves required keys unset instead of failing (`config show`).
    """
    environ = os.environ if environ is None else environ
    named = config_file or environ.get(CONFIG_ENV) or None
    file = Path(named) if named else None
    # a copy of each default: a list default must not be shared between resolutions
    values = {option.key: list(option.default) if option.kind is list else option.default for option in SERVE_OPTIONS}
    sources = dict.fromkeys(values, "default")
    file_settings = read_file(file) if file else {}
    layers: list[tuple[str, Mapping[str, Any]]] = [("file", file_settings), ("env", read_env(environ))]
    problems: list[str] = []
    checked_flags: dict[str, Any] = {}
    for key, value in flags.items():
        if key in OPTIONS_BY_KEY:
            try:  # argparse checked the type; the range and format checks are ours
                checked_flags[key] = _coerce(OPTIONS_BY_KEY[key], value, OPTIONS_BY_KEY[key].flag)
            except ValueError as error:
                problems.append(str(error))
    layers.append(("flag", checked_flags))
    for source, settings in layers:
        for key, value in settings.items():
            values[key], sources[key] = value, source
    for option in SERVE_OPTIONS:
        if require and option.required and values[option.key] is None:
            problems.append(
                f"{option.key} is required: pass {option.flag}, set {option.key} in the config file, or {option.env}"
            )
    if problems:
        raise ConfigError(problems)
    return Effective(values, sources, file)


def check_file(path: Path) -> list[str]:
    """Every problem in one config file on its own (no environment, no flags); empty when it is good."""
    try:
        read_file(path)
    except ConfigError as error:
        return error.problems
    return []


def _toml_value(value: Any) -> str:
    # JSON's strings, numbers, booleans and arrays of strings are valid TOML as they are
    return json.dumps(value, ensure_ascii=False)


def to_toml(effective: Effective) -> str:
    """The effective configuration as a TOML file `serve --config` accepts; unset keys commented out."""
    lines = []
    for key, value in effective.redacted().items():
        source, option = effective.sources[key], OPTIONS_BY_KEY[key]
        origin = "  # " + {"env": option.env, "flag": option.flag}.get(source, source)
        if value is None or value == REDACTED:
            lines.append(f"# {key} = {'unset' if value is None else REDACTED}{origin}")
        else:
            lines.append(f"{key} = {_toml_value(value)}{origin}")
    return "\n".join(lines)

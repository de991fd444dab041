"""Conventions shared by both command-line tools: --json output, quiet library logs, error exits."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import warnings
from typing import Any


def quiet_libraries() -> None:
    """Our own progress bars and messages stay; transformers' per-load bars and advice go."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def emit(result: dict[str, Any], as_json: bool, human: str) -> None:
    """Prints `human`, or with --json a single JSON object as the last line of stdout."""
    if as_json:
        print(json.dumps(_jsonable(result), sort_keys=True), flush=True)
    else:
        print(human, flush=True)


def fail(message: str, as_json: bool, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps({"ok": False, "error": message}), flush=True)
    sys.exit(code)

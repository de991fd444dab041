"""The benchmarks' cache: one JSON file per measured cell, so that a long benchmark runs in pieces and resumes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class Cells:
    """One JSON file per measured cell, named by everything its numbers depend on."""

    def __init__(self, directory: Path):
        self.directory = directory

    def path(self, facts: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
        return self.directory / f"{facts['task']}-{facts['row']}-{key}.json"

    def get(self, facts: dict[str, Any]) -> dict[str, Any] | None:
        path = self.path(facts)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, facts: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {**facts, **result}
        partial = self.path(facts).with_suffix(".partial")
        partial.write_text(json.dumps(record, indent=1) + "\n")
        partial.rename(self.path(facts))
        return record

    def all(self) -> Iterator[dict[str, Any]]:
        for path in sorted(self.directory.glob("*.json")):
            yield json.loads(path.read_text())

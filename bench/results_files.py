"""Where every benchmark leaves its results: `<out>.json` for scripts, `<out>.md` for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(out: Path, result: dict[str, Any], markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)

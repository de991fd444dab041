"""The committed gRPC stubs match proto/, and the data format explains its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from offsite.common.examples import DataError, read_jsonl
from offsite.common.rpc import codegen


def test_committed_stubs_are_fresh() -> None:
    assert codegen.stale_files() == [], "run: python -m offsite.common.rpc.codegen"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a"}', "needs"),
        ('{"text": "a", "prompt": "b"}', "either text"),
        ('{"prompt": "a", "completion": " c", "choices": [" a", " b"]}', "not one of its choices"),
        ('{"prompt": "a", "completion": " c", "extra": 1}', "unknown field"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": ', "not JSON"),
    ],
)
def test_data_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as caught:
        read_jsonl(path)
    assert "data.jsonl:2" in str(caught.value)

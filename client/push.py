"""Pushes an adapter bundle: a header naming every file with its size and hash, then the bytes in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from ..common.contract import CHUNK_BYTES, MANIFEST_NAME
from ..common.manifest import read_manifest, sha256_file, verify_files
from ..common.rpc import pb
from .connection import Remote


def push_adapter(
    remote: Remote, adapter_dir: Path, show_progress: bool = True, chunk_bytes: int = CHUNK_BYTES
) -> pb.PushAdapterResponse:
    manifest = read_manifest(adapter_dir)
    verify_files(adapter_dir, manifest)
    names = [*sorted(manifest["files"]), MANIFEST_NAME]
    entries = [
        pb.FileEntry(name=n, size=(adapter_dir / n).stat().st_size, sha256=sha256_file(adapter_dir / n)) for n in names
    ]
    total = sum(e.size for e in entries)

    def messages() -> Iterator[pb.PushAdapterRequest]:
        yield pb.PushAdapterRequest(header=pb.PushAdapterHeader(emulator=manifest["emulator"], files=entries))
        with tqdm(total=total, unit="B", unit_scale=True, desc="push", disable=not show_progress) as bar:
            for name in names:
                offset = 0
                with (adapter_dir / name).open("rb") as handle:
                    while data := handle.read(chunk_bytes):
                        yield pb.PushAdapterRequest(chunk=pb.FileChunk(file=name, offset=offset, data=data))
                        offset += len(data)
                        bar.update(len(data))

    return remote.push(messages())

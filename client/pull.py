"""Pulls an emulator bundle file by file, resuming dropped streams, then verifies signature and hashes."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from ..common import output_dir
from ..common.contract import HASH_BLOCK_BYTES
from ..common.manifest import BundleError, verify_bundle
from ..common.rpc import pb
from .connection import Remote, RemoteError

RETRIES = 5
RETRY_PAUSE_SECONDS = 0.5
PARTIAL_SUFFIX = ".part"
DISK_HEADROOM_BYTES = 64 * 1024 * 1024  # left free after a pull: a full disk breaks more than this command


class OwnerKeyMismatch(BundleError):
    """The owner presents a key other than the pinned one."""


def choose_offer(card: pb.ModelCard, emulator: str | None) -> pb.EmulatorOffer:
    offers = {offer.id: offer for offer in card.emulators}
    if not offers:
        raise ValueError("the owner offers no emulator")
    if emulator is None:
        return card.emulators[0]
    if emulator not in offers:
        raise ValueError(f"the owner offers no emulator {emulator!r}; offered: {', '.join(offers)}")
    return offers[emulator]


def _prefix_digest(partial: Path, size: int) -> hashlib._Hash:
    """sha256 over the first `size` bytes of an interrupted pull's partial file (nothing on a fresh pull)."""
    digest = hashlib.sha256()
    if size:
        with partial.open("rb") as handle:
            while block := handle.read(min(HASH_BLOCK_BYTES, size - handle.tell())):
                digest.update(block)
    return digest


def _download(remote: Remote, artifact: str, name: str, target: Path, bar: tqdm, allowance: int) -> tuple[int, str]:
    """Appends to TARGET.part from its current size; retries transient failures from where it stopped. The owner's
    sizes are not trusted: a file may not change its size mid-pull nor exceed `allowance`, what is left of the
    artifact's declared total. Returns the file's size and the sha256 of the bytes written."""
    partial = target.with_name(target.name + PARTIAL_SUFFIX)
    expected_sha, file_size = None, None
    for attempt in range(RETRIES + 1):
        offset = partial.stat().st_size if partial.exists() else 0
        digest = _prefix_digest(partial, offset)  # hashed as it arrives: the file is never read back whole
        try:
            with partial.open("ab") as handle:
                for chunk in remote.pull(artifact, name, offset):
                    data = chunk.data  # each read of a bytes field copies it: read it once
                    if chunk.offset != offset:
                        raise BundleError(f"{name}: the owner sent offset {chunk.offset}, expected {offset}")
                    if file_size is not None and chunk.file_size != file_size:
                        raise BundleError(f"{name}: the owner changed its size from {file_size} to {chunk.file_size}")
                    file_size = chunk.file_size
                    if file_size > allowance:
                        raise BundleError(
                            f"{name}: the owner sends {file_size} bytes, more than the {allowance} left of the "
                            "artifact's declared size"
                        )
                    if offset + len(data) > file_size:
                        raise BundleError(f"{name}: received more than its {file_size} bytes")
                    handle.write(data)
                    digest.update(data)
                    offset += len(data)
                    bar.update(len(data))
                    expected_sha = chunk.file_sha256
            break
        except grpc.RpcError as error:
            transient = error.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.INTERNAL,
                grpc.StatusCode.CANCELLED,
            )
            if not transient or attempt == RETRIES:
                raise RemoteError(error) from None
            time.sleep(RETRY_PAUSE_SECONDS * (attempt + 1))
    received = digest.hexdigest()
    if received != expected_sha:
        partial.unlink()
        raise BundleError(f"{target}: sha256 {received} does not match the owner's {expected_sha}")
    partial.replace(target)
    return offset, received


def _check_disk_room(directory: Path, total: int) -> None:
    """Refuses a pull the disk cannot hold before a byte arrives, rather than filling it."""
    free = shutil.disk_usage(directory).free
    if total + DISK_HEADROOM_BYTES > free:
        raise BundleError(
            f"the artifact is {total:,} bytes, and {directory} has {free:,} free (keeping {DISK_HEADROOM_BYTES:,} "
            "spare): free some space or pull elsewhere"
        )


def _pull_files(
    remote: Remote,
    card: pb.ModelCard,
    artifact: str,
    files: list[str],
    total: int,
    out: Path,
    owner_key: str | None,
    show_progress: bool,
    kind: output_dir.BundleKind,
) -> dict[str, Any]:
    """Downloads every file of one artifact into staging, verifies the signed manifest and every hash, then moves
    the bundle to `out`. A failed pull never touches `out`; a dropped one resumes from staging when run again."""
    for name in files:
        if Path(name).name != name or name.startswith("."):
            raise BundleError(f"the owner offered an unsafe file name {name!r}")
    with output_dir.staged(out, kind, resume=True) as work:
        work.mkdir(exist_ok=True)
        _check_disk_room(work, total)
        allowance, hashed = total, {}
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"pull {artifact}", disable=not show_progress) as bar:
            for name in files:
                target = work / name
                partial = target.with_name(name + PARTIAL_SUFFIX)
                if target.exists() and not partial.exists():
                    target.unlink()  # complete in an interrupted pull: fetch afresh rather than trust it
                size, hashed[name] = _download(remote, artifact, name, target, bar, allowance)
                allowance -= size
        try:
            # the digests taken while receiving stand for the files: no second pass over the bundle on disk
            return verify_bundle(work, owner_key or card.owner_public_key, hashed=hashed)
        except BundleError:
            output_dir.abandon(out)  # nothing of a bundle that does not verify is worth resuming
            raise


def model_card(remote: Remote, owner_key: str | None) -> pb.ModelCard:
    """The owner's card, refused where the owner presents another key than the pinned one."""
    card = remote.model_card()
    if owner_key is not None and card.owner_public_key != owner_key:
        raise OwnerKeyMismatch(f"the owner presents key {card.owner_public_key}, but the pinned key is {owner_key}")
    return card


def pull_head(remote: Remote, out: Path, owner_key: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """The LM head, true final norm and tokenizer, for training PEMA on representations."""
    card = model_card(remote, owner_key)
    if not card.head.id:
        raise ValueError("this owner offers no head artifact (it predates PEMA)")
    manifest = _pull_files(
        remote,
        card,
        card.head.id,
        list(card.head.files),
        card.head.bytes,
        out,
        owner_key,
        show_progress,
        output_dir.HEAD,
    )
    return {
        "artifact": card.head.id,
        "out": str(out),
        "bytes": card.head.bytes,
        "files": list(card.head.files),
        "owner_public_key": card.owner_public_key,
        "base_fingerprint": manifest["base_fingerprint"],
    }


def pull_emulator(
    remote: Remote, out: Path, emulator: str | None = None, owner_key: str | None = None, show_progress: bool = True
) -> dict[str, Any]:
    card = model_card(remote, owner_key)
    offer = choose_offer(card, emulator)
    manifest = _pull_files(
        remote, card, offer.id, list(offer.files), offer.bytes, out, owner_key, show_progress, output_dir.EMULATOR
    )
    return {
        "emulator": offer.id,
        "out": str(out),
        "bytes": offer.bytes,
        "files": list(offer.files),
        "owner_public_key": card.owner_public_key,
        "block_map": manifest["block_map"],
        "adapter_blocks": manifest["adapter_blocks"],
        "report_card": manifest.get("report_card"),  # signed with the rest; older owners have none
    }

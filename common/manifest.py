"""`offsite.json`: the manifest beside every bundle (emulator or adapter), and its verification."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .contract import HASH_BLOCK_BYTES, MANIFEST_NAME
from .signing import public_key_hex, sign, signature_is_valid


class BundleError(ValueError):
    """A bundle that does not match its manifest; the message names the offending file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    """Every regular file in the bundle but the manifest itself, with its size and sha256."""
    return {
        path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(directory: Path, body: dict[str, Any], key: Ed25519PrivateKey | None = None) -> dict[str, Any]:
    """Adds the file table (and, with a key, the owner's signature) and writes offsite.json."""
    manifest = dict(body, files=describe_files(directory))
    if key is not None:
        manifest["signed_by"] = public_key_hex(key)
        manifest["signature"] = sign(key, manifest)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing; this directory is not an offsite bundle")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path}: no file table")
    return manifest


def verify_signature(manifest: dict[str, Any], owner_key: str | None, where: Path) -> None:
    signer = manifest.get("signed_by")
    signature = manifest.get("signature")
    if not isinstance(signer, str) or not isinstance(signature, str):
        raise BundleError(f"{where / MANIFEST_NAME}: not signed")
    if owner_key is not None and signer != owner_key:
        raise BundleError(f"{where / MANIFEST_NAME}: signed by {signer}, but the pinned owner key is {owner_key}")
    body = {k: v for k, v in manifest.items() if k != "signature"}
    if not signature_is_valid(signer, body, signature):
        raise BundleError(f"{where / MANIFEST_NAME}: the signature does not verify; the manifest was altered")


def verify_files(directory: Path, manifest: dict[str, Any], hashed: dict[str, str] | None = None) -> None:
    """Every listed file exists with its size and hash, and nothing unlisted sits beside them.

    `hashed` holds sha256 digests this process computed over a file's bytes as it wrote them (a pull hashes as it
    receives); those files are not read back, which would cost a second pass over the whole bundle."""
    listed = manifest["files"]
    hashed = hashed or {}
    for name, entry in listed.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        digest = hashed[name] if name in hashed else sha256_file(path)
        if path.stat().st_size != entry.get("size") or digest != entry.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match the manifest; the file was altered or truncated")
    for path in directory.iterdir():
        if path.is_file() and path.name != MANIFEST_NAME and path.name not in listed:
            raise BundleError(f"{path}: not listed in the manifest")


def verify_bundle(
    directory: Path, owner_key: str | None = None, signed: bool = True, hashed: dict[str, str] | None = None
) -> dict[str, Any]:
    """Checks a bundle before anything loads it; returns its manifest. `hashed`: see `verify_files`."""
    manifest = read_manifest(directory)
    if signed:
        verify_signature(manifest, owner_key, directory)
    verify_files(directory, manifest, hashed)
    return manifest

"""`offsite-owner`: the model owner's daemon and its local admin commands."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from ..common import output_dir
from ..common.architectures import UnsupportedArchitecture
from ..common.cli_output import emit, fail, quiet_libraries
from ..common.contract import (
    DEFAULT_EMULATOR,
    DEFAULT_MODEL,
    MAX_ADAPTERS_PER_TENANT,
    MAX_STREAMS_PER_TENANT,
    MAX_TENANT_BYTES,
    MiB,
)
from ..common.examples import DataError, read_jsonl
from ..common.model_loading import ModelNotFound, fingerprint, load_model
from .certificates import (
    DEFAULT_VALID_DAYS,
    KEY_MODE,
    CertificateError,
    certificate_serial,
    init_certificates,
    issue_client,
    parse_serial,
)
from .emulator import BUILDERS, EmulatorSpec, build_emulator
from .emulator.layout import LayoutError
from .emulator.placement import PLACEMENTS
from .limits import TenantLimits
from .server import BindRefused, ServerTls, start_server
from .service import OwnerService
from .store import STORE_UMASK, Store

SHUTDOWN_GRACE_SECONDS = 10.0
SECRET_MODE = KEY_MODE  # a token file is as secret as a key


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    if not args.tls_cert and not args.tls_key:
        if args.client_ca:
            raise ValueError("--client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(Path(args.tls_cert), Path(args.tls_key), Path(args.client_ca) if args.client_ca else None)


def cmd_serve(args: argparse.Namespace) -> None:
    store = Store(Path(args.store))
    removed = store.recover()
    if removed:
        print(f"recovered the store: removed {len(removed)} leftover(s) of interrupted writes", file=sys.stderr)
    specs = [EmulatorSpec.parse(text) for text in (args.emulator or [DEFAULT_EMULATOR])]
    owner_examples = read_jsonl(Path(args.eval_data)) if args.eval_data else None
    print(f"loading {args.model} ...", file=sys.stderr)
    loaded = load_model(args.model, cache_dir=store.models_dir)
    limits = TenantLimits(args.max_adapters, args.max_tenant_mib * MiB, args.max_streams)
    service = OwnerService(loaded, store, specs, owner_examples, release_margin=args.release_margin, limits=limits)
    if store.tenant_count() == 0:
        print(
            f"warning: no tenants yet; add one with: offsite-owner tenants add NAME --store {args.store}",
            file=sys.stderr,
        )
    server, port = start_server(service, store, args.listen, insecure=args.insecure, tls=_server_tls(args))
    host = args.listen.rsplit(":", 1)[0]
    emit(
        {
            "event": "ready",
            "address": f"{host}:{port}",
            "port": port,
            "emulators": sorted(service.emulators),
            "owner_public_key": service.public_key,
        },
        args.json,
        f"serving {loaded.name} on {host}:{port}; emulators: {', '.join(sorted(service.emulators))}; "
        f"owner key {service.public_key}",
    )

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("shutting down: draining in-flight calls", file=sys.stderr)
    server.stop(SHUTDOWN_GRACE_SECONDS).wait()
    store.close()


def cmd_build_emulator(args: argparse.Namespace) -> None:
    given = (("steps", args.steps), ("data", args.data), ("place", args.place))
    options = "".join(f",{key}={value}" for key, value in given if value)
    spec = EmulatorSpec.parse(f"{args.method}:{args.layout}{options}")
    out = Path(args.out)
    output_dir.check(out, output_dir.EMULATOR)  # before the model loads
    store = Store(Path(args.store))
    loaded = load_model(args.model, cache_dir=store.models_dir)
    # resume: a long build keeps its resumable state inside the staging directory
    with output_dir.staged(out, output_dir.EMULATOR, resume=True) as work:
        manifest = build_emulator(
            loaded.model, loaded.tokenizer, spec, work, store.signing_key(), fingerprint(loaded.model), loaded.name
        )
    emit(
        {
            "ok": True,
            "out": args.out,
            "id": manifest["id"],
            "block_map": manifest["block_map"],
            "adapter_blocks": manifest["adapter_blocks"],
            "parameters": manifest["parameters"],
        },
        args.json,
        f"wrote emulator {manifest['id']} to {args.out}: blocks {manifest['block_map']}, "
        f"{manifest['parameters']:,} parameters, adapter blocks {manifest['adapter_blocks']['full']}",
    )


def _hand_over(args: argparse.Namespace, name: str, token: str, verb: str) -> None:
    """Gives a new token to the owner: into --token-file (0600), or on stdout once; in --json only if asked."""
    result: dict[str, object] = {"ok": True, "tenant": name}
    if args.token_file:
        write_secret(Path(args.token_file), token)
        result["token_file"] = args.token_file
        human = f"tenant {name} {verb}. Its token is in {args.token_file} (mode 0600); hand it over, then delete it."
    else:
        human = f"tenant {name} {verb}. Its token is shown only this once:\n{token}"
    if args.show_token:
        result["token"] = token  # only when asked: a --json line tends to be logged, and the log would keep it
    elif args.json and not args.token_file:
        result["token_withheld"] = True
        print(
            "the token was not printed: pass --token-file or --show-token (tenants rotate makes a new one)",
            file=sys.stderr,
        )
    emit(result, args.json, human)


def write_secret(path: Path, text: str) -> None:
    """A new file readable by the owner only; an existing file is refused rather than overwritten."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")


def _check_token_file(args: argparse.Namespace) -> None:
    """Before the token changes: a token that cannot be written would be lost."""
    if args.token_file and Path(args.token_file).exists():
        raise ValueError(f"{args.token_file} exists; choose a new file for the token")


def cmd_tenants_add(args: argparse.Namespace) -> None:
    _check_token_file(args)
    _hand_over(args, args.name, Store(Path(args.store)).add_tenant(args.name), "added")


def cmd_tenants_rotate(args: argparse.Namespace) -> None:
    _check_token_file(args)
    _hand_over(args, args.name, Store(Path(args.store)).rotate_token(args.name), "has a new token; the old one is void")


def cmd_tenants_remove(args: argparse.Namespace) -> None:
    adapters = Store(Path(args.store)).remove_tenant(args.name)
    emit(
        {"ok": True, "tenant": args.name, "adapters_deleted": adapters},
        args.json,
        f"tenant {args.name} removed with its {adapters} adapter(s); its token and certificate are refused from the "
        "next call on. Revoke its certificate too (certs revoke) if the name may be added again.",
    )


def cmd_tenants_list(args: argparse.Namespace) -> None:
    tenants = Store(Path(args.store)).list_tenants()
    lines = [f"{t.name}\t{t.adapters} adapter(s)\t{t.bytes:,} bytes\tsince {t.created}" for t in tenants]
    emit({"ok": True, "tenants": [t.__dict__ for t in tenants]}, args.json, "\n".join(lines) or "no tenants")


def cmd_certs_init(args: argparse.Namespace) -> None:
    clients = [name.strip() for name in args.clients.split(",") if name.strip()]
    issued = init_certificates(Path(args.out), args.server_name, clients, args.days, overwrite=args.force)
    emit(
        {"ok": True, **issued.as_dict()},
        args.json,
        f"wrote a CA, a certificate for {args.server_name} and {len(clients)} client certificate(s) to {args.out}.\n"
        f"serve: --tls-cert {issued.server_cert} --tls-key {issued.server_key} --client-ca {issued.ca}\n"
        f"client: --ca {issued.ca} --cert {args.out}/client-NAME.pem --key {args.out}/client-NAME.key\n"
        f"Keep {issued.directory / 'ca.key'} offline: whoever holds it can mint clients.",
    )


def cmd_certs_issue(args: argparse.Namespace) -> None:
    issued = issue_client(Path(args.dir), args.tenant, args.days, overwrite=args.force)
    replaced = issued.as_dict()["replaced_serial"]
    emit(
        {"ok": True, **issued.as_dict()},
        args.json,
        f"issued {issued.cert} and {issued.key} for tenant {args.tenant} (serial {issued.serial:x}), signed by the "
        f"existing CA in {args.dir}."
        + (
            f"\nIt replaced serial {replaced}: certs revoke --serial {replaced} if its key may be out there."
            if replaced
            else ""
        ),
    )


def cmd_certs_revoke(args: argparse.Namespace) -> None:
    if bool(args.cert) == bool(args.serial):
        raise ValueError("certs revoke needs exactly one of --cert or --serial")
    serial = certificate_serial(Path(args.cert).read_bytes()) if args.cert else parse_serial(args.serial)
    added = Store(Path(args.store)).revoke_certificate(serial)
    emit(
        {"ok": True, "serial": f"{serial:x}", "already_revoked": not added},
        args.json,
        f"certificate serial {serial:x} {'is now' if added else 'was already'} revoked; a running daemon refuses it "
        "from the next call on",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="offsite-owner", description="Serve a model for offsite tuning.")
    commands = root.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        return sub

    serve = add("serve", "run the owner daemon")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="HF directory, .gguf file, hub id, or smollm2-135m")
    serve.add_argument("--store", required=True, help="the owner's store directory")
    serve.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT (port 0 picks a free one)")
    serve.add_argument(
        "--emulator",
        action="append",
        help=f"METHOD:L-N-R[,key=value...], e.g. distill:2-8-2,steps=100; repeatable (default {DEFAULT_EMULATOR})",
    )
    serve.add_argument("--eval-data", help="the owner's own validation set (JSONL)")
    serve.add_argument(
        "--release-margin",
        type=float,
        help="refuse to serve an emulator whose held-out perplexity is below full × (1 + MARGIN), e.g. 0.5",
    )
    serve.add_argument("--max-adapters", type=int, default=MAX_ADAPTERS_PER_TENANT, help="adapters per tenant")
    serve.add_argument(
        "--max-tenant-mib", type=int, default=MAX_TENANT_BYTES // MiB, help="adapter MiB a tenant may store"
    )
    serve.add_argument(
        "--max-streams", type=int, default=MAX_STREAMS_PER_TENANT, help="concurrent streaming calls per tenant"
    )
    serve.add_argument("--tls-cert", help="TLS: the server certificate (PEM), e.g. certs/server.pem")
    serve.add_argument("--tls-key", help="TLS: its private key (PEM)")
    serve.add_argument("--client-ca", help="mTLS: require client certificates signed by this CA, e.g. certs/ca.pem")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback address without TLS")
    serve.set_defaults(handler=cmd_serve)

    build = add("build-emulator", "build a signed emulator bundle")
    build.add_argument("--model", default=DEFAULT_MODEL)
    build.add_argument("--method", default="uniform", choices=sorted(BUILDERS))
    build.add_argument("--layout", required=True, help="L-N-R, e.g. 2-8-2")
    build.add_argument("--steps", type=int, help="distill: training steps (default 200)")
    build.add_argument("--data", help="distill: the owner's public text file (default: shipped WikiText-2 valid)")
    build.add_argument(
        "--place",
        choices=PLACEMENTS,
        help="uniform, distill: adapter blocks at the layout's ends (default) or the L+R most important blocks",
    )
    build.add_argument("--out", required=True)
    build.add_argument("--store", required=True, help="the store whose key signs the bundle")
    build.set_defaults(handler=cmd_build_emulator)

    certs = commands.add_parser("certs", help="TLS certificates").add_subparsers(dest="action", required=True)
    certs_init = certs.add_parser("init", help="make a CA, a server certificate and client certificates")
    certs_init.add_argument("--out", required=True, help="directory for ca.pem, server.pem, client-NAME.pem and keys")
    certs_init.add_argument("--server-name", required=True, help="the host name or IP clients dial")
    certs_init.add_argument("--clients", default="", help="comma-separated tenant names, e.g. alice,bob")
    certs_init.add_argument("--days", type=int, default=DEFAULT_VALID_DAYS)
    certs_init.add_argument("--force", action="store_true", help="replace an existing CA")
    certs_init.add_argument("--json", action="store_true")
    certs_init.set_defaults(handler=cmd_certs_init)

    certs_issue = certs.add_parser("issue", help="one more client certificate, signed by the existing CA")
    certs_issue.add_argument(
        "--dir", required=True, help="the certs init directory (ca.pem, ca.key); output goes there"
    )
    certs_issue.add_argument("--tenant", required=True, help="the tenant the certificate names (its common name)")
    certs_issue.add_argument("--days", type=int, default=DEFAULT_VALID_DAYS)
    certs_issue.add_argument("--force", action="store_true", help="replace the tenant's existing certificate files")
    certs_issue.add_argument("--json", action="store_true")
    certs_issue.set_defaults(handler=cmd_certs_issue)
    certs_revoke = certs.add_parser("revoke", help="refuse a client certificate from the next call on")
    certs_revoke.add_argument("--store", required=True)
    certs_revoke.add_argument("--cert", help="the certificate file (PEM) to revoke")
    certs_revoke.add_argument("--serial", help="or its serial, in hex as certs issue prints it")
    certs_revoke.add_argument("--json", action="store_true")
    certs_revoke.set_defaults(handler=cmd_certs_revoke)

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    for action, help_text, handler in (
        ("add", "add a tenant and hand over its token once", cmd_tenants_add),
        ("rotate", "give a tenant a new token; the old one stops working", cmd_tenants_rotate),
        ("remove", "remove a tenant and its adapters; its token and certificate stop working", cmd_tenants_remove),
        ("list", "list tenants with their adapters (never tokens)", cmd_tenants_list),
    ):
        sub = tenants.add_parser(action, help=help_text)
        if action != "list":
            sub.add_argument("name")
        sub.add_argument("--store", required=True)
        sub.add_argument("--json", action="store_true")
        if action in ("add", "rotate"):
            sub.add_argument("--token-file", help="write the token to this new file (mode 0600) instead of stdout")
            sub.add_argument("--show-token", action="store_true", help="with --json: include the token in the output")
        sub.set_defaults(handler=handler)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    quiet_libraries()
    os.umask(STORE_UMASK)  # whatever the owner writes (store, bundles, keys) is its own until it shares it
    try:
        args.handler(args)
    except (
        LayoutError,
        ModelNotFound,
        UnsupportedArchitecture,
        DataError,
        BindRefused,
        CertificateError,
        ValueError,
        OSError,
    ) as error:
        fail(str(error), getattr(args, "json", False))

"""`offsite-owner`: the model owner's daemon and its local admin commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from ..common import output_dir, processes
from ..common.architectures import UnsupportedArchitecture
from ..common.cli_output import emit, fail, quiet_libraries
from ..common.contract import DEFAULT_MODEL, KiB, MiB
from ..common.examples import DataError, read_jsonl
from ..common.model_loading import ModelNotFound, fingerprint, load_model, placement
from .audit import CallObserver, RpcLog, configure_logging
from .audit_chain import AUDIT_FILE, Head, Rotation, verify_audit
from .certificates import (
    DEFAULT_CRL_DAYS,
    DEFAULT_VALID_DAYS,
    KEY_MODE,
    CertificateError,
    certificate_serial,
    init_certificates,
    issue_client,
    parse_serial,
    write_crl,
)
from .config import OPTIONS_BY_KEY, Effective, add_serve_arguments, check_file, read_file, resolve, to_toml
from .emulator import BUILDERS, EmulatorSpec, build_emulator
from .emulator.distill import DEFAULT_TOKENS, DistillConfig
from .emulator.layout import LayoutError
from .emulator.placement import PLACEMENTS
from .export import export_adapter
from .limits import ServerLimits, TenantLimits
from .metrics import MetricsEndpoint, OwnerMetrics, serve_metrics
from .model_queue import ModelQueue
from .server import BindRefused, ServerTls, shutdown, start_server
from .service import OwnerService, RepresentPolicy
from .store import REGISTRY_FILE, STORE_UMASK, Store

SHUTDOWN_GRACE_SECONDS = 10.0
SIGNAL_POLL_SECONDS = 0.2
SECRET_MODE = KEY_MODE  # a token file is as secret as a key

log = logging.getLogger("offsite.owner")


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    if not args.tls_cert and not args.tls_key:
        if args.client_ca:
            raise ValueError("--client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return ServerTls(Path(args.tls_cert), Path(args.tls_key), Path(args.client_ca) if args.client_ca else None)


def serve_settings(args: argparse.Namespace) -> Effective:
    """The flags given on the command line over OFFSITE_* variables over the config file over the defaults."""
    given = {key: value for key, value in vars(args).items() if key in OPTIONS_BY_KEY}
    return resolve(given, getattr(args, "config", None))


def represent_policy(args: argparse.Namespace) -> RepresentPolicy:
    return RepresentPolicy(
        represent=args.represent,
        head_artifact=args.head_artifact,
        log_probs=args.represent_log_probs,
        max_top_k=args.represent_top_k,
        token_budget=args.represent_token_budget,
        budget_window_seconds=args.represent_budget_window_seconds,
    )


def describe_policy(policy: RepresentPolicy) -> str:
    """One line for the banner: what a tenant can get from Represent and the head artifact."""
    if not policy.represent:
        served = "off"
    else:
        top_k = f" (k ≤ {policy.max_top_k})" if policy.log_probs == "top_k" else ""
        budget = (
            f"{policy.token_budget:,} positions per {policy.budget_window_seconds:g} s per tenant"
            if policy.token_budget
            else "no budget"
        )
        served = f"log-probs {policy.log_probs}{top_k}, {budget}"
    return f"{served}; head artifact {'offered' if policy.head_artifact else 'off'}"


def _tls_mode(tls: ServerTls | None) -> str:
    if tls is None:
        return "off"
    return f"mutual (client CA {tls.client_ca})" if tls.client_ca else "on"


def banner_fields(
    args: argparse.Namespace, service: OwnerService, address: str, tls: ServerTls | None, metrics_url: str | None
) -> dict[str, object]:
    """What an operator checks first after a start: where, which model and emulators, which key, how secured."""
    return {
        "event": "banner",
        "address": address,
        "model": service.loaded.name,
        "architecture": service.loaded.model.config.model_type,
        "devices": placement(service.loaded.model),
        "emulators": {
            emulator_id: {"parameters": int(e.manifest["parameters"]), "bytes": e.bytes}
            for emulator_id, e in sorted(service.emulators.items())
        },
        "owner_public_key": service.public_key,
        "tls": _tls_mode(tls),
        "represent": describe_policy(service.represent_policy),
        "metrics": metrics_url,
        "log_format": args.log_format,
        "config": args.config,
        "audit_log": str(Path(args.store) / AUDIT_FILE),
    }


def render_banner(fields: dict[str, object]) -> str:
    emulators = fields["emulators"]
    assert isinstance(emulators, dict)
    rows = [
        ("address", fields["address"]),
        ("model", f"{fields['model']} ({fields['architecture']})"),
        ("devices", fields["devices"]),
        *(
            ("emulator", f"{name}: {info['parameters']:,} parameters, {info['bytes'] / MiB:,.1f} MiB")
            for name, info in emulators.items()
        ),
        ("owner key", fields["owner_public_key"]),
        ("TLS", fields["tls"]),
        *((("represent", fields["represent"]),) if "represent" in fields else ()),
        ("metrics", fields["metrics"] or "off (--metrics-port N)"),
        ("logs", fields["log_format"]),
        ("audit log", fields["audit_log"]),
        ("config", fields["config"] or "none (flags, OFFSITE_* and defaults)"),
    ]
    return "offsite-owner\n" + "\n".join(f"  {label:<10} {value}" for label, value in rows)


def _start_metrics(metrics: OwnerMetrics, host: str, port: int) -> MetricsEndpoint:
    try:
        return serve_metrics(metrics, host, port)
    except OSError as error:
        raise BindRefused(
            f"cannot serve metrics on {host}:{port} (--metrics-port): {error.strerror or error}"
        ) from None


def cmd_serve(args: argparse.Namespace) -> None:
    args = serve_settings(args).namespace()
    configure_logging(args.log_format, args.log_level)
    sys.setswitchinterval(args.gil_switch_ms / 1000)
    store = Store(Path(args.store), exclusive=True)  # before recover: it sweeps what it takes for crash leftovers
    removed = store.recover()
    if removed:
        log.info("recovered the store: removed %d leftover(s) of interrupted writes", len(removed))
    specs = [EmulatorSpec.parse(text) for text in args.emulator]
    owner_examples = read_jsonl(Path(args.eval_data)) if args.eval_data else None
    log.info("loading %s ...", args.model)
    loaded = load_model(args.model, cache_dir=store.models_dir, device_map=args.device_map)
    limits = TenantLimits(args.max_adapters, args.max_tenant_mib * MiB, args.max_streams)
    service = OwnerService(
        loaded,
        store,
        specs,
        owner_examples,
        release_margin=args.release_margin,
        limits=limits,
        represent_policy=represent_policy(args),
        model_queue=ModelQueue(args.model_workers, args.model_queue_per_tenant, args.model_queue_total),
        chunk_bytes=args.pull_chunk_kib * KiB,
    )
    if store.tenant_count() == 0:
        log.warning("no tenants yet; add one with: offsite-owner tenants add NAME --store %s", args.store)
    observers: list[CallObserver] = [RpcLog()]
    endpoint = None
    if args.metrics_port:
        metrics = OwnerMetrics(store, model_queue=service.model_queue)
        metrics.offer({emulator_id: e.bytes for emulator_id, e in service.emulators.items()})
        observers.append(metrics)
        endpoint = _start_metrics(metrics, args.metrics_host, args.metrics_port)  # a taken port fails before serving
    tls = _server_tls(args)
    try:
        server, port = start_server(
            service,
            store,
            args.listen,
            insecure=args.insecure,
            tls=tls,
            limits=ServerLimits(args.max_streams_total + args.unary_reserve, args.max_streams_total),
            observers=observers,
            audit_rotation=Rotation(args.audit_max_mib * MiB, args.audit_keep),
        )
    except BaseException:
        if endpoint:
            endpoint.close()
        raise
    host = args.listen.rsplit(":", 1)[0]
    fields = banner_fields(args, service, f"{host}:{port}", tls, endpoint.url if endpoint else None)
    if args.log_format == "json":
        log.info("ready", extra={"fields": fields})
    else:
        print(render_banner(fields), file=sys.stderr, flush=True)
    emit(
        {
            "event": "ready",
            "address": f"{host}:{port}",
            "port": port,
            "emulators": sorted(service.emulators),
            "owner_public_key": service.public_key,
            "metrics_port": endpoint.port if endpoint else None,
        },
        args.json,
        f"serving {loaded.name} on {host}:{port}; emulators: {', '.join(sorted(service.emulators))}; "
        f"owner key {service.public_key}",
    )

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # a timed wait: the kernel may hand SIGTERM to a busy worker thread, and Python runs the handler only when the
    # main thread next executes bytecode; an untimed wait could then sleep through the signal for good
    while not stop.is_set():
        stop.wait(SIGNAL_POLL_SECONDS)
    log.info("shutting down: health NOT_SERVING, then draining in-flight calls")
    shutdown(server, args.shutdown_notice_seconds, SHUTDOWN_GRACE_SECONDS)
    if endpoint:
        endpoint.close()
    store.close()


def cmd_config_show(args: argparse.Namespace) -> None:
    effective = resolve({}, args.config, require=False)
    emit(
        {
            "ok": True,
            "config": effective.redacted(),
            "sources": effective.sources,
            "file": str(effective.file) if effective.file else None,
        },
        args.json,
        to_toml(effective),
    )


def cmd_config_check(args: argparse.Namespace) -> None:
    path = Path(args.file)
    problems = check_file(path)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if args.json:
            print(json.dumps({"ok": False, "file": args.file, "errors": problems}), flush=True)
        sys.exit(2)
    keys = sorted(read_file(path))
    emit({"ok": True, "file": args.file, "keys": keys}, args.json, f"{args.file}: ok ({len(keys)} key(s) set)")


def cmd_build_emulator(args: argparse.Namespace) -> None:
    given = (
        ("steps", args.steps),
        ("data", args.data),
        ("place", args.place),
        ("bridge", "1" if args.bridge else None),
    )
    options = "".join(f",{key}={value}" for key, value in given if value)
    spec = EmulatorSpec.parse(f"{args.method}:{args.layout}{options}")
    out = Path(args.out)
    output_dir.check(out, output_dir.EMULATOR)  # before the model loads
    if processes.process_count() > 1 and spec.method != "distill":
        raise SystemExit(f"error: only distill trains; build {spec.method} in one process, without accelerate launch")
    if not processes.is_main_process():  # under accelerate launch: train beside rank 0 in its staging, write nothing
        processes.wait_for_everyone()  # rank 0 has converted the model, made the key and the staging
        store = Store(Path(args.store))
        loaded = load_model(args.model, cache_dir=store.models_dir)
        work = output_dir.staged_path(out)
        build_emulator(loaded.model, loaded.tokenizer, spec, work, store.signing_key(), "", loaded.name)
        return
    store = Store(Path(args.store))
    loaded = load_model(args.model, cache_dir=store.models_dir)
    key = store.signing_key()
    # resume: a long build keeps its resumable state inside the staging directory
    with output_dir.staged(out, output_dir.EMULATOR, resume=True) as work:
        processes.wait_for_everyone()
        base = fingerprint(loaded.model)
        manifest = build_emulator(loaded.model, loaded.tokenizer, spec, work, key, base, loaded.name)
    assert manifest is not None  # rank 0 writes the bundle
    emit(
        {
            "ok": True,
            "out": args.out,
            "id": manifest["id"],
            "block_map": manifest["block_map"],
            "adapter_blocks": manifest["adapter_blocks"],
            "parameters": manifest["parameters"],
            "bridge": manifest["report_card"].get("bridge"),
        },
        args.json,
        f"wrote emulator {manifest['id']} to {args.out}: blocks {manifest['block_map']}, "
        f"{manifest['parameters']:,} parameters, adapter blocks {manifest['adapter_blocks']['full']}"
        + bridge_summary(manifest["report_card"].get("bridge")),
    )


def bridge_summary(card: dict[str, Any] | None) -> str:
    """What the bridge gives away, in a line the owner reads before serving the bundle."""
    if card is None:
        return ""
    return (
        f"\nbridge on held-out text: cosine {card['cosine_before']:.3f} -> {card['cosine_after']:.3f}, "
        f"NMSE {card['nmse_before']:.3f} -> {card['nmse_after']:.3f}; through the head, top-1 agreement with the "
        f"full model {card['top1_emulator']:.3f} -> {card['top1_bridged']:.3f}, perplexity "
        f"{card['perplexity_emulator']:.2f} -> {card['perplexity_bridged']:.2f} (full {card['perplexity_full']:.2f})"
    )


def cmd_export(args: argparse.Namespace) -> None:
    if not (Path(args.store) / REGISTRY_FILE).is_file():
        raise ValueError(f"{args.store} is not an offsite store (it has no {REGISTRY_FILE}); check --store")
    manifest = export_adapter(Store(Path(args.store)), args.adapter_id, Path(args.out), args.model, args.tenant)
    files = manifest["files"]
    size = sum(entry["size"] for entry in files.values())
    emit(
        {
            "ok": True,
            "out": args.out,
            **{key: manifest[key] for key in ("adapter_id", "tenant", "method", "base_model", "base_fingerprint")},
            "files": sorted(files),
            "bytes": size,
        },
        args.json,
        f"exported adapter {manifest['adapter_id']} ({manifest['method']}, tenant {manifest['tenant']}) merged into "
        f"{manifest['base_model']} to {args.out}: {len(files)} files, {size / MiB:,.1f} MiB. "
        "Load it with AutoModelForCausalLM.from_pretrained, lm_eval --model hf or vllm serve.",
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
    store = Store(Path(args.store))
    added = store.revoke_certificate(serial)
    crl = write_crl(Path(args.dir), store.revoked_certificates()) if args.dir else None
    emit(
        {"ok": True, "serial": f"{serial:x}", "already_revoked": not added, "crl": str(crl) if crl else None},
        args.json,
        f"certificate serial {serial:x} {'is now' if added else 'was already'} revoked; a running daemon refuses it "
        "from the next call on" + (f"; CRL written to {crl}" if crl else ""),
    )


def cmd_certs_crl(args: argparse.Namespace) -> None:
    revoked = Store(Path(args.store)).revoked_certificates()
    crl = write_crl(Path(args.dir), revoked, args.days)
    emit(
        {"ok": True, "crl": str(crl), "revoked": len(revoked), "days": args.days},
        args.json,
        f"wrote {crl}: {len(revoked)} revoked serial(s), signed by the CA in {args.dir}, valid {args.days} day(s)",
    )


def cmd_audit_verify(args: argparse.Namespace) -> None:
    verification = verify_audit(Path(args.store), Head.parse(args.expect) if args.expect else None)
    emit(verification.as_dict(), args.json, verification.summary())
    if not verification.ok:
        sys.exit(1)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="offsite-owner", description="Serve a model for offsite tuning.")
    commands = root.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        return sub

    serve = commands.add_parser(
        "serve",
        help="run the owner daemon",
        epilog="Every flag is also a key of the --config file (its name with underscores, e.g. metrics_port) and "
        "an OFFSITE_<KEY> variable; flags override variables, which override the file.",
    )
    add_serve_arguments(serve)  # owner/config.py: the one table of serve options (flags, keys, defaults)
    serve.set_defaults(handler=cmd_serve)

    config = commands.add_parser("config", help="the daemon's configuration").add_subparsers(
        dest="action", required=True
    )
    config_show = config.add_parser(
        "show", help="print the configuration serve would use (defaults < file < OFFSITE_*), secrets redacted"
    )
    config_show.add_argument("--config", help="the TOML file (default $OFFSITE_CONFIG)")
    config_show.add_argument("--json", action="store_true")
    config_show.set_defaults(handler=cmd_config_show)
    config_check = config.add_parser("check", help="validate a config file; each error names its key")
    config_check.add_argument("file")
    config_check.add_argument("--json", action="store_true")
    config_check.set_defaults(handler=cmd_config_check)

    build = add("build-emulator", "build a signed emulator bundle")
    build.add_argument("--model", default=DEFAULT_MODEL)
    build.add_argument("--method", default="uniform", choices=sorted(BUILDERS))
    build.add_argument("--layout", required=True, help="L-N-R, e.g. 2-8-2")
    build.add_argument(
        "--steps",
        type=int,
        help=f"distill: training steps (default {DistillConfig().with_tokens(DEFAULT_TOKENS).steps}: "
        f"{DEFAULT_TOKENS:,} tokens)",
    )
    build.add_argument(
        "--data", help="distill: the owner's public text file (default: the shipped Project Gutenberg novels)"
    )
    build.add_argument(
        "--place",
        choices=PLACEMENTS,
        help="uniform, distill: adapter blocks at the layout's ends (default) or the L+R most important blocks",
    )
    build.add_argument(
        "--bridge",
        action="store_true",
        help="also fit and ship bridge.safetensors, an affine map from the emulator's final states to the full "
        "model's, for hybrid PEMA (`offsite memory build --emulator` applies it); the report card shows what it "
        "reveals. Same as the spec option bridge=1 of `serve --emulator`",
    )
    build.add_argument("--out", required=True)
    build.add_argument("--store", required=True, help="the store whose key signs the bundle")
    build.set_defaults(handler=cmd_build_emulator)

    export = add("export", "merge a stored adapter into the full model, as a plain Hugging Face model directory")
    export.add_argument("--adapter-id", required=True, help="the id `offsite push` printed")
    export.add_argument("--out", required=True, help="a new or empty directory; an earlier export there is replaced")
    export.add_argument("--store", required=True)
    export.add_argument("--model", default=DEFAULT_MODEL, help="the MODEL the daemon serves (default %(default)s)")
    export.add_argument("--tenant", help="whose adapter, needed only when several tenants pushed the same one")
    export.set_defaults(handler=cmd_export)

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
    certs_revoke.add_argument("--dir", help="the certs init directory: also write its crl.pem, signed by its CA")
    certs_revoke.add_argument("--json", action="store_true")
    certs_revoke.set_defaults(handler=cmd_certs_revoke)
    certs_crl = certs.add_parser("crl", help="write crl.pem anew (every revoked serial), before the old one expires")
    certs_crl.add_argument("--store", required=True)
    certs_crl.add_argument("--dir", required=True, help="the certs init directory (ca.pem, ca.key); output goes there")
    certs_crl.add_argument("--days", type=int, default=DEFAULT_CRL_DAYS, help="until the CRL's next update")
    certs_crl.add_argument("--json", action="store_true")
    certs_crl.set_defaults(handler=cmd_certs_crl)

    audit = commands.add_parser("audit", help="the audit log").add_subparsers(dest="action", required=True)
    audit_verify = audit.add_parser(
        "verify", help="check the audit log's hash chain; exit 1 at the first edited, removed or cut line"
    )
    audit_verify.add_argument(
        "--store",
        default=os.environ.get("OFFSITE_STORE"),
        required="OFFSITE_STORE" not in os.environ,
        help="the store (default $OFFSITE_STORE)",
    )
    audit_verify.add_argument(
        "--expect", metavar="SEQ:SHA256", help="a line an earlier verify printed, kept elsewhere: it must still be here"
    )
    audit_verify.add_argument("--json", action="store_true")
    audit_verify.set_defaults(handler=cmd_audit_verify)

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

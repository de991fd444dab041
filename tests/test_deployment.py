"""The container deployment (issue 16, finding 8): role-separated certificate volumes and a non-root image.

No Docker engine runs here, so these tests read Dockerfile and docker-compose.yml: each role must get only the
files it needs (the data owner never the CA key or another tenant's key), every file a service names must be one a
volume actually holds, and the image must run as an unprivileged user with the CPU build of torch.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml  # a dependency of transformers, so always installed with offsite

from offsite.client import cli as client_cli
from offsite.owner import cli as owner_cli

ROOT = Path(__file__).resolve().parents[1]
CA_KEY = "ca.key"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def shell_statements(command: str) -> list[list[str]]:
    """The statements of a `sh -c "..."` command (split at `;`, `||`, `&&` outside quotes), each as its words."""
    words = shlex.split(command)
    script = words[-1] if words[:2] == ["sh", "-c"] else command
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    statements: list[list[str]] = [[]]
    for word in lexer:
        if word in (";", "||", "&&"):
            statements.append([])
        else:
            statements[-1].append(word)
    return [statement for statement in statements if statement]


def mounts(service: dict) -> dict[str, str]:
    """Mount target -> named volume."""
    found = {}
    for entry in service.get("volumes", []):
        volume, target = entry.split(":")[:2]
        found[target] = volume
    return found


def volume_files(compose: dict) -> dict[str, set[str]]:
    """The files each named volume receives from the job that makes the certificates: `certs init --out DIR`
    (everything, the CA key included) and `install ... SRC... DEST/`."""
    held: dict[str, set[str]] = {}
    for service in compose["services"].values():
        targets = mounts(service)
        for words in shell_statements(service.get("command", "")):
            if words[:3] == ["offsite-owner", "certs", "init"]:
                volume = targets[words[words.index("--out") + 1]]
                clients = words[words.index("--clients") + 1].split(",")
                init = {"ca.pem", CA_KEY, "server.pem", "server.key"}
                held.setdefault(volume, set()).update(
                    init | {f"client-{c}.{e}" for c in clients for e in ("pem", "key")}
                )
            elif words and words[0] == "install":
                mode_at = words.index("-m")
                paths = words[mode_at + 2 :]
                destination = targets[paths[-1].rstrip("/")]
                held.setdefault(destination, set()).update(Path(p).name for p in paths[:-1])
    return held


def referenced_files(service: dict, target: str) -> set[str]:
    text = " ".join([service.get("command", ""), *map(str, (service.get("environment") or {}).values())])
    return set(re.findall(rf"(?<![\w.-]){re.escape(target)}/([\w.-]+)", text))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_image_runs_as_a_non_root_user_and_installs_the_cpu_torch_build() -> None:
    instructions = dockerfile_instructions(ROOT / "Dockerfile")
    users = [i for i, (word, _) in enumerate(instructions) if word == "USER"]
    assert users, "the image runs as root: no USER instruction"
    user = instructions[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), user
    runs = [args for word, args in instructions if word == "RUN"]
    creates_user = [args for args in runs if re.search(rf"\buseradd\b.*\b{re.escape(user)}\b", args)]
    assert creates_user or user.isdigit(), f"USER {user} is never created"
    torch_installs = [i for i, args in enumerate(runs) if re.search(r"pip install\b.*\btorch\b", args)]
    assert torch_installs and TORCH_CPU_INDEX in runs[torch_installs[0]]
    package_install = next(i for i, args in enumerate(runs) if re.search(r"pip install (--\S+ )*\.( |$)", args))
    assert torch_installs[0] < package_install, "torch must come from the CPU index before `pip install .` wants it"
    for word, args in instructions:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_data_owner_gets_only_its_own_key_and_the_ca_certificate(compose: dict) -> None:
    held = volume_files(compose)
    ca_volumes = {volume for volume, files in held.items() if CA_KEY in files}
    assert ca_volumes, "no job makes the CA"
    services = compose["services"]
    data_owner = mounts(services["data-owner"])
    assert not ca_volumes & set(data_owner.values()), "the data owner's container can read the CA key"
    assert held[data_owner["/certs"]] == {"ca.pem", "client-alice.pem", "client-alice.key"}
    owner = mounts(services["owner"])
    assert not ca_volumes & set(owner.values()), "the daemon does not need the CA key, only the CA certificate"
    assert held[owner["/certs"]] == {"ca.pem", "server.pem", "server.key"}
    for name in ("owner", "data-owner"):
        assert all(entry.endswith(":ro") for entry in services[name]["volumes"] if ":/certs" in entry), name


def test_every_file_a_service_names_is_in_a_volume_it_mounts(compose: dict) -> None:
    held = volume_files(compose)
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, volume in mounts(service).items():
            assert volume in declared, f"{name}: volume {volume} is not declared"
            missing = referenced_files(service, target) - held.get(volume, set()) if volume in held else set()
            assert not missing, f"{name} names {sorted(missing)} under {target}, which volume {volume} never receives"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    # the data owner's job reads the package's own sample data from the image's site-packages
    command = compose["services"]["data-owner"]["command"]
    python = re.search(r"FROM python:(\d+\.\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    data_dir = re.search(r"D=(\S+);", command).group(1)
    assert data_dir == f"/usr/local/lib/python{python}/site-packages/offsite/client/data"
    for file in re.findall(r"\$\$D/([\w.-]+)", command):
        assert (ROOT / "client" / "data" / file).is_file(), file


def cli_statements(compose: dict) -> list[tuple[str, list[str]]]:
    """(service, words) of every `offsite-owner ...` or `offsite ...` statement in a service's command."""
    found = []
    for name, service in compose["services"].items():
        for words in shell_statements(service.get("command", "")):
            words = words[1:] if words[:1] == ["exec"] else words
            if words and words[0] in ("offsite-owner", "offsite"):
                redirect = next((i for i, word in enumerate(words) if re.match(r"\d*>", word)), len(words))
                found.append((name, words[:redirect]))  # the redirections at its end are the shell's, not the CLI's
    return found


def test_every_command_parses_with_the_cli_and_every_published_port_is_served(compose: dict) -> None:
    parsers = {"offsite-owner": owner_cli.parser(), "offsite": client_cli.parser()}
    statements = cli_statements(compose)
    assert {words[0] for _, words in statements} == set(parsers)
    for name, words in statements:
        environment = compose["services"][name].get("environment") or {}
        # $$TLS and the like come from the service's environment; $$D, $$ID are the script's own variables
        expanded = [part for w in words for part in (shlex.split(environment.get(w[2:], w)))]
        try:
            parsers[words[0]].parse_args(expanded[1:])
        except SystemExit:
            pytest.fail(f"{name}: {' '.join(expanded)} is not a valid command line")
    owner = compose["services"]["owner"]
    serve = next(words for name, words in statements if name == "owner" and words[1] == "serve")
    served = {
        int(serve[serve.index("--listen") + 1].rsplit(":", 1)[1]),
        int(serve[serve.index("--metrics-port") + 1]),
    }
    published = {int(str(entry).rsplit(":", 1)[1]) for entry in owner["ports"]}
    assert published == served, f"published {sorted(published)}, the daemon serves {sorted(served)}"
    assert serve[serve.index("--metrics-host") + 1] == "0.0.0.0", "metrics on loopback cannot leave the container"
    probed = {int(port) for port in re.findall(r"\b(\d{4,5})\b", " ".join(owner["healthcheck"]["test"]))}
    assert served & probed, f"the health check probes {sorted(probed)}, none of which the daemon serves"

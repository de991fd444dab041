"""The daemon's configuration: one table behind flags, OFFSITE_* variables and a TOML file, and `config` commands."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from offsite.common.contract import DEFAULT_EMULATOR, DEFAULT_MODEL, MAX_ADAPTERS_PER_TENANT
from offsite.owner.cli import parser, serve_settings
from offsite.owner.config import (
    OPTIONS_BY_KEY,
    REDACTED,
    ConfigError,
    check_file,
    read_file,
    resolve,
    to_toml,
    tomllib,
)
from offsite.owner.limits import GIL_SWITCH_MS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "owner" / "offsite-owner.example.toml"


def serve_parser() -> argparse.ArgumentParser:
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices["serve"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    """An `offsite-owner ARGV --json` command in-process (no umask change): exit code, last JSON line, stderr."""
    args = parser().parse_args([*argv, "--json"])
    code = 0
    try:
        args.handler(args)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def write(tmp_path: Path, text: str, name: str = "owner.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_serve_flag_is_a_config_key_of_the_same_name() -> None:
    flags = {
        action.dest: action.option_strings
        for action in serve_parser()._actions
        if action.dest not in ("help", "config")
    }
    assert set(flags) == set(OPTIONS_BY_KEY)
    for key, strings in flags.items():
        assert f"--{key.replace('_', '-')}" in strings, key


def test_the_existing_flags_keep_their_names_and_defaults() -> None:
    args = serve_parser().parse_args(["--store", "s"])
    values = serve_settings(args).values
    assert values["model"] == DEFAULT_MODEL and values["listen"] == "127.0.0.1:50051"
    assert values["emulator"] == [DEFAULT_EMULATOR] and values["max_adapters"] == MAX_ADAPTERS_PER_TENANT
    assert values["max_tenant_mib"] == 2048 and values["max_streams"] == 4
    assert values["insecure"] is False and values["tls_cert"] is None and values["release_margin"] is None
    assert values["metrics_port"] == 0 and values["log_format"] == "text"
    given = serve_parser().parse_args(
        ["--store", "s", "--emulator", "uniform:1-2-1", "--emulator", "distill:1-2-1", "--insecure", "--json"]
    )
    values = serve_settings(given).values
    assert values["emulator"] == ["uniform:1-2-1", "distill:1-2-1"] and values["insecure"] and values["json"]


def test_flags_override_the_environment_which_overrides_the_file(tmp_path: Path) -> None:
    config = write(tmp_path, 'store = "/s"\nlisten = "127.0.0.1:1"\nmodel = "from-file"\nmax_streams = 2\n')
    environ = {"OFFSITE_LISTEN": "127.0.0.1:2", "OFFSITE_MODEL": "from-env", "OFFSITE_INSECURE": "yes"}
    effective = resolve({"model": "from-flag"}, config, environ)
    assert effective.values["model"] == "from-flag" and effective.sources["model"] == "flag"
    assert effective.values["listen"] == "127.0.0.1:2" and effective.sources["listen"] == "env"
    assert effective.values["max_streams"] == 2 and effective.sources["max_streams"] == "file"
    assert effective.values["insecure"] is True
    assert effective.sources["max_adapters"] == "default"
    # the file may be named by OFFSITE_CONFIG; an empty variable counts as unset
    named = resolve({}, None, {"OFFSITE_CONFIG": str(config), "OFFSITE_MODEL": ""})
    assert named.values["model"] == "from-file" and named.file == config


def test_relative_paths_in_a_file_are_taken_from_its_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    config = write(tmp_path / "etc", 'store = "store"\ntls_cert = "/abs/server.pem"\nmodel = "smollm2-135m"\n')
    settings = read_file(config)
    assert settings["store"] == str((tmp_path / "etc" / "store").resolve())
    assert settings["tls_cert"] == "/abs/server.pem" and settings["model"] == "smollm2-135m"  # not a path key


@pytest.mark.parametrize(
    "text, expected",
    [
        ("metric_port = 9100\n", "unknown key 'metric_port'; did you mean 'metrics_port'?"),
        ("colour = 1\n", "unknown key 'colour'"),
        ('metrics_port = "9100"\n', "key 'metrics_port' must be an integer, not a string"),
        ("max_adapters = true\n", "key 'max_adapters' must be an integer, not a boolean"),
        ("insecure = 1\n", "key 'insecure' must be true or false"),
        ("emulator = [1, 2]\n", "key 'emulator' must be a list of strings"),
        ('log_format = "xml"\n', "key 'log_format' must be one of text, json"),
        ("metrics_port = 70000\n", "key 'metrics_port': 70000 is not a port"),
        ('listen = "localhost"\n', "key 'listen': 'localhost' is not HOST:PORT"),
        ('emulator = ["uniform:2-x-2"]\n', "key 'emulator'"),
        ("[serve]\nmodel = 'x'\n", "unknown key 'serve'"),
        ("model = \n", "is not valid TOML"),
    ],
)
def test_check_names_the_key_at_fault(tmp_path: Path, text: str, expected: str) -> None:
    problems = check_file(write(tmp_path, text))
    assert len(problems) == 1 and expected in problems[0], problems


def test_check_reports_every_problem_and_a_good_file_has_none(tmp_path: Path) -> None:
    assert len(check_file(write(tmp_path, 'metric_port = 1\nmax_streams = "4"\n'))) == 2
    assert check_file(write(tmp_path, 'release_margin = 1\nemulator = "uniform:1-2-1"\n', "good.toml")) == []
    assert read_file(tmp_path / "good.toml") == {"release_margin": 1.0, "emulator": ["uniform:1-2-1"]}


def test_the_environment_is_checked_and_named_too() -> None:
    with pytest.raises(ConfigError, match="OFFSITE_METRICS_PORT must be an integer"):
        resolve({"store": "s"}, None, {"OFFSITE_METRICS_PORT": "lots"})
    with pytest.raises(ConfigError, match="OFFSITE_INSECURE must be one of"):
        resolve({"store": "s"}, None, {"OFFSITE_INSECURE": "maybe"})
    emulators = resolve({"store": "s"}, None, {"OFFSITE_EMULATOR": "uniform:1-2-1 distill:2-8-2,steps=10"})
    assert emulators.values["emulator"] == ["uniform:1-2-1", "distill:2-8-2,steps=10"]
    with pytest.raises(ConfigError, match="--metrics-port: 99999 is not a port"):
        resolve({"store": "s", "metrics_port": 99999}, None, {})


def test_the_store_must_come_from_somewhere() -> None:
    with pytest.raises(ConfigError, match="store is required: pass --store, set store in the config file, or OFFSITE"):
        resolve({}, None, {})
    assert resolve({}, None, {}, require=False).values["store"] is None


def test_the_shipped_example_passes_config_check(capsys: pytest.CaptureFixture[str]) -> None:
    code, result, _ = run(["config", "check", str(EXAMPLE)], capsys)
    assert code == 0 and result["ok"], result
    commented = re.findall(r"^# ([a-z_]+) = ", EXAMPLE.read_text(), flags=re.MULTILINE)
    documented = set(read_file(EXAMPLE)) | set(commented)
    assert documented == set(OPTIONS_BY_KEY)  # every key appears, set or commented out


def test_config_check_fails_with_the_keys_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, 'metrics_port = "x"\nlisten_on = "0.0.0.0:1"\n')
    code, result, err = run(["config", "check", str(bad)], capsys)
    assert code == 2 and not result["ok"] and len(result["errors"]) == 2
    assert "metrics_port" in err and "listen_on" in err and "did you mean 'listen'?" in err


def test_config_show_redacts_secrets_and_says_where_values_came_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, 'store = "store"\ntls_cert = "c.pem"\ntls_key = "secret-name.key"\n')
    monkeypatch.setenv("OFFSITE_METRICS_PORT", "9464")
    code, result, _ = run(["config", "show", "--config", str(config)], capsys)
    assert code == 0
    assert result["config"]["tls_key"] == REDACTED and result["config"]["metrics_port"] == 9464
    assert result["sources"]["metrics_port"] == "env" and result["sources"]["store"] == "file"
    assert result["config"]["store"] == str(tmp_path / "store")
    args = parser().parse_args(["config", "show", "--config", str(config)])
    args.handler(args)
    human = capsys.readouterr().out
    assert "secret-name" not in human and "# OFFSITE_METRICS_PORT" in human


def test_config_show_prints_a_file_serve_accepts(tmp_path: Path) -> None:
    config = write(tmp_path, 'store = "/s"\nemulator = ["uniform:1-2-1"]\nrelease_margin = 0.5\n')
    effective = resolve({"listen": "127.0.0.1:7"}, config, {})
    shown = write(tmp_path, to_toml(effective), "shown.toml")
    assert check_file(shown) == []
    again = tomllib.loads(shown.read_text())
    assert again == {k: v for k, v in effective.values.items() if v is not None}


def test_the_gil_switch_interval_is_a_setting_and_must_be_positive() -> None:
    assert resolve({"store": "s"}, None, {}).values["gil_switch_ms"] == GIL_SWITCH_MS
    assert resolve({"store": "s"}, None, {"OFFSITE_GIL_SWITCH_MS": "0.5"}).values["gil_switch_ms"] == 0.5
    with pytest.raises(ConfigError, match="gil-switch-ms"):
        resolve({"store": "s", "gil_switch_ms": 0.0}, None, {})

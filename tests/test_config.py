"""Config validation, lookup order and relative paths, seen through `pacs stats`."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_pacs, write_config

WS1 = {"host": "127.0.0.1", "port": 11113}


def assert_config_error(result, path: Path, key: str, problem: str) -> None:
    """Exit 2 and exactly one stderr line naming the file, the key and the problem."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and f": {key}: " in lines[0] and problem in lines[0], lines[0]


@pytest.mark.parametrize("overrides, key, problem", [
    ({"colour": "blue"}, "colour", "unknown key"),
    ({"storage": {"rot": "x"}}, "storage.rot", "unknown key"),
    ({"port": "eleven"}, "port", "expected an integer"),
    ({"port": 104.5}, "port", "expected an integer"),
    ({"storage": {"fsync": "yes"}}, "storage.fsync", "expected true or false"),
    ({"storage": {"on_duplicate": "sometimes"}}, "storage.on_duplicate", "must be one of"),
    ({"network": "fast"}, "network", "expected a mapping"),
    ({"port": 0}, "port", "1-65535"),
    ({"port": 65536}, "port", "1-65535"),
    ({"remote_aes": {"WS1": {**WS1, "port": 70000}}}, "remote_aes.WS1.port", "1-65535"),
    ({"ae_title": ""}, "ae_title", "must not be empty"),
    ({"ae_title": "A" * 17}, "ae_title", "at most 16 characters"),
    ({"ae_title": "MINI\\PACS"}, "ae_title", "backslash"),
    ({"ae_title": "MINI\tPACS"}, "ae_title", "control characters"),
    ({"ae_title": 1234}, "ae_title", "expected a string"),
    ({"remote_aes": {"WS1": {"port": 11113}}}, "remote_aes.WS1.host", "missing"),
    ({"remote_aes": {"WS1": {"host": "127.0.0.1"}}}, "remote_aes.WS1.port", "missing"),
    ({"remote_aes": {"W" * 17: WS1}}, f"remote_aes.{'W' * 17}", "at most 16 characters"),
    ({"remote_aes": {"WS1": {**WS1, "permissions": ["fly"]}}}, "remote_aes.WS1.permissions",
     "unknown permission"),
    ({"database": {"url": "mysql://db/pacs"}}, "database.url", "unsupported database URL"),
    ({"database": {"url": "sqlite:///pacs.yaml/index.sqlite"}}, "database.url", "cannot open"),
    ({"storage": {"root": "pacs.yaml"}}, "storage.root", "cannot create"),
    ({"logging": {"file": "pacs.yaml/pacs.log"}}, "logging.file", "cannot open"),
    ({"logging": {"backups": -1}}, "logging.backups", "must be 0 or more"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, overrides, key, problem):
    path = write_config(tmp_path, **overrides)
    assert_config_error(run_pacs("stats", config=path), path, key, problem)


@pytest.mark.parametrize("text, where, problem", [
    ("ae_title: [MINIPACS\nport: 104\n", "line", "invalid YAML"),
    ("- just\n- a list\n", "(top level)", "expected a mapping"),
])
def test_unusable_yaml(tmp_path, text, where, problem):
    path = tmp_path / "pacs.yaml"
    path.write_text(text)
    result = run_pacs("stats", config=path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert str(path) in result.stderr and where in result.stderr and problem in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    path = tmp_path / "absent.yaml"
    assert_config_error(run_pacs("stats", config=path), path, "cannot read", "No such file")


@pytest.fixture
def three_configs(tmp_path):
    """A config for each lookup step, each with another bad port: stderr tells which was read."""
    paths = {}
    for port, name in ((70001, "explicit"), (70002, "env"), (70003, "default")):
        folder = tmp_path / name / ("config" if name == "default" else "")
        folder.mkdir(parents=True)
        paths[name] = write_config(folder, port=port)
    return paths


@pytest.mark.parametrize("use_flag, use_env, chosen", [
    (True, True, "explicit"),
    (False, True, "env"),
    (False, False, "default"),
])
def test_lookup_order(three_configs, use_flag, use_env, chosen):
    result = run_pacs(
        "stats", config=three_configs["explicit"] if use_flag else None,
        cwd=three_configs["default"].parent.parent,
        env={"PACS_CONFIG": str(three_configs["env"]) if use_env else None},
    )
    assert_config_error(result, three_configs[chosen], "port", "1-65535")


def test_relative_paths_resolve_against_config_folder(tmp_path):
    folder = tmp_path / "site" / "conf"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_config(folder, storage={"root": "../data/store"},
                          database={"url": "sqlite:///../data/index.sqlite"},
                          logging={"file": "../logs/pacs.log"})
    result = run_pacs("stats", cwd=elsewhere, env={"PACS_CONFIG": "../site/conf/pacs.yaml"})
    assert result.returncode == 0, result.stderr
    assert "instances: 0" in result.stdout
    site = tmp_path / "site"
    assert (site / "data" / "store" / ".staging").is_dir()
    assert (site / "data" / "index.sqlite").is_file()
    assert (site / "logs" / "pacs.log").is_file()
    assert list(elsewhere.iterdir()) == []

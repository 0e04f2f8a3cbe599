"""Configuration: one frozen, validated object; bad values fail at start naming the key."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.settings import load_settings, read_site_key, settings_from_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "mcnode.example.toml"


def test_example_config_documents_and_loads_every_key(tmp_path):
    settings = load_settings(EXAMPLE)
    assert settings.node.port == 11112
    assert settings.node.data_dir == (EXAMPLE.parent / "data").resolve()
    text = EXAMPLE.read_text()

    def walk(obj, prefix=""):
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                assert f"[{prefix}{f.name}]" in text, f"section [{prefix}{f.name}] not documented"
                walk(value, f"{prefix}{f.name}.")
            elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
                assert f"[[{prefix}{f.name}]]" in text
            else:
                assert f"{f.name} =" in text, f"key {prefix}{f.name} not documented in the example"

    walk(settings)


@pytest.mark.parametrize(("table", "message"), [
    ({"node": {"port": 70000}}, "node.port: must be between 0 and 65535"),
    ({"engine": {"dose_grid_mm": 20.0}}, "engine.dose_grid_mm: must be between 0.5 and 10 .mm., got 20.0"),
    ({"secondcheck": {"min_pass_rate_percent": 101}}, "secondcheck.min_pass_rate_percent: must be between 0 and 100"),
    ({"node": {"prot": 1}}, "node.prot: unknown key"),
    ({"nodes": {}}, "nodes: unknown key"),
    ({"node": {"ae_title": "A" * 17}}, "node.ae_title: must be 1-16 ASCII"),
    ({"node": {"allowed_callers": "TPS"}}, "node.allowed_callers: must be a list"),
    ({"node": {"fsync": "yes"}}, "node.fsync: must be true or false"),
    ({"trigger": {"stable_seconds": 0}}, "trigger.stable_seconds: must be greater than 0"),
    ({"cloud": {"backend": "azure"}}, "cloud.backend: must be one of local, ssh, aws"),
    ({"engine": {"primaries": 1.5}}, "engine.primaries: must be an integer"),
    ({"destinations": [{"calling_ae_title": "TPS"}]}, "destinations[0]: calling_ae_title and ae_title"),
    ({"destinations": [{"calling_ae_title": "TPS", "ae_title": "X", "port": -1}]}, "destinations[0].port"),
])
def test_bad_values_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        settings_from_dict(table)


def test_settings_are_frozen():
    settings = settings_from_dict({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.node.port = 1  # type: ignore[misc]


def test_init_writes_config_and_private_key(tmp_path, capsys):
    assert main(["init", str(tmp_path / "n"), "--port", "11999", "--ae-title", "MC1"]) == 0
    settings = load_settings(tmp_path / "n" / "mcnode.toml")
    assert settings.node.port == 11999 and settings.node.ae_title == "MC1"
    key_file = tmp_path / "n" / "site.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(read_site_key(settings)) == 32
    assert "***" in str(settings.masked()) and key_file.read_text().strip() not in str(settings.masked())
    # a second init never overwrites a key
    assert main(["init", str(tmp_path / "n")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_key_readable_by_others_refused(tmp_path):
    main(["init", str(tmp_path / "n")])
    (tmp_path / "n" / "site.key").chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_site_key(load_settings(tmp_path / "n" / "mcnode.toml"))


def test_serve_with_bad_config_fails_naming_the_key(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[node]\nport = "eleven"\n')
    assert main(["serve", "-c", str(cfg)]) == 2
    assert "node.port: must be an integer" in capsys.readouterr().err

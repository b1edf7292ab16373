"""config.toml parsing: documented defaults load, and every bad key or value is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cgtree import Config, ConfigError, Policy, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_toml_loads_with_defaults():
    assert load_config(REPO / "config.toml") == Config()


def test_every_key_is_documented_in_config_toml():
    text = (REPO / "config.toml").read_text()
    import dataclasses

    from cgtree.config import DaemonConfig

    for cls in (Policy, DaemonConfig):
        for f in dataclasses.fields(cls):
            assert re.search(rf"^{f.name} = ", text, re.M), f"{f.name} missing from config.toml"


def test_policy_table_loads_into_policy(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[policy]\nskip_warmup = true\ncapture_sizes = [1, 2, 4]\nrerecord_limit = 3\n")
    config = load_config(path)
    assert config.policy == Policy(skip_warmup=True, capture_sizes=(1, 2, 4), rerecord_limit=3)
    with pytest.raises(Exception):
        config.policy.skip_warmup = False  # frozen


@pytest.mark.parametrize(
    "text, named",
    [
        ("[policy]\nskip_warmpu = true\n", "policy.skip_warmpu = True"),
        ("[polcy]\nx = 1\n", "[polcy]"),
        ("[policy]\nskip_warmup = 1\n", "policy.skip_warmup must be true or false, got 1"),
        ("[policy]\nrerecord_limit = -1\n", "policy.rerecord_limit must be at least 0, got -1"),
        ("[policy]\ndynamic_shape_warn_limit = \"8\"\n", "policy.dynamic_shape_warn_limit must be an integer, got '8'"),
        ("[policy]\ncapture_sizes = [1, 0]\n", "policy.capture_sizes must be at least 1, got 0"),
        ("[policy]\ncapture_sizes = [2, 2]\n", "duplicates"),
        ("[daemon]\ndevices = \"gpu\"\n", "daemon.devices"),
        ("[daemon]\nendpoint = \"tcp://0.0.0.0:5\"\n", "daemon.endpoint"),
        ("[daemon]\ncompile = \"tensorrt\"\n", "daemon.compile must be \"auto\", \"eager\" or \"inductor\", got 'tensorrt'"),
        ("[daemon]\nlog_level = \"LOUD\"\n", "daemon.log_level"),
        ("[daemon]\nmetrics_port = 70000\n", "daemon.metrics_port must be at most 65535, got 70000"),
        ("[daemon]\nallowed_op_namespaces = [\"os.path\"]\n", "daemon.allowed_op_namespaces"),
        ("policy = 3\n", "[policy] must be a table, got 3"),
    ],
)
def test_bad_config_names_key_and_value(tmp_path, text, named):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert named in str(err.value)


def test_invalid_toml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_parse_config_accepts_partial_tables():
    config = parse_config({"daemon": {"devices": ["cuda:0", "cuda:1"]}})
    assert config.daemon.devices == ("cuda:0", "cuda:1")
    assert config.policy == Policy()

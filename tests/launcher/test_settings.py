"""Every setting from flags, DI_LAUNCH_* variables or a TOML file, in that order of precedence;
and validation errors that name the flag and the fix."""

from __future__ import annotations

from dataclasses import fields

import pytest

from di_router.launcher.settings import OPTIONS, LaunchError, Settings
from tests.launcher.launcher_helpers import run_launcher, settings

SERVE = ["serve", "prefill", "--model-path", "/m"]


def test_settings_fields_and_options_table_agree() -> None:
    assert {f.name for f in fields(Settings)} == set(OPTIONS)


def test_precedence_flag_over_env_over_config_over_default(tmp_path) -> None:
    config = tmp_path / "di.toml"
    config.write_text('tp-degree = 16\nbatch_size = 8\nprefill-port = 9100\nengine = "sim"\n')
    env = {"DI_LAUNCH_TP_DEGREE": "8", "DI_LAUNCH_BATCH_SIZE": "2"}
    got = settings([*SERVE, "--config", str(config), "--tp-degree", "4"], env)
    assert got.tp_degree == 4  # flag beats env and file
    assert got.batch_size == 2  # env beats file
    assert got.prefill_port == 9100  # file beats default
    assert got.engine == "sim"
    assert got.decode_port == 8200  # default
    assert got.compiled_model_path == "di_traced_model_tp4_b2/"  # derived from resolved values


def test_config_file_from_environment(tmp_path) -> None:
    config = tmp_path / "di.toml"
    config.write_text("ready_timeout = 5\n")
    assert settings(SERVE, {}).ready_timeout is None
    assert settings(["up", "--config", str(config)], {}).ready_timeout == 5.0


def test_defaults_follow_topology() -> None:
    assert settings(SERVE).tp_degree == 32
    assert settings([*SERVE, "--topology", "multi-instance"]).tp_degree == 64


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([*SERVE, "--batch-size", "0"], {}, "--batch-size 0: must be at least 1"),
        ([*SERVE, "--tp-degree", "0"], {}, "--tp-degree 0: must be at least 1"),
        ([*SERVE, "--prefill-ip", "my-host"], {}, "--prefill-ip 'my-host': not an IP address"),
        ([*SERVE, "--decode-port", "70000"], {}, "--decode-port 70000: not a TCP port"),
        (SERVE, {"DI_LAUNCH_TP_DEGREE": "many"}, "DI_LAUNCH_TP_DEGREE='many': --tp-degree"),
        (SERVE, {"DI_LAUNCH_ENGINE": "tgi"}, "--engine is one of vllm, sim"),
        ([*SERVE, "--sim-profile", "instant"], {}, "--sim-profile only applies with --engine sim"),
    ],
)
def test_invalid_values_name_the_flag(argv, environ, message) -> None:
    with pytest.raises(LaunchError, match=message.replace("(", r"\(")):
        settings(argv, environ)


def test_config_file_errors_name_the_key(tmp_path) -> None:
    config = tmp_path / "di.toml"
    config.write_text("tp_degre = 32\n")
    with pytest.raises(LaunchError, match=r"unknown setting.*tp_degre"):
        settings([*SERVE, "--config", str(config)])
    config.write_text('tp_degree = "thirty-two"\n')
    with pytest.raises(LaunchError, match=r"tp_degree in .*--tp-degree"):
        settings([*SERVE, "--config", str(config)])


def test_cli_reports_launch_errors_with_status_2() -> None:
    result = run_launcher(*SERVE, "--tp-degree", "48", "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "di-router serve: error: --tp-degree 48 x 2 servers" in result.stderr
    assert "use --tp-degree 32 or --topology multi-instance" in result.stderr

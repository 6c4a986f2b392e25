"""One settings mechanism for the router, the simulator and the launcher (issue 12).

Each program reads a TOML file, its own `<PREFIX>*` variables and its flags, the flag winning
over the variable winning over the file; a variable of one program never reaches another.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from di_router.argv import ROUTER_MODULE
from di_router.router.cli import parse_config
from di_router.settings import SettingsError
from di_router.sim.args import parse_settings
from tests.launcher.launcher_helpers import settings as launcher_settings
from tests.support import MODEL, Proc, free_port, running, start_sim


def router_timeout(argv: list[str], environ: dict[str, str]) -> Any:
    return parse_config(argv, environ).decode_timeout_s


def sim_batch(argv: list[str], environ: dict[str, str]) -> Any:
    return parse_settings(argv, environ)[0].max_num_seqs


def launcher_batch(argv: list[str], environ: dict[str, str]) -> Any:
    return launcher_settings(["serve", "prefill", "--model-path", "/m", *argv], environ).batch_size


# program: (how its settings are read, file key, variable, flag, the file's way in, default)
PROGRAMS: dict[str, tuple[Callable[[list[str], dict[str, str]], Any], str, str, str, str, int]] = {
    "router": (router_timeout, "decode-timeout", "DI_ROUTER_DECODE_TIMEOUT", "--decode-timeout",
               "--config", 600),
    "simulator": (sim_batch, "max-num-seqs", "DI_SIM_MAX_NUM_SEQS", "--max-num-seqs",
                  "DI_SIM_CONFIG", 256),
    "launcher": (launcher_batch, "batch_size", "DI_LAUNCH_BATCH_SIZE", "--batch-size",
                 "--config", 4),
}  # fmt: skip
LAYERS = [  # the layers that give the setting (file 11, variable 22, flag 33) -> what wins
    ((), "default"),
    (("file",), 11),
    (("env",), 22),
    (("flag",), 33),
    (("file", "env"), 22),
    (("file", "flag"), 33),
    (("file", "env", "flag"), 33),
]


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize(("layers", "expected"), LAYERS)
def test_flag_over_environment_over_file(program, layers, expected, tmp_path: Path) -> None:
    read, key, variable, flag, file_via, default = PROGRAMS[program]
    argv: list[str] = []
    environ: dict[str, str] = {}
    if "file" in layers:
        config = tmp_path / "settings.toml"
        config.write_text(f"{key} = 11\n")
        if file_via.startswith("--"):
            argv += [file_via, str(config)]
        else:
            environ[file_via] = str(config)
    if "env" in layers:
        environ[variable] = "22"
    if "flag" in layers:
        argv += [flag, "33"]
    assert read(argv, environ) == (default if expected == "default" else expected)


def test_each_program_reads_only_its_own_prefix() -> None:
    """`DI_ROUTER_HOST` was the router's listen address and the launcher's server bind address."""
    environ = {
        "DI_ROUTER_HOST": "10.1.1.1",
        "DI_SIM_HOST": "10.2.2.2",
        "DI_LAUNCH_HOST": "10.3.3.3",
    }
    assert parse_config([], environ).host == "10.1.1.1"
    assert parse_settings([], environ)[0].host == "10.2.2.2"
    assert launcher_settings(["serve", "prefill", "--model-path", "/m"], environ).host == "10.3.3.3"
    assert parse_config([], {}).host == "127.0.0.1"


def test_lists_and_switches_from_each_layer(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(
        'prefill = ["http://a:1", "http://b:1"]\ndecode = ["http://a:2", "http://b:2"]\n'
    )
    environ = {"DI_ROUTER_CONFIG": str(config), "DI_ROUTER_API_KEY": "k1, k2"}
    got = parse_config([], {**environ, "DI_ROUTER_VERBOSE_ERRORS": "true"})
    assert got.prefill_urls == ["http://a:1", "http://b:1"]
    assert got.api_keys == ["k1", "k2"]
    assert got.verbose_errors is True
    # A repeated flag replaces the file's list rather than adding to it.
    got = parse_config(["--prefill", "http://c:1", "--decode", "http://c:2"], environ)
    assert (got.prefill_urls, got.decode_urls) == (["http://c:1"], ["http://c:2"])


@pytest.mark.parametrize(
    ("file_text", "environ", "message"),
    [
        ("", {"DI_ROUTER_PORT": "eighty"}, "DI_ROUTER_PORT='eighty': --port expects .* int"),
        ("", {"DI_ROUTER_LOG_FORMAT": "xml"}, "--log-format is one of text, json"),
        ("", {"DI_ROUTER_PROTECT_METRICS": "maybe"}, "--protect-metrics is a switch"),
        ("prefil = []\n", {}, "unknown setting.*prefil"),
        ('workers = "two"\n', {}, "workers in .*--workers expects"),
        ("workers = [\n", {}, "not valid TOML"),
    ],
)
def test_bad_values_name_their_source(file_text, environ, message, tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(file_text)
    with pytest.raises(SettingsError, match=message):
        parse_config(["--config", str(config)], environ)


def test_router_from_a_file_and_the_environment_alone(tmp_path: Path) -> None:
    """No flags: the backends come from the file, the port from a variable that beats the file."""
    kv = free_port()
    prefill, decode = start_sim("prefill", kv_port=kv), start_sim("decode", kv_port=kv)
    port = free_port()
    config = tmp_path / "router.toml"
    config.write_text(
        f'prefill = ["{prefill.url}"]\ndecode = ["{decode.url}"]\nport = {free_port()}\n'
        'selection = "round_robin"\nhealth-interval = 0.2\n'
    )
    environ = {"DI_ROUTER_CONFIG": str(config), "DI_ROUTER_PORT": str(port)}
    argv = [sys.executable, "-m", ROUTER_MODULE]
    router = Proc("router", argv, f"http://127.0.0.1:{port}", environ)
    with running(prefill, decode, router):
        router.wait_ready("/ready", timeout=15)
        report = httpx.get(router.url + "/backends", timeout=5).json()
        assert {row["url"] for row in report["backends"]} == {prefill.url, decode.url}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        got = httpx.post(router.url + "/v1/completions", json=body, timeout=20)
        assert got.status_code == 200, got.text

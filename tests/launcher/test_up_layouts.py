"""The commands `di-router up` runs for each layout (golden argv, environment and router config
file), and two of them end to end on the simulator: two pairs on one host, and two "hosts" on
loopback."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest

from di_router.launcher.ports import port_in_use
from di_router.launcher.router_config import router_table, write_router_config
from di_router.launcher.router_options import router_options
from di_router.launcher.settings import LaunchError
from di_router.launcher.up_cmd import child_specs
from tests.launcher.launcher_helpers import free_port, launcher_argv, launcher_env, parse
from tests.launcher.test_up import MODEL, up
from tests.support import wait_until

PY = sys.executable
TWO_HOSTS = ["--topology", "multi-instance", "--model-path", "/models/llama", "--tp-degree", "64"]
TWO_HOSTS += ["--prefill-ip", "10.0.1.10", "--decode-ip", "10.0.1.20"]


def specs(*argv: str):
    """What `up` would start, after writing the router's config file as `up` does."""
    args, resolved = parse(["up", *argv])
    options = router_options(args)
    path = write_router_config(router_table(resolved, options), resolved.router_config_file)
    return child_specs(resolved, path, tls="ssl-certfile" in options)


def router_config(router) -> dict:
    """The config file the router was started with, as the router reads it."""
    assert router.argv[-2] == "--config"
    return tomllib.loads(Path(router.argv[-1]).read_text())


def test_two_hosts_prefill_host_runs_prefill_and_a_router_every_host_reaches() -> None:
    prefill, router = specs(*TWO_HOSTS)
    assert (prefill.name, router.name) == ("prefill", "router")
    assert router.argv[:-1] == [
        PY, "-m", "di_router.router.cli", "--host", "0.0.0.0", "--port", "8000", "--config",
    ]  # fmt: skip
    assert router_config(router) == {
        "host": "0.0.0.0", "port": 8000,
        "prefill": ["http://10.0.1.10:8100"], "decode": ["http://10.0.1.20:8200"],
    }  # fmt: skip
    assert prefill.env == {
        "NEURON_COMPILED_ARTIFACTS": "di_traced_model_tp64_b4/",
        "NEURON_RT_ASYNC_EXEC_MAX_INFLIGHT_REQUESTS": "2",
        "NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT": "45645",
        "NEURON_RT_ASYNC_SENDRECV_EXPERIMENTAL_ENABLED": "1",
        "NEURON_SEND_IP": "10.0.1.10",
        "NEURON_RECV_IP": "10.0.1.20",
    }
    assert prefill.argv[:5] == [
        PY,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/llama",
    ]
    assert prefill.argv[-2:] == ["--port", "8100"]  # all interfaces: the decode host pulls KV
    assert '"kv_ip":"10.0.1.10"' in prefill.argv[prefill.argv.index("--kv-transfer-config") + 1]
    assert router.health_url == "http://127.0.0.1:8000/health"


def test_two_hosts_decode_host_runs_the_matching_decode_server() -> None:
    """`di-router serve decode --dry-run` on the decode host: what the docs tell users to run."""
    result = subprocess.run(
        launcher_argv("serve", "decode", *TWO_HOSTS, "--dry-run"),
        env=launcher_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in (
        "export NEURON_SEND_IP=10.0.1.10",
        "export NEURON_RECV_IP=10.0.1.20",
        "export NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT=45645",
    ):
        assert line in script, script
    assert "--port 8200" in script and '"kv_role":"kv_consumer"' in script, script
    assert '"kv_ip":"10.0.1.10"' in script and '"neuron_core_offset":0' in script, script


def test_router_options_pass_through_and_are_checked_before_start() -> None:
    *_, router = specs(
        *TWO_HOSTS, "--router-host", "10.0.1.10", "--router-port", "9000",
        "--router-workers", "4", "--router-log-format", "json", "--router-api-key", "k1",
        "--router-api-key", "k2", "--router-protect-metrics", "--router-decode-timeout", "60",
    )  # fmt: skip
    assert router_config(router) == {
        "host": "10.0.1.10", "port": 9000,
        "prefill": ["http://10.0.1.10:8100"], "decode": ["http://10.0.1.20:8200"],
        "workers": 4, "decode-timeout": 60.0, "api-key": ["k1", "k2"],
        "protect-metrics": True, "log-format": "json",
    }  # fmt: skip
    assert router.health_url == "http://10.0.1.10:9000/health"
    with pytest.raises(LaunchError, match="--ssl-certfile and --ssl-keyfile go together"):
        specs(*TWO_HOSTS, "--router-ssl-certfile", "/c.pem")
    tls = specs(*TWO_HOSTS, "--router-ssl-certfile", "/c.pem", "--router-ssl-keyfile", "/k.pem")
    assert tls[-1].health_url == "https://127.0.0.1:8000/health"


def test_a_router_config_up_did_not_write_is_never_overwritten(tmp_path) -> None:
    mine = tmp_path / "router.toml"
    mine.write_text('prefill = ["http://10.9.9.9:8100"]\n')
    with pytest.raises(LaunchError, match="exists and `di-router up` did not write it"):
        specs(*TWO_HOSTS, "--router-config-file", str(mine))
    assert mine.read_text() == 'prefill = ["http://10.9.9.9:8100"]\n'
    written = tmp_path / "up.toml"
    for port in ("8000", "9000"):  # up's own file is rewritten on each run
        specs(*TWO_HOSTS, "--router-config-file", str(written), "--router-port", port)
        assert tomllib.loads(written.read_text())["port"] == int(port)


def test_layout_flags_are_not_router_options() -> None:
    """The backends come from the layout; a --router-prefill would contradict it."""
    with pytest.raises(SystemExit):
        parse(["up", *TWO_HOSTS, "--router-prefill", "http://x:1"])


def test_two_pairs_on_one_host_get_their_own_cores_ports_and_router_pair() -> None:
    got = specs("--engine", "sim", "--model-path", "m", "--pairs", "2", "--kv-port", "14000")
    assert [s.name for s in got] == ["prefill0", "decode0", "prefill1", "decode1", "router"]
    config = router_config(got[-1])
    assert config["prefill"] == ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]
    assert config["decode"] == ["http://127.0.0.1:8200", "http://127.0.0.1:8201"]
    cores = [s.env["NEURON_RT_VISIBLE_CORES"] for s in got[:4]]
    assert cores == ["0-15", "16-31", "32-47", "48-63"]  # TP16 by default: 4 servers fit
    for pair in (0, 1):
        prefill, decode = got[2 * pair], got[2 * pair + 1]
        kv = [s.argv[s.argv.index("--kv-transfer-config") + 1] for s in (prefill, decode)]
        assert all(f'"kv_port":{14000 + pair}' in k for k in kv)  # the pair the router uses
        assert prefill.env["NEURON_RT_ASYNC_SENDRECV_BOOTSTRAP_PORT"] == str(45645 + pair)
        assert prefill.listen_ports == (
            {"--prefill-port": 8100, "--kv-port": 14000}
            if pair == 0
            else {"--prefill-port + 1": 8101, "--kv-port + 1": 14001}
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pairs", "2", "--tp-degree", "32"], "--tp-degree 32 x 4 servers .* needs 128"),
        (["--pairs", "2", "--prefill-cores", "0-15"], "with --pairs 2 each pair gets"),
        (["--pairs", "2", *TWO_HOSTS], "--pairs 2 applies to single-instance"),
    ],
)
def test_pairs_that_cannot_work_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(LaunchError, match=message):
        specs("--model-path", "m", *argv)


def _port_and_next() -> int:
    """A free port whose successor is free too (pair 1 uses each port + 1)."""
    return wait_until(
        lambda: (p := free_port()) < 65535 and not port_in_use(p + 1) and p, 5, "ports"
    )


def _completions(router_port: int, count: int) -> None:
    with httpx.Client(timeout=20, trust_env=False) as client:
        for i in range(count):
            body = {"model": MODEL, "prompt": f"request {i}", "max_tokens": 3, "stream": i % 2 == 0}
            got = client.post(f"http://127.0.0.1:{router_port}/v1/completions", json=body)
            assert got.status_code == 200, got.text


def _kv(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/sim/stats", timeout=5, trust_env=False).json()["kv"]


def test_up_two_pairs_end_to_end_every_request_completes_and_both_pairs_serve(tmp_path) -> None:
    p_port, d_port, kv_port = _port_and_next(), _port_and_next(), _port_and_next()
    requests = 20
    config = tmp_path / "router.toml"
    with up("--sim-profile", "instant", "--pairs", "2", "--prefill-port", str(p_port),
            "--decode-port", str(d_port), "--kv-port", str(kv_port),
            "--router-config-file", str(config)) as running:  # fmt: skip
        running.wait_for_line("[up] ready")
        assert {"prefill0", "decode0", "prefill1", "decode1", "router"} == set(running.pids())
        assert f"[up] router config: {config}" in running.output()
        table = tomllib.loads(config.read_text())  # what another host's router would read
        assert table["prefill"] == [f"http://127.0.0.1:{p_port + i}" for i in (0, 1)]
        assert table["decode"] == [f"http://127.0.0.1:{d_port + i}" for i in (0, 1)]
        assert (table["host"], table["port"]) == ("127.0.0.1", running.router_port)
        _completions(running.router_port, requests)
        report = httpx.get(f"http://127.0.0.1:{running.router_port}/backends").json()
        peers = {(b["url"], b["paired_with"]) for b in report["backends"]}
        for pair in (0, 1):
            prefill, decode = (
                f"http://127.0.0.1:{p_port + pair}",
                f"http://127.0.0.1:{d_port + pair}",
            )
            assert (prefill, decode) in peers

        def settled() -> list[dict]:
            kvs = [_kv(p_port + pair) for pair in (0, 1)]
            return kvs if sum(kv["pulled"] for kv in kvs) == requests else []

        kvs = wait_until(settled, 10, "every KV entry pulled")
        for kv in kvs:  # each pair served, and its decode pulled only its own prefill's KV
            assert kv["produced"] == kv["pulled"] > 0


def test_two_hosts_on_loopback_as_the_docs_say() -> None:
    """127.0.0.1 plays the prefill host and 127.0.0.2 the decode host: the decode host runs
    `serve decode`, the prefill host `up`; the router listens on all interfaces."""
    ports = {name: free_port() for name in ("prefill", "decode", "kv")}
    common = [
        "--engine", "sim", "--sim-profile", "instant", "--model-path", MODEL,
        "--topology", "multi-instance", "--prefill-ip", "127.0.0.1", "--decode-ip", "127.0.0.2",
        "--prefill-port", str(ports["prefill"]), "--decode-port", str(ports["decode"]),
        "--kv-port", str(ports["kv"]),
    ]  # fmt: skip
    decode_host = subprocess.Popen(
        launcher_argv("serve", "decode", *common), env=launcher_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        with up(*common) as running:
            running.wait_for_line("[up] ready")
            assert set(running.pids()) == {"prefill", "router"}
            assert "--host 0.0.0.0" in running.output()
            _completions(running.router_port, 4)
            kv = _kv(ports["prefill"])
            assert kv["produced"] == 4
    finally:
        decode_host.terminate()
        decode_host.wait(10)

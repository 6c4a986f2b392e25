"""`di-router demo`: the README's main command starts the stack, serves its curl example, stops."""

from __future__ import annotations

import signal
import subprocess

from tests.launcher.launcher_helpers import alive, free_port
from tests.launcher.test_up import Up
from tests.sse_strict import assemble, check_chunks, parse_sse
from tests.support import needs_curl


class Demo(Up):
    def __init__(self) -> None:  # same harness as `up`, different command line
        self.router_port = free_port()
        self._start(
            "demo", "--profile", "instant", "--port", str(self.router_port),
            "--prefill-port", str(free_port()), "--decode-port", str(free_port()),
            "--kv-port", str(free_port()),
        )  # fmt: skip


@needs_curl
def test_demo_prints_a_working_curl_example_and_stops_on_ctrl_c() -> None:
    demo = Demo()
    try:
        demo.wait_for_line("Ctrl-C stops everything.")
        curl = next(line.strip() for line in demo.lines if line.strip().startswith("curl "))
        assert f"http://127.0.0.1:{demo.router_port}/v1/completions" in curl
        result = subprocess.run(["bash", "-c", curl], capture_output=True, timeout=30, check=True)
        chunks = parse_sse(result.stdout)
        check_chunks(chunks, chat=False)
        got = assemble(chunks, chat=False)
        assert len(got["text"][0].split()) == 10 and got["finish"] == {0: "length"}

        pids = demo.pids()
        demo.proc.send_signal(signal.SIGINT)
        assert demo.wait_exit() == 0
        for name, pid in pids.items():
            assert not alive(pid), f"{name} still running after Ctrl-C"
    finally:
        demo.cleanup()

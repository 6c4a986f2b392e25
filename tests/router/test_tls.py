"""Issue 12: TLS on the router's listener and to `https://` backends, with a certificate the test
makes itself (openssl, for 127.0.0.1)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import MODEL, Proc, di_stack, free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    key, crt = where / "key.pem", where / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


def _https_router(stack, crt: Path, key: Path, extra: list[str]) -> Proc:
    from di_router.bench.stack import router_argv

    port = free_port()
    p_port = int(stack.prefill.url.rsplit(":", 1)[1])
    d_port = int(stack.decode.url.rsplit(":", 1)[1])
    argv = router_argv(
        port, p_port, d_port, ["--ssl-certfile", str(crt), "--ssl-keyfile", str(key), *extra]
    )
    return Proc("router-tls", argv, f"https://127.0.0.1:{port}")


def test_router_listener_speaks_tls(cert):
    crt, key = cert
    ctx = ssl.create_default_context(cafile=str(crt))
    with di_stack() as stack:
        router = _https_router(stack, crt, key, ["--health-interval", "0.2"])
        try:

            def ready() -> bool:
                try:
                    return httpx.get(router.url + "/ready", verify=ctx).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, 15, "the HTTPS router ready")
            body = {"model": MODEL, "prompt": "over tls", "max_tokens": 3, "stream": True}
            got = httpx.post(router.url + "/v1/completions", json=body, verify=ctx)
            assert got.status_code == 200 and got.text.endswith("data: [DONE]\n\n")
            with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused
                httpx.get(router.url + "/health")
            with pytest.raises(httpx.HTTPError):  # and plain HTTP gets no answer
                httpx.get(router.url.replace("https", "http") + "/health", timeout=3)
        finally:
            router.stop()


def test_half_a_tls_configuration_is_refused_at_start(cert):
    """A certificate without its key is a start-up error, not a plain-HTTP listener."""
    crt, _ = cert
    done = subprocess.run(
        [sys.executable, "-m", "di_router.router.cli", "--ssl-certfile", str(crt),
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "go together" in done.stderr

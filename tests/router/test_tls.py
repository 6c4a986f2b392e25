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

from di_router.argv import router_argv
from di_router.bench.stack import HOST, sim_argv
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
    port = free_port()
    tls = ["--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
    argv = router_argv(HOST, port, [(stack.prefill.url, stack.decode.url)], [*tls, *extra])
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


def _https_sims(crt: Path, key: Path) -> tuple[Proc, Proc]:
    """A prefill and a decode simulator paired over KV, each listening on HTTPS."""
    kv_port = free_port()
    tls = ["--ssl-certfile", str(crt), "--ssl-keyfile", str(key)]
    sims = []
    for role in ("prefill", "decode"):
        port = free_port()
        argv = sim_argv(role, port, kv_port, "instant", 256, tls)
        sims.append(Proc(role, argv, f"https://127.0.0.1:{port}"))
    return sims[0], sims[1]


def _router_to(prefill: Proc, decode: Proc, ca_file: Path) -> Proc:
    port = free_port()
    flags = ["--ssl-ca-file", str(ca_file), "--health-interval", "0.2"]
    argv = router_argv(HOST, port, [(prefill.url, decode.url)], flags)
    return Proc("router", argv, f"http://127.0.0.1:{port}")


def _wait_https(procs: tuple[Proc, ...], ctx: ssl.SSLContext) -> None:
    def up(proc: Proc) -> bool:
        assert proc.popen.poll() is None, proc.log_tail()
        try:
            return httpx.get(proc.url + "/health", verify=ctx).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(lambda: all(up(p) for p in procs), 30, "the HTTPS simulators healthy")


def test_router_reaches_https_backends_with_its_ca_file(cert):
    crt, key = cert
    prefill, decode = _https_sims(crt, key)
    router = _router_to(prefill, decode, crt)
    try:
        trust = ssl.create_default_context(cafile=str(crt))
        _wait_https((prefill, decode), trust)
        router.wait_ready("/ready", timeout=15)
        for stream in (True, False):
            body = {"model": MODEL, "prompt": "kv over tls", "max_tokens": 5, "stream": stream}
            got = httpx.post(router.url + "/v1/completions", json=body, timeout=20)
            assert got.status_code == 200, got.text
            if stream:
                assert got.text.endswith("data: [DONE]\n\n")
            else:
                assert got.json()["usage"]["completion_tokens"] == 5
        # Both legs went over TLS to the servers, which served the pair: prefill's KV was pulled.
        kv = httpx.get(prefill.url + "/sim/stats", verify=trust).json()["kv"]
        assert kv["produced"] == kv["pulled"] == 2
    finally:
        for proc in (router, decode, prefill):
            proc.stop()


def _untrusted_backends_answer(cert: tuple[Path, Path], where: Path) -> tuple[int, dict, int]:
    """(status, error body, /ready status) of a completion through a router whose
    --ssl-ca-file did not sign the backends' certificate."""
    crt, key = cert
    other = where / "other-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=other", "-keyout", str(where / "other-key.pem"), "-out", str(other)],
        check=True, capture_output=True,
    )  # fmt: skip
    prefill, decode = _https_sims(crt, key)
    router = _router_to(prefill, decode, other)
    try:
        _wait_https((prefill, decode), ssl.create_default_context(cafile=str(crt)))
        router.wait_ready("/health", timeout=15)
        body = {"model": MODEL, "prompt": "untrusted", "max_tokens": 3}
        got = httpx.post(router.url + "/v1/completions", json=body, timeout=20)
        return got.status_code, got.json(), httpx.get(router.url + "/ready").status_code
    finally:
        for proc in (router, decode, prefill):
            proc.stop()


def test_backend_certificate_from_an_unknown_ca_is_refused_with_502(cert, tmp_path):
    """The router checks backends against --ssl-ca-file: a certificate it did not sign is
    refused, never silently trusted; the client gets an OpenAI-format 502 naming the role (both
    legs start at once, so whichever fails first)."""
    status, error, ready = _untrusted_backends_answer(cert, tmp_path)
    assert (status, error["code"], error["type"]) == (502, 502, "BadGatewayError"), error
    assert error["message"].startswith(("prefill server ", "decode server ")), error
    assert ready == 503  # the health checks fail the same way


def test_unknown_ca_error_says_the_certificate_was_refused(cert, tmp_path):
    _, error, _ = _untrusted_backends_answer(cert, tmp_path)
    assert "certificate" in error["message"], error

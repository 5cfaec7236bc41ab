"""The HTTP frontend's transport options: HTTPS (a self-signed certificate made here by openssl) and CORS."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from dynamo_lite.frontend import FrontendSettings, HttpServer
from tests.frontend.conftest import MODEL, FakeBackend, serving


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl binary")
    key, crt = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


@pytest.fixture
async def tls_server(backend: FakeBackend, cert: tuple[Path, Path]) -> AsyncIterator[HttpServer]:
    settings = FrontendSettings(http_port=0, tls_cert_path=str(cert[0]), tls_key_path=str(cert[1]))
    async with serving(backend, settings) as srv:
        yield srv


async def test_https_with_the_configured_certificate(
    tls_server: HttpServer, backend: FakeBackend, tokenizer: Tokenizer, cert: tuple[Path, Path]
) -> None:
    assert tls_server.url.startswith("https://")
    backend.say(tokenizer, "secure")
    trusted = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert[0])), timeout=10)
    oai = openai.AsyncOpenAI(
        base_url=tls_server.url + "/v1", api_key="none", max_retries=0, http_client=trusted
    )
    try:
        r = await oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content == "secure"
    finally:
        await oai.close()
    # Plain HTTP to the TLS port is no API; a client that doesn't trust the certificate refuses it.
    async with httpx.AsyncClient(timeout=5) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(tls_server.url.replace("https://", "http://") + "/v1/models")
        with pytest.raises(httpx.ConnectError):
            await plain.get(tls_server.url + "/v1/models")


@pytest.fixture
async def cors_http(backend: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    settings = FrontendSettings(http_port=0, allowed_origins=("http://ui.example",))
    async with serving(backend, settings) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as client:
            yield client


PREFLIGHT = {
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type",
}


async def test_cors_preflight_and_response_for_an_allowed_origin(
    cors_http: httpx.AsyncClient, backend: FakeBackend, tokenizer: Tokenizer
) -> None:
    r = await cors_http.options("/v1/chat/completions", headers={"origin": "http://ui.example", **PREFLIGHT})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()

    backend.say(tokenizer, "ok")
    r = await cors_http.post(
        "/v1/chat/completions",
        headers={"origin": "http://ui.example"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()

    other = await cors_http.options(
        "/v1/chat/completions", headers={"origin": "http://evil.example", **PREFLIGHT}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


async def test_no_cors_headers_by_default(http: httpx.AsyncClient) -> None:
    r = await http.options("/v1/chat/completions", headers={"origin": "http://ui.example", **PREFLIGHT})
    assert "access-control-allow-origin" not in r.headers
    r = await http.get("/v1/models", headers={"origin": "http://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

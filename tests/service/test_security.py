"""TLS, mutual TLS and bearer tokens, over real connections on 127.0.0.1.

Each server here shares the session's tiny engine (only the gRPC front differs), and
every certificate is made for the test by tests/service/certs.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import AsyncTextGenerationClient, RemoteModelForCausalLM, TextGenerationClient, TextGenerationError
from clients.textgen.v1 import text_generation_service_pb2_grpc, tokenize_pb2
from tests.servers import BackgroundServer
from tests.service.certs import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Hello there"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
# A connection that cannot be made (bad certificate, plaintext against TLS) fails fast.
CONNECT_TIMEOUT = 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = (CertificateAuthority(folder, n) for n in ("server-ca", "client-ca", "rogue-ca"))
    return {
        "server_ca": server_ca.ca,
        "server": server_ca.issue("server", server=True),
        "client_ca": client_ca.ca,
        "client": client_ca.issue("client", server=False),
        "rogue_ca": rogue_ca.ca,
        "rogue_client": rogue_ca.issue("rogue-client", server=False),
        "rogue_server": rogue_ca.issue("rogue-server", server=True),
    }


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("# accepted tokens\nfile-token-1\n\n  file-token-2  \n")
    path.chmod(0o600)
    return path


def serve(tiny_server, *flags: str) -> BackgroundServer:
    return BackgroundServer(tiny_server.engine, *flags, shares_engine=True)


def health(channel, service: str = "", metadata=None) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=CONNECT_TIMEOUT, metadata=metadata).status


def refused_code(target: str, **connection) -> grpc.StatusCode:
    with TextGenerationClient(target, timeout=CONNECT_TIMEOUT, **connection) as client:
        with pytest.raises(TextGenerationError) as caught:
            client.generate(PROMPT, max_new_tokens=2)
    return caught.value.code


def expected_text(tiny_server) -> str:
    with TextGenerationClient(tiny_server.target, timeout=60) as client:
        return client.generate(PROMPT, max_new_tokens=4).text


def test_tls_serves_tls_clients_only(tiny_server, pki):
    server = serve(tiny_server, "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key))
    try:
        want = expected_text(tiny_server)
        # The CA given as a path or as PEM bytes.
        for ca in (pki["server_ca"].cert, pki["server_ca"].cert_pem):
            with TextGenerationClient(server.target, timeout=60, tls_ca=ca) as client:
                assert client.generate(PROMPT, max_new_tokens=4).text == want
        credentials = grpc.ssl_channel_credentials(pki["server_ca"].cert_pem)
        with grpc.secure_channel(server.target, credentials) as channel:
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
        # Plaintext against TLS, and TLS that trusts another CA, never get through.
        assert refused_code(server.target) == grpc.StatusCode.UNAVAILABLE
        assert refused_code(server.target, tls_ca=pki["rogue_ca"].cert) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_tls_client_rejects_a_server_certificate_from_another_ca(tiny_server, pki):
    rogue = pki["rogue_server"]
    server = serve(tiny_server, "--tls-cert", str(rogue.cert), "--tls-key", str(rogue.key))
    try:
        assert refused_code(server.target, tls_ca=pki["server_ca"].cert) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(tiny_server, pki):
    server = serve(
        tiny_server,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["client_ca"].cert),
    )  # fmt: skip
    try:
        client_cert = dict(tls_cert=pki["client"].cert, tls_key=pki["client"].key)
        with TextGenerationClient(server.target, timeout=60, tls_ca=pki["server_ca"].cert, **client_cert) as client:
            assert client.generate(PROMPT, max_new_tokens=4).text == expected_text(tiny_server)
        # No client certificate, or one from a CA the server does not trust: the handshake fails.
        assert refused_code(server.target, tls_ca=pki["server_ca"].cert) == grpc.StatusCode.UNAVAILABLE
        rogue = dict(tls_cert=pki["rogue_client"].cert, tls_key=pki["rogue_client"].key)
        assert refused_code(server.target, tls_ca=pki["server_ca"].cert, **rogue) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


def test_bearer_tokens_from_a_file_and_the_environment(tiny_server, tokens_file, monkeypatch):
    monkeypatch.setenv("TEXTGEN_AUTH_TOKENS", "env-token-a, env-token-b")
    monkeypatch.delenv("TEXTGEN_AUTH_TOKEN", raising=False)
    server = serve(tiny_server, "--auth-token-file", str(tokens_file))
    registry, model = server.server.metrics.registry, tiny_server.engine.info.model_id
    try:
        want = expected_text(tiny_server)
        for token in ("file-token-1", "file-token-2", "env-token-a", "env-token-b"):
            with TextGenerationClient(server.target, timeout=60, token=token) as client:
                assert client.generate(PROMPT, max_new_tokens=4).text == want
                assert "".join(c.text for c in client.generate_stream(PROMPT, max_new_tokens=4)) == want
                assert client.tokenize(PROMPT).token_ids
        # Missing, wrong, or right-but-mangled tokens: UNAUTHENTICATED on every method.
        for token in (None, "nope", "file-token-1x", "# accepted tokens", "file-token"):
            with TextGenerationClient(server.target, timeout=60, token=token) as client:
                for call in (
                    lambda: client.generate(PROMPT, max_new_tokens=2),
                    lambda: list(client.generate_stream(PROMPT, max_new_tokens=2)),
                    lambda: client.tokenize(PROMPT),
                    lambda: client.model_info(),
                ):
                    with pytest.raises(TextGenerationError) as caught:
                        call()
                    assert caught.value.code == UNAUTHENTICATED, token
        with grpc.insecure_channel(server.target) as channel:
            # The scheme is Bearer (any case), nothing else; health needs no token.
            stub = text_generation_service_pb2_grpc.TextGenerationServiceStub(channel)
            request = tokenize_pb2.TokenizeRequest(text=PROMPT)
            assert stub.Tokenize(request, metadata=(("authorization", "bearer file-token-1"),)).token_ids
            with pytest.raises(grpc.RpcError) as caught:
                stub.Tokenize(request, metadata=(("authorization", "Basic file-token-1"),))
            assert caught.value.code() == UNAUTHENTICATED
            assert health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert health(channel, "textgen.v1.TextGenerationService") == health_pb2.HealthCheckResponse.SERVING
        refused = registry.get_sample_value("textgen_request_errors_total", {"model": model, "code": "UNAUTHENTICATED"})
        assert refused == 5 * 4 + 1
        tiny_server.wait_idle()
    finally:
        server.close()


def test_health_can_require_a_token(tiny_server, tokens_file):
    server = serve(tiny_server, "--auth-token-file", str(tokens_file), "--auth-health")
    try:
        with grpc.insecure_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health(channel)
            assert caught.value.code() == UNAUTHENTICATED
            good = (("authorization", "Bearer file-token-2"),)
            assert health(channel, metadata=good) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.close()


def test_every_client_speaks_mutual_tls_with_a_token(tiny_server, pki, tokens_file, tmp_path, monkeypatch):
    monkeypatch.delenv("TEXTGEN_AUTH_TOKENS", raising=False)
    server = serve(
        tiny_server,
        "--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key),
        "--tls-client-ca", str(pki["client_ca"].cert), "--auth-token-file", str(tokens_file),
    )  # fmt: skip
    connection = dict(tls_ca=pki["server_ca"].cert, tls_cert=pki["client"].cert, tls_key=pki["client"].key)
    try:
        want = expected_text(tiny_server)
        ids = tiny_server.engine.tokenizer.encode(PROMPT)
        # The wrong token over a good mutual-TLS connection is still refused.
        assert refused_code(server.target, token="nope", **connection) == UNAUTHENTICATED

        # Sync client; the token from $TEXTGEN_AUTH_TOKEN when none is passed.
        monkeypatch.setenv("TEXTGEN_AUTH_TOKEN", "file-token-1")
        with TextGenerationClient(server.target, timeout=60, **connection) as client:
            assert client.generate(PROMPT, max_new_tokens=4).text == want
        monkeypatch.delenv("TEXTGEN_AUTH_TOKEN")

        async def async_client():
            async with AsyncTextGenerationClient(server.target, timeout=60, token="file-token-2", **connection) as c:
                return (await c.generate(PROMPT, max_new_tokens=4)).text

        assert asyncio.run(async_client()) == want

        import torch

        model = RemoteModelForCausalLM.from_pretrained(
            "default", target=server.target, token="file-token-1", **connection
        )
        try:
            out = model.generate(torch.tensor([ids]), max_new_tokens=4)
            assert out[0, len(ids) :].tolist() == tiny_server.engine.tokenizer.encode(want, add_special_tokens=False)
        finally:
            model.close()

        token_path = tmp_path / "client-token"
        token_path.write_text("file-token-2\n")
        args = [
            "--target", server.target, "--max-new-tokens", "4",
            "--tls-ca", str(pki["server_ca"].cert), "--tls-cert", str(pki["client"].cert),
            "--tls-key", str(pki["client"].key), "--auth-token-file", str(token_path),
        ]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "clients", PROMPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == want + "\n"
        # Without the token file the CLI is refused, and says why.
        done = subprocess.run(
            [sys.executable, "-m", "clients", PROMPT, *args[:-2]], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr
    finally:
        server.close()


def test_tokens_are_never_taken_from_the_command_line():
    from clients.__main__ import main as client_main
    from service.options import parse_args

    for argv in (["--auth-token", "secret"], ["--token", "secret"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        with pytest.raises(SystemExit):
            client_main(["Hello", *argv])


def test_a_server_with_an_unusable_token_source_does_not_start(tmp_path, monkeypatch):
    from service.auth import AuthConfigError, load_tokens
    from service.options import parse_args
    from service.server import serve as serve_main

    empty = tmp_path / "empty"
    empty.write_text("# no token here\n\n")
    monkeypatch.delenv("TEXTGEN_AUTH_TOKENS", raising=False)
    for path in (empty, tmp_path / "missing"):
        with pytest.raises(AuthConfigError):
            load_tokens(path)
        # serve() refuses before opening a port or loading a model: it would otherwise run open.
        assert asyncio.run(serve_main(parse_args(["--port", "0", "--auth-token-file", str(path)]))) == 2
    monkeypatch.setenv("TEXTGEN_AUTH_TOKENS", "has space")
    with pytest.raises(AuthConfigError):
        load_tokens(None)
    monkeypatch.setenv("TEXTGEN_AUTH_TOKENS", " , ")
    assert load_tokens(None) == ()
    with pytest.raises(SystemExit):
        parse_args(["--tls-cert", "server.crt"])  # without its key

"""https providers go through the dynamic forward proxy with TLS: SNI from the provider host and the
certificate validated against the trusted CAs (a test CA here instead of the system bundle)."""
import hashlib
import os
import subprocess

import pytest

from harness import Envoy, FakeUpstream, request

KEY = "sk-gw-tls-key"


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-subj", "/CN=llm-gateway test CA", "-days", "2", cwd=d)
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
        "-subj", "/CN=localhost", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost\n")
    run("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def trust(ca_path):
    def patch(cfg):
        for c in cfg["static_resources"]["clusters"]:
            if c["name"] == "llm_gateway_dfp_https":
                c["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"][
                    "trusted_ca"]["filename"] = ca_path
        return cfg
    return patch


def test_https_provider_with_sni_and_validation(pki):
    up = FakeUpstream(tls=(os.path.join(pki, "srv.crt"), os.path.join(pki, "srv.key")))
    cfg = {"providers": [
        {"name": "secure", "supportedProvider": "OPENAI", "url": up.url + "/v1", "apiKey": "sk-tls-1",
         "models": ["m1"]},
        # Same server, but addressed by a name its certificate does not carry: must be refused.
        {"name": "wrong-name", "supportedProvider": "OPENAI", "url": f"https://127.0.0.1:{up.port}/v1",
         "apiKey": "sk-tls-2", "models": ["m2"]}],
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}]}
    try:
        with Envoy(cfg, patch=trust(os.path.join(pki, "ca.crt"))) as envoy:
            s, h, b = request("POST", envoy.url + "/openai/v1/chat/completions", {"model": "m1", "messages": []},
                              {"x-api-key": KEY})
            assert s == 200, b
            rec = up.last()
            assert rec.path == "/v1/chat/completions"
            assert rec.headers["authorization"] == "Bearer sk-tls-1"
            assert "localhost" in up.sni
            up.clear()
            s, _, b = request("POST", envoy.url + "/openai/v1/chat/completions", {"model": "m2", "messages": []},
                              {"x-api-key": KEY})
            assert s == 503, b
            assert up.last() is None
    finally:
        up.stop()

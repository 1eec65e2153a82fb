"""Per-provider timeouts (issue 9 item 11, filter side): a provider's `timeouts.totalMs` reaches Envoy's
router as `x-envoy-upstream-rq-timeout-ms` and Envoy enforces it; providers without timeouts keep the
route's."""
import hashlib
import json
import time

import pytest

from harness import Envoy, FakeUpstream, chat_response, request

KEY = "sk-gw-timeouts"
CHAT = "/openai/v1/chat/completions"


def slow(rec):
    time.sleep(1.5)
    model = json.loads(rec.body).get("model", "none")
    return 200, {"content-type": "application/json"}, json.dumps(chat_response(model)).encode()


@pytest.fixture(scope="module")
def gw():
    up = FakeUpstream(slow)
    cfg = {
        "providers": [
            {"name": "quick", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
             "isHosted": True, "models": ["q"], "timeouts": {"totalMs": 300, "perTryMs": 250}},
            {"name": "patient", "supportedProvider": "OPENAI_COMPATIBLE", "url": up.url + "/v1",
             "isHosted": True, "models": ["p"]},
        ],
        "keys": [{"id": "k", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "config": "default"}],
    }
    envoy = Envoy(cfg).start()
    yield envoy, up
    envoy.stop()
    up.stop()


def chat(envoy, model):
    t0 = time.time()
    s, _, b = request("POST", envoy.url + CHAT, {"model": model, "messages": [{"role": "user", "content": "x"}]},
                      headers={"Authorization": f"Bearer {KEY}", "X-Provider-Name": model == "q" and "quick" or "patient"})
    return s, b, time.time() - t0


def test_provider_timeout_is_enforced_by_envoy(gw):
    envoy, up = gw
    s, b, took = chat(envoy, "q")
    assert s == 504, b
    assert took < 1.2, took
    # Envoy consumed the header: the provider never sees it.
    assert up.last() is not None and "x-envoy-upstream-rq-timeout-ms" not in up.last().headers


def test_provider_without_timeouts_keeps_the_route_timeout(gw):
    envoy, _ = gw
    s, b, took = chat(envoy, "p")
    assert s == 200, b
    assert took >= 1.4

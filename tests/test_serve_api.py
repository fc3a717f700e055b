"""The HTTP API in-process (through an HTTP client), on the shipped default model at 64px with
few steps: the OpenAI shape, PNGs with their parameters, per-image seeds, progress events, one-line
4xx for bad input, the API key, timeouts, and a failing generation that leaves the server up."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pixsigma import cli
from pixsigma.pipeline import SigmaPipeline
from pixsigma.serve import ServeConfig, create_app

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red circle at the top left"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pipe():
    return SigmaPipeline.from_pretrained()


def make_client(pipe, **kwargs):
    return TestClient(create_app(pipe, ServeConfig(ui=False, version="test", **kwargs)))


@pytest.fixture(scope="module")
def client(pipe):
    with make_client(pipe) as c:
        yield c


def decode(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def params_of(image: Image.Image) -> dict:
    return json.loads(image.text["pixsigma"])


def post(client, body, **kw):
    return client.post("/v1/images/generations", json=body, **kw)


def test_health_and_models(client, pipe):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "default"
    assert health["queue"]["max_queue"] == 8 and health["queue"]["waiting"] == 0
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["default"]
    assert models["data"][0]["hash"] == pipe.weights_hash()


def test_generation_pngs_carry_parameters_and_image_k_is_seed_plus_k(client, pipe):
    r = post(client, {"prompt": PROMPT, "n": 2, "size": "64x48", "steps": 3, "seed": 41, "sampler": "ddim",
                      "guidance_scale": 3.0, "negative_prompt": "blue"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    images = [decode(item) for item in body["data"]]
    assert [im.format for im in images] == ["PNG", "PNG"] and images[0].size == (64, 48)
    params = [params_of(im) for im in images]
    assert [p["seed"] for p in params] == [41, 42] == [item["seed"] for item in body["data"]]
    assert params[1] | {"seed": 41} == params[0]
    assert params[0] | {"seed": 0} == {
        "prompt": PROMPT, "negative": "blue", "seed": 0, "steps": 3, "cfg": 3.0, "sampler": "ddim", "size": "64x48",
        "generated_size": params[0]["generated_size"], "model": "default", "model_hash": pipe.weights_hash(),
        "dtype": "fp32", "pixsigma": "test"}
    # image 1 of seed 41 is the single request with seed 42, and the pipeline's own output
    single = post(client, {"prompt": PROMPT, "size": "64x48", "steps": 3, "seed": 42, "sampler": "ddim",
                           "guidance_scale": 3.0, "negative_prompt": "blue"}).json()["data"][0]
    assert np.array_equal(np.asarray(decode(single)), np.asarray(images[1]))
    direct = pipe(PROMPT, negative_prompt="blue", num_inference_steps=3, guidance_scale=3.0, height=48, width=64,
                  sampler="ddim", generator=torch.Generator().manual_seed(41)).images[0]
    assert np.array_equal(np.asarray(direct), np.asarray(images[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_url_response_serves_the_same_png(client):
    body = {"prompt": PROMPT, "steps": 2, "seed": 5}
    b64 = post(client, body).json()["data"][0]
    url = post(client, body | {"response_format": "url"}).json()["data"][0]["url"]
    assert url.startswith("http://") and url.endswith(".png")
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == base64.b64decode(b64["b64_json"])
    gone = client.get("/v1/images/0123abcd.png")
    assert gone.status_code == 404 and "no longer" in gone.json()["error"]["message"]


def test_stream_reports_progress_then_the_result(client):
    r = post(client, {"prompt": PROMPT, "n": 2, "steps": 3, "seed": 7, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in r.text.strip().split("\n\n")]
    names = [name for name, _ in events]
    assert names[-1] == "completed" and set(names[:-1]) == {"progress"}
    # the stream samples the job's progress, so it may skip a state (a fast last step) but never
    # goes back; the final event is always there
    running = [(d["image"], d["step"]) for name, d in events if name == "progress" and d["status"] == "running"]
    assert running and running == sorted(running) and all(0 <= i < 2 and 0 <= s <= 3 for i, s in running)
    fractions = [d["fraction"] for name, d in events if name == "progress" and d["status"] == "running"]
    assert fractions == sorted(fractions) and 0 <= fractions[0] and fractions[-1] <= 1.0
    final = events[-1][1]
    assert [item["seed"] for item in final["data"]] == [7, 8] and decode(final["data"][1]).size == (64, 64)


BAD = [
    ('{"prompt": "x", ', 400, "not valid JSON"),
    ("[1, 2]", 400, "must be a JSON object"),
    ('{"prompt": "x", "quality": "hd"}', 400, "unknown field 'quality'"),
    ('{"prompt": "   "}', 400, "prompt is empty"),
    ('{"n": 1}', 400, "field 'prompt' is required"),
    ('{"prompt": "x", "size": "4096x64"}', 400, "width 4096 is out of range; expected 16..1024"),
    ('{"prompt": "x", "size": "8x64"}', 400, "width 8 is out of range"),
    ('{"prompt": "x", "size": "big"}', 400, "is not WIDTHxHEIGHT"),
    ('{"prompt": "x", "n": 5}', 400, "n 5 is out of range; expected 1..4"),
    ('{"prompt": "x", "n": 0}', 400, "n 0 is out of range"),
    ('{"prompt": "x", "sampler": "k_lms"}', 400, "unknown sampler 'k_lms'"),
    ('{"prompt": "x", "steps": 0}', 400, "steps 0 is out of range"),
    ('{"prompt": "x", "guidance_scale": -1}', 400, "guidance scale -1.0 must be"),
    ('{"prompt": "x", "seed": -3}', 400, "seed -3 is out of range"),
    ('{"prompt": "x", "n": "two"}', 400, "n: Input should be a valid integer"),
    ('{"prompt": "x", "response_format": "png"}', 400, "response_format"),
    ('{"prompt": "x", "model": "dall-e-3"}', 400, "model 'dall-e-3' is not served here"),
    ('{"prompt": "' + "x" * (2 << 20) + '"}', 413, "larger than"),
]


@pytest.mark.parametrize("body, status, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_gets_a_one_line_4xx(client, body, status, message):
    r = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    r = client.get("/v1/edits")
    assert r.status_code == 404 and "no such API route /v1/edits" in r.json()["error"]["message"]
    assert client.get("/v1/images/generations").status_code == 405
    assert client.get("/health").status_code == 200  # still up after all of the above


def test_api_key_is_checked_on_every_api_route(pipe):
    with make_client(pipe, api_key=KEY) as c:
        for method, path in [("get", "/health"), ("get", "/v1/models"), ("post", "/v1/images/generations"),
                             ("get", "/v1/images/abc.png")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}):
                r = getattr(c, method)(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
        assert c.get("/health", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        r = post(c, {"prompt": PROMPT, "steps": 1, "seed": 0}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200


def test_a_request_past_its_timeout_gets_504_and_frees_the_worker(pipe):
    with make_client(pipe, timeout_s=0.3) as c:
        r = post(c, {"prompt": PROMPT, "steps": 200, "seed": 0})
        assert r.status_code == 504 and "did not finish within 0.3 s" in r.json()["error"]["message"]
        stats = c.get("/health").json()["queue"]
        assert stats["timed_out"] == 1 and not stats["running"] and stats["waiting"] == 0


def test_a_failing_generation_is_a_500_and_the_server_goes_on(pipe, monkeypatch):
    calls = {"n": 0}
    real = SigmaPipeline.__call__

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory\nin some kernel")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SigmaPipeline, "__call__", flaky)
    with make_client(pipe) as c:
        r = post(c, {"prompt": PROMPT, "steps": 1})
        assert r.status_code == 500
        assert r.json()["error"]["message"] == "generation failed: RuntimeError: out of memory in some kernel"
        assert post(c, {"prompt": PROMPT, "steps": 1}).status_code == 200


def test_cli_serve_settings(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setenv("PIXSIGMA_API_KEY", "from-env")
    config = cli.serve_config(parser.parse_args(["serve", "--max-queue", "3", "--port", "8001", "--no-ui"]))
    assert (config.api_key, config.max_queue, config.port, config.ui, config.host) == ("from-env", 3, 8001, False, "127.0.0.1")
    assert cli.serve_config(parser.parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv("PIXSIGMA_API_KEY")
    assert cli.serve_config(parser.parse_args(["serve"])).api_key is None


def test_cli_refuses_a_remote_host_before_loading_the_model(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_generate_pipeline", lambda *a: pytest.fail("the model was loaded"))
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pixsigma serve: error: --host 0.0.0.0 is not a loopback address") and "\n" not in err


def test_with_a_key_the_ui_asks_for_it_and_its_api_is_closed(pipe):
    app = create_app(pipe, ServeConfig(api_key=KEY, version="test"))
    with TestClient(app) as c:
        assert "Log in" in c.get("/").text
        assert c.get("/config").status_code == 401
        call = c.post("/gradio_api/call/generate", json={"data": [PROMPT, "", "1.0", 2, 4.5, "dpm-solver", 0, True, 1, ""]})
        assert call.status_code == 401
        assert c.post("/login", data={"username": "anyone", "password": "wrong"}).status_code == 400
        assert c.post("/login", data={"username": "anyone", "password": KEY}).status_code == 200
        assert c.get("/config").status_code == 200
        assert c.get("/health").status_code == 401  # the UI login does not open the API


def test_a_request_picks_loaded_loras_by_name_and_nothing_carries_over(pipe, client, tmp_path, monkeypatch):
    import copy

    from pixsigma.model.lora import LoraSpec, add_lora, save_lora

    model = copy.deepcopy(pipe.transformer)
    add_lora(model, LoraSpec(rank=4), adapter_name="shapes")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    path = save_lora(model, tmp_path / "shapes.safetensors")
    body = {"prompt": PROMPT, "steps": 2, "seed": 1}
    base = np.asarray(decode(post(client, body).json()["data"][0]))
    served = []
    monkeypatch.setattr(cli, "_load_generate_pipeline", lambda *a: pipe)
    monkeypatch.setattr("pixsigma.serve.api.run_server", lambda p, config: served.append((p, config)))
    try:
        assert cli.main(["serve", "--lora", str(path), "--no-ui"]) == 0 and served[0][0] is pipe
        assert client.get("/v1/models").json()["data"][0]["loras"] == ["shapes"]
        with_lora = decode(post(client, body | {"lora": {"shapes": 1.0}}).json()["data"][0])
        assert params_of(with_lora)["lora"] == "shapes:1"
        assert np.abs(np.asarray(with_lora).astype(int) - base).max() > 10
        after = decode(post(client, body).json()["data"][0])
        assert "lora" not in params_of(after) and np.array_equal(np.asarray(after), base)
        r = post(client, body | {"lora": {"other": 1.0}})
        assert r.status_code == 400 and "unknown LoRA 'other'; expected one of the server's: shapes" in r.text
    finally:
        pipe.unload_lora_weights()

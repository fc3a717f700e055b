"""A served ControlNet: `control_image` on POST /v1/images/generations (base64 or a data: URL),
served in-process through an HTTP client on a tiny pipeline with a ControlNet of non-zero
projections: the served image is the pipeline's own with the same control image, bit for bit;
the PNG records the control by hashes; bad control input gets a one-line 400; the UI shows the
control only with a ControlNet; `pixsigma serve --controlnet` loads it."""

import base64
import hashlib
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pixsigma import cli
from pixsigma.io import weights_hash
from pixsigma.model.controlnet import ControlNetTransformer
from pixsigma.pipeline import SigmaPipeline
from pixsigma.serve import ServeConfig, create_app
from tests.test_controlnet_pipeline import controlnet_file, folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPT = "a red square"
BODY = {"prompt": PROMPT, "steps": 3, "seed": 5, "guidance_scale": 3.0, "sampler": "dpm-solver"}


@pytest.fixture(scope="module")
def pipe(folder, controlnet_file):
    return SigmaPipeline.from_pretrained(folder, controlnet=controlnet_file)


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, ServeConfig(ui=False, version="test"))) as c:
        yield c


@pytest.fixture(scope="module")
def control() -> Image.Image:
    img = np.zeros((40, 24, 3), np.uint8)  # another size and aspect than the output: the pipeline fits it
    img[10:30, 6:18] = (255, 40, 0)
    return Image.fromarray(img)


def b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def post(client, body):
    return client.post("/v1/images/generations", json=body)


def served(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


def direct(pipe, **kwargs) -> np.ndarray:
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=3, guidance_scale=3.0, sampler="dpm-solver",
               generator=torch.Generator("cpu").manual_seed(5), output_type="pil", **kwargs)
    return np.asarray(out.images[0])


def assert_one_line_400(response, *parts):
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and all(p in message for p in parts), message


def test_a_served_control_image_generates_what_the_pipeline_does(client, pipe, control):
    body = BODY | {"control_image": b64(control), "control_type": "canny", "control_scale": 0.7}
    image = served(post(client, body))
    want = direct(pipe, control_image=control, control_type="canny", controlnet_conditioning_scale=0.7)
    assert np.array_equal(np.asarray(image), want)
    plain = direct(pipe)
    assert np.abs(want.astype(int) - plain).max() > 0  # the control changes the image: the check above bites
    params = json.loads(image.text["pixsigma"])
    pixels = np.asarray(control)
    assert params["control"] == "sha256:" + hashlib.sha256(f"{pixels.shape}".encode() + pixels.tobytes()).hexdigest()[:12]
    assert (params["control_type"], params["control_scale"]) == ("canny", 0.7)
    assert params["controlnet"] == weights_hash(pipe.controlnet.controlnet_state_dict())
    assert client.get("/v1/models").json()["data"][0]["controlnet"] == params["controlnet"]
    # a data: URL is the same image; another scale is another image
    url = served(post(client, body | {"control_image": "data:image/png;base64," + b64(control)}))
    assert np.array_equal(np.asarray(url), want)
    other = served(post(client, body | {"control_scale": 0.0}))
    assert np.array_equal(np.asarray(other), plain) and json.loads(other.text["pixsigma"])["control_scale"] == 0.0


def test_requests_without_control_are_unchanged(client, pipe, control):
    image = served(post(client, BODY))
    assert np.array_equal(np.asarray(image), direct(pipe))
    assert not {"control", "control_type", "control_scale", "controlnet"} & set(json.loads(image.text["pixsigma"]))
    gray = control.convert("L")  # one channel is a control image too, and JPEG decodes
    assert np.array_equal(np.asarray(served(post(client, BODY | {"control_image": b64(gray)}))),
                          direct(pipe, control_image=gray))
    jpeg = Image.open(io.BytesIO(base64.b64decode(b64(control, "JPEG"))))
    assert np.array_equal(np.asarray(served(post(client, BODY | {"control_image": b64(control, "JPEG")}))),
                          direct(pipe, control_image=jpeg))


def test_bad_control_input_gets_a_one_line_400(client, control):
    assert_one_line_400(post(client, BODY | {"control_image": "not base64!"}), "control_image is not valid base64")
    junk = base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()
    assert_one_line_400(post(client, BODY | {"control_image": junk}), "control_image cannot be decoded")
    assert_one_line_400(post(client, BODY | {"control_image": "data:image/png," + b64(control)}), "without ';base64,'")
    two = Image.fromarray(np.zeros((16, 16, 2), np.uint8), "LA")
    assert_one_line_400(post(client, BODY | {"control_image": b64(two)}), "2 channels", "expected 1 (grayscale) or 3")
    translucent = Image.fromarray(np.full((16, 16, 4), 100, np.uint8), "RGBA")
    assert_one_line_400(post(client, BODY | {"control_image": b64(translucent)}), "4 channels")
    for body in (BODY | {"control_image": b64(control), "control_type": "depth"}, BODY | {"control_type": "depth"}):
        assert_one_line_400(post(client, body), "unknown control_type 'depth'; expected one of none, canny, mask")
    assert client.get("/health").json()["status"] == "ok"


def test_a_server_without_controlnet_refuses_a_control_image(folder, control):
    with TestClient(create_app(SigmaPipeline.from_pretrained(folder), ServeConfig(ui=False))) as c:
        assert_one_line_400(post(c, BODY | {"control_image": b64(control)}), "this server has no ControlNet",
                            "--controlnet")
        assert c.get("/v1/models").json()["data"][0]["controlnet"] is None
        assert post(c, BODY).status_code == 200


def test_the_ui_shows_the_control_only_with_a_controlnet_and_uses_it(pipe, folder, control):
    import gradio as gr

    from pixsigma.serve.api import Service
    from pixsigma.serve.ui import build_ui

    def page(p):
        service = Service(p, ServeConfig())
        demo = build_ui(service)
        image = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "control-image")
        group = next(b for b in demo.blocks.values() if image in getattr(b, "children", []))
        run = next(f.fn for f in demo.fns.values() if f.api_name == "generate")
        return service, group.visible, run

    service, visible, run = page(pipe)
    assert visible is True
    args = (PROMPT, "", "1.0", 3, 3.0, "dpm-solver", 5, False, 1, "")
    try:
        paths, _, _, _ = run(*args, control, "canny", 0.7, progress=lambda *a, **k: None)
        with Image.open(paths[0]) as im:
            assert im.size == (32, 32) and json.loads(im.text["pixsigma"])["control_type"] == "canny"
            assert np.array_equal(np.asarray(im), direct(pipe, control_image=control, control_type="canny",
                                                         controlnet_conditioning_scale=0.7))
        with pytest.raises(gr.Error, match="2 channels"):
            run(*args, Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA"), "none", 1.0, progress=lambda *a, **k: None)
    finally:
        service.queue.close()
    service, visible, run = page(SigmaPipeline.from_pretrained(folder))
    service.queue.close()
    assert visible is False


def test_cli_serve_loads_the_controlnet(folder, controlnet_file, monkeypatch):
    seen = []
    monkeypatch.setattr("pixsigma.serve.api.run_server", lambda p, config: seen.append(p))
    assert cli.main(["serve", "--model", str(folder), "--controlnet", str(controlnet_file), "--no-ui"]) == 0
    assert isinstance(seen[0].controlnet, ControlNetTransformer)
    assert cli.main(["serve", "--model", str(folder), "--no-ui"]) == 0 and seen[1].controlnet is None

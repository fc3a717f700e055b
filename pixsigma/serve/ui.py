"""The web UI: a Gradio page at / of the API's app, sharing its pipeline and its queue.

Controls: prompt, negative prompt, size (the model's aspect-ratio bins), steps, guidance, sampler,
seed (or a random one) and the number of images, and with a ControlNet loaded (`--controlnet`)
an optional control image, its preprocessor and scale; the output is a gallery of the PNGs, which
carry their parameters, and the same files to download. A UI request is checked by the same
`check_request` and waits in the same line as the API's requests. With an API key the page asks
for it (any user name) before it shows, so the UI is no way around the key.
"""

from __future__ import annotations

import hmac
import logging
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path

from pixsigma.diffusion.samplers import SAMPLERS
from pixsigma.errors import PixsigmaError
from pixsigma.resolution import aspect_ratio_bins
from pixsigma.data.control import CONTROL_TYPES
from pixsigma.serve.control import check_control
from pixsigma.serve.generate import check_request, loaded_adapters
from pixsigma.serve.queue import CANCELLED, DONE, TIMED_OUT, QueueFull

log = logging.getLogger(__name__)

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads nothing from outside
MONO_FONTS = ["ui-monospace", "monospace"]


def size_choices(resolution: int, multiple: int) -> list[tuple[str, str]]:
    """(label, ratio) for every aspect-ratio bin of the model, portrait to landscape."""
    bins = aspect_ratio_bins(resolution, multiple)
    return [(f"{w}×{h}  (h:w {float(r):.2f})", r) for r, (h, w) in sorted(bins.items(), key=lambda kv: -float(kv[0]))]


class Outputs:
    """A folder for the PNGs the UI shows (Gradio serves files by path); the newest `keep` stay."""

    def __init__(self, keep: int):
        self.dir = Path(tempfile.mkdtemp(prefix="pixsigma-ui-"))
        self.keep = max(1, keep)
        weakref.finalize(self, shutil.rmtree, self.dir, True)

    def write(self, png: bytes, seed: int) -> str:
        path = self.dir / f"pixsigma-{seed}-{uuid.uuid4().hex[:8]}.png"
        path.write_bytes(png)
        for old in sorted(self.dir.iterdir(), key=lambda p: p.stat().st_mtime)[:-self.keep]:
            old.unlink(missing_ok=True)
        return str(path)


def parse_lora(text: str | None) -> dict[str, float]:
    """"name:scale, other" -> {"name": scale, "other": 1.0}; a one-line PixsigmaError for a bad scale."""
    out = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, scale = item.partition(":")
        try:
            out[name.strip()] = float(scale) if scale.strip() else 1.0
        except ValueError:
            raise PixsigmaError(f"LoRA {item!r}: expected NAME:SCALE with a number, e.g. {name.strip()}:0.8") from None
    return out


def _run_job(service, req, progress):
    """Queue the request and wait for it, reporting progress; the images, or a gr.Error."""
    import gradio as gr

    try:
        job = service.queue.submit(req, service.config.timeout_s)
    except QueueFull as e:
        raise gr.Error(str(e)) from None
    try:
        while not job.wait(0.1):
            if job.state == "queued":
                progress(0.0, desc=f"waiting: {service.queue.position(job)} ahead")
            else:
                p = job.progress
                progress(p.fraction, desc=f"image {p.image + 1}/{p.images}, step {p.step}/{p.steps}")
    finally:
        if not job.done:
            service.queue.cancel(job)
    if job.state == TIMED_OUT:
        raise gr.Error(service.timeout_error().message)
    if job.state == CANCELLED:
        raise gr.Error("the request was cancelled")
    if job.state != DONE:
        raise gr.Error(str(job.error))
    return job.result


def _control_inputs(controlnet: str | None):
    """The control image (kept as uploaded: no mode conversion), its type and scale; shown only
    when the server has a ControlNet (`controlnet`, its hash)."""
    import gradio as gr

    with gr.Group(visible=controlnet is not None):
        image = gr.Image(label=f"Control image (optional; ControlNet {controlnet})", type="pil", image_mode=None,
                         sources=["upload", "clipboard"], elem_id="control-image")
        with gr.Row():
            kind = gr.Dropdown(list(CONTROL_TYPES), value="none", elem_id="control-type",
                               label="Control type (none: as is, canny: edges, mask: grayscale)")
            scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Control scale", elem_id="control-scale")
    return image, kind, scale


def _settings_inputs(gr, config, choices, square, adapters, controlnet) -> list:
    """The page's generation settings, in the order `build_ui`'s `run` takes them."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt", placeholder="a red circle at the top left")
    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
    ratio = gr.Dropdown(choices, value=square, label="Size (aspect-ratio bins of the model)", elem_id="size")
    with gr.Row():
        steps = gr.Slider(1, config.max_steps, value=20, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, min(20.0, config.max_guidance), value=4.5, step=0.1, label="Guidance scale")
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLERS), value="dpm-solver", label="Sampler", elem_id="sampler")
        n = gr.Slider(1, config.max_images, value=1, step=1, label="Images")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
    lora = gr.Textbox(label=f"LoRA: NAME:SCALE, ... (loaded: {', '.join(adapters)})", elem_id="lora",
                      visible=bool(adapters))
    control_image, control_type, control_scale = _control_inputs(controlnet)
    return [prompt, negative, ratio, steps, guidance, sampler, seed, random_seed, n, lora, control_image, control_type,
            control_scale]


def build_ui(service):
    """The Gradio Blocks page for `service` (an api.Service)."""
    import gradio as gr

    pipe, config = service.pipe, service.config
    outputs = Outputs(config.keep_images)
    choices = size_choices(pipe.resolution, pipe.patch_pixels)
    bins = aspect_ratio_bins(pipe.resolution, pipe.patch_pixels)
    square = min(bins, key=lambda r: abs(float(r) - 1.0))

    adapters = loaded_adapters(pipe)

    def run(prompt, negative, ratio, steps, guidance, sampler, seed, random_seed, n, lora, control_image=None,
            control_type="none", control_scale=1.0, progress=gr.Progress()):
        height, width = bins.get(ratio, bins[square])
        try:
            control = None
            if control_image is not None:
                control = check_control(control_image, control_type or "none", control_scale, service.controlnet)
            req = check_request(config, pipe.resolution, prompt, negative or "", int(n), height, width, int(steps),
                                float(guidance), sampler, None if random_seed else int(seed), parse_lora(lora),
                                adapters, control)
        except PixsigmaError as e:
            raise gr.Error(str(e)) from None
        images = _run_job(service, req, progress)
        paths = [outputs.write(image.png, image.seed) for image in images]
        seeds = ", ".join(str(image.seed) for image in images)
        status = f"{len(images)} image(s), {images[0].width}×{images[0].height}, seed {seeds}, {req.sampler} {req.steps} steps"
        return paths, paths, status, req.seed

    # delete_cache: Gradio's copies of shown files older than an hour go, checked every 10 minutes
    with gr.Blocks(title=f"pixsigma: {pipe.name}", analytics_enabled=False, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"## pixsigma: text to image\nModel **{pipe.name}** ({pipe.resolution}px, weights {pipe.weights_hash()})")
        with gr.Row():
            with gr.Column():
                inputs = _settings_inputs(gr, config, choices, square, adapters, service.controlnet)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", columns=2, elem_id="gallery",
                                     buttons=["download", "fullscreen"])
                files = gr.File(label="PNG files (with their generation parameters)", file_count="multiple",
                                elem_id="files")
                status = gr.Markdown(elem_id="status")
        prompt, seed = inputs[0], inputs[6]
        button.click(run, inputs, [gallery, files, status, seed], api_name="generate", concurrency_limit=None)
        prompt.submit(run, inputs, [gallery, files, status, seed], api_name=False, concurrency_limit=None)
    demo.outputs_dir = outputs.dir
    demo._pixsigma_outputs = outputs  # keeps the folder alive as long as the page
    return demo


def mount_ui(app, service):
    """Mount the UI at / of `app` (behind the API key when the server has one)."""
    import gradio as gr

    demo = build_ui(service)
    key = service.config.api_key
    auth = (lambda user, password: hmac.compare_digest(password.encode(), key.encode())) if key else None
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return gr.mount_gradio_app(app, demo, path="/", auth=auth, auth_message="Log in with any user name and the API key.",
                               allowed_paths=[str(demo.outputs_dir)], ssr_mode=False, theme=theme,
                               footer_links=["api"], show_error=True)

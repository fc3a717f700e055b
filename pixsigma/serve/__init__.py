"""Serving: one process holds a pipeline and serves an HTTP API (OpenAI's images shape) and a
Gradio web UI, both in front of one worker with a bounded queue.

    from pixsigma.serve import ServeConfig, create_app, run_server
    run_server(SigmaPipeline.from_pretrained(), ServeConfig(port=7860, max_queue=8))

See docs/serving.md.
"""

from pixsigma.serve.api import create_app, run_server
from pixsigma.serve.config import API_KEY_ENV, ServeConfig
from pixsigma.serve.generate import GeneratedImage, GenerationRequest, check_request

__all__ = ["API_KEY_ENV", "GeneratedImage", "GenerationRequest", "ServeConfig", "check_request", "create_app", "run_server"]

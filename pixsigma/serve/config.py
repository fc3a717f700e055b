"""The server's settings: where it listens, how much it queues, and what a request may ask."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pixsigma.errors import PixsigmaError

API_KEY_ENV = "PIXSIGMA_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """host/port: where to listen (loopback unless allow_remote); max_queue: requests that may wait
    behind the running one (more get 429); timeout_s: the longest a request may wait and run;
    api_key: required on every API route when set; max_images / max_side / max_steps /
    max_prompt_chars: the largest request accepted; keep_images: generated PNGs kept for
    response_format "url" (the oldest go first); ui: mount the Gradio UI at /; dtype and version:
    recorded in every PNG."""

    host: str = "127.0.0.1"
    port: int = 7860
    max_queue: int = 8
    timeout_s: float = 300.0
    api_key: str | None = None
    allow_remote: bool = False
    max_images: int = 4
    max_side: int | None = None  # None: twice the model's resolution, at least 1024
    min_side: int = 16
    max_steps: int = 200
    max_guidance: float = 30.0
    max_prompt_chars: int = 2000
    keep_images: int = 64
    ui: bool = True
    dtype: str = "fp32"
    version: str = ""

    def check(self) -> "ServeConfig":
        """Raise a one-line PixsigmaError for a setting that cannot work."""
        if not is_loopback(self.host) and not self.allow_remote:
            raise PixsigmaError(f"--host {self.host} is not a loopback address; binding it exposes the server to the "
                                "network: expected 127.0.0.1 / localhost, or pass --allow-remote (and set --api-key)")
        if not 0 <= self.port <= 65535:
            raise PixsigmaError(f"--port {self.port}: expected 0..65535")
        if self.max_queue < 0:
            raise PixsigmaError(f"--max-queue {self.max_queue}: expected 0 or more waiting requests")
        if not self.timeout_s > 0:
            raise PixsigmaError(f"--timeout {self.timeout_s}: expected a positive number of seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise PixsigmaError("the API key is empty; expected a non-empty --api-key (or PIXSIGMA_API_KEY), or none")
        if self.max_side is not None and self.max_side < self.min_side:
            raise PixsigmaError(f"--max-side {self.max_side}: expected at least {self.min_side}")
        return self

    def side_limit(self, resolution: int) -> int:
        """The largest image side a request may ask for."""
        return self.max_side if self.max_side is not None else max(1024, 2 * resolution)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

"""`pixsigma serve` end to end: the real command on a free loopback port, driven over HTTP and in
headless Chromium. The pictures are read back with the toy evaluator (the prompt's color at the
prompt's position); load: 30 concurrent requests against a queue of 8, and 100 sequential ones
with the server's RSS flat."""

import base64
import concurrent.futures
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from pixsigma.toy.evaluate import score

MAX_QUEUE = 8
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m pixsigma.cli serve` on the shipped model, one thread, UI on; its base URL and process."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PIXSIGMA_API_KEY", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pixsigma.cli", "serve", "--port", str(port), "--max-queue",
                                 str(MAX_QUEUE)], stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield base, proc
    proc.terminate()  # uvicorn's graceful shutdown
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def generate(base, timeout=120, **body):
    return httpx.post(f"{base}/v1/images/generations", json=body, timeout=timeout)


def png(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))


def queue_stats(base) -> dict:
    return httpx.get(f"{base}/health", timeout=10).json()["queue"]


def wait_for(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("prompt", ["a red circle at the top left", "a blue square at the bottom right"])
def test_generated_images_show_the_prompts_color_at_its_position(server, prompt):
    base, _ = server
    r = generate(base, prompt=prompt, n=2, steps=8, seed=2)
    assert r.status_code == 200, r.text
    for k, item in enumerate(r.json()["data"]):
        image = png(item)
        params = json.loads(image.text["pixsigma"])
        assert (params["prompt"], params["seed"], params["steps"]) == (prompt, 2 + k, 8)
        result = score(prompt, image.convert("RGB"))
        assert result.color_ok and result.position_ok, (prompt, k, [(d.color, d.cell) for d in result.detections])


def test_a_client_that_disconnects_frees_its_slot(server):
    base, _ = server
    before = queue_stats(base).get("cancelled", 0)
    long = {"prompt": "a red circle", "steps": 200, "seed": 0}
    running = threading.Thread(target=lambda: pytest.raises(httpx.ReadTimeout, generate, base, timeout=4, **long))
    running.start()
    wait_for(lambda: queue_stats(base)["running"])
    with pytest.raises(httpx.ReadTimeout):  # queued behind the long one, then gone
        generate(base, timeout=0.5, **long)
    wait_for(lambda: queue_stats(base)["waiting"] == 0, timeout=5)
    stats = queue_stats(base)
    assert stats["running"] and stats["cancelled"] == before + 1  # left the line; the long one still runs
    running.join()
    wait_for(lambda: not queue_stats(base)["running"], timeout=10)  # its client left: stopped at the next step
    assert queue_stats(base)["cancelled"] == before + 2
    assert generate(base, prompt="a red circle", steps=1).status_code == 200


def test_30_concurrent_requests_against_a_queue_of_8(server):
    base, _ = server
    start = threading.Barrier(30)

    def one(i):
        start.wait()
        return generate(base, timeout=300, prompt="a green circle", steps=2, seed=i)

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(one, range(30)))
    codes = [r.status_code for r in answers]
    assert len(codes) == 30 and set(codes) <= {200, 429}, codes
    assert codes.count(200) >= MAX_QUEUE + 1 and codes.count(429) >= 1, codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "server_busy"
        else:
            assert png(r.json()["data"][0]).size == (64, 64)
    stats = queue_stats(base)
    assert stats["peak_pending"] <= MAX_QUEUE + 1 and stats["waiting"] == 0 and not stats["running"]


@pytest.mark.slow
def test_rss_is_flat_over_100_sequential_requests(server):
    base, proc = server
    rss = []
    with httpx.Client(timeout=60) as client:
        for i in range(100):
            r = client.post(f"{base}/v1/images/generations",
                            json={"prompt": "a red circle at the top left", "steps": 1, "guidance_scale": 1.0, "seed": i})
            assert r.status_code == 200
            if i % 10 == 9:
                rss.append(psutil.Process(proc.pid).memory_info().rss)
    warm = rss[1]  # after 20 requests
    growth = max(rss[2:]) / warm - 1
    print(f"server RSS every 10 requests (MiB): {[round(v / 2**20) for v in rss]}; growth after warm-up {growth:.2%}")
    assert growth <= 0.05, [round(v / 2**20) for v in rss]


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tempfile.mkdtemp(prefix='pixsigma-chromium-')}", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                    reason="Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)")
def test_ui_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = server
    prompt = "a red circle at the top left"
    driver = chrome()
    try:
        driver.get(base + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea")).send_keys(prompt)
        for field, value in (("#steps input[type=number]", "8"), ("#seed input", "3")):
            box = driver.find_element(By.CSS_SELECTOR, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "#random-seed input[type=checkbox]").click()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        image = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#gallery img"))
        wait.until(lambda d: "seed 3" in d.find_element(By.CSS_SELECTOR, "#status").text)
        shot = Path(os.environ.get("PIXSIGMA_SCREENSHOT_DIR", tmp_path)) / "serve_ui.png"
        driver.save_screenshot(str(shot))
        src = image.get_attribute("src")
        links = [a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#files a")]
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000
    assert any(link and link.endswith(".png") for link in links), links
    shown = Image.open(io.BytesIO(httpx.get(src, timeout=10).content))
    params = json.loads(shown.text["pixsigma"])  # the gallery shows the PNG with its parameters
    assert (params["prompt"], params["seed"], params["steps"]) == (prompt, 3, 8)
    result = score(prompt, shown.convert("RGB"))
    assert result.color_ok and result.position_ok, [(d.color, d.cell) for d in result.detections]

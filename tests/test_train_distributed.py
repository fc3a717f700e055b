"""Many processes and interrupted runs, in subprocesses on CPU.

- 2 data-parallel processes (torchrun, gloo) end with identical weights on both ranks, equal to
  one process with the same global batch (to fp32 tolerance).
- A run killed with SIGKILL after a checkpoint and resumed ends bit-identical to an
  uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_train_loop import synthetic_cache

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def _config(path: Path, cache: Path, **extra) -> Path:
    lines = [
        "[model]", 'preset = "tiny"',
        "[data]", f'cache_dir = "{cache}"',
        "[optim]", f'name = "{extra.get("optim", "came")}"', "lr = 1e-3", "warmup_steps = 3", "ema_decay = 0.9",
        "[schedule]", f"max_steps = {extra.get('steps', 6)}", "batch_size = 2", "log_every = 1", "deterministic = true",
        "[checkpointing]", f"every = {extra.get('every', 3)}", "keep = 2", 'export = "model"',
        "[output]", f'dir = "{path.parent / "run"}"', "tensorboard = false",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "pixsigma.cli", *map(str, args)]


def test_two_processes_match_one(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    # AdamW: CAME's normalized update turns float-level differences of near-zero gradients into
    # sign flips, so 2-rank vs 1-rank agreement is checked with AdamW (CAME runs in the resume test).
    cfg = _config(tmp_path / "c.toml", cache, optim="adamw")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          "-m", "pixsigma.cli", "train", cfg, "--output", tmp_path / "ddp"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = subprocess.run(_cli("train", cfg, "--output", tmp_path / "one", "--set", "schedule.batch_size=4"), env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    logs = [json.loads(l) for l in open(tmp_path / "ddp" / "log.jsonl")]
    digests = logs[-1]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical weights
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["final_layer.linear.weight"], torch.zeros_like(a["final_layer.linear.weight"]))
    la = [x["loss"] for x in logs if "loss" in x]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "one" / "log.jsonl") if '"loss"' in l]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    cache = synthetic_cache(tmp_path / "cache")
    cfg = _config(tmp_path / "c.toml", cache, steps=60, every=10)
    ref = subprocess.run(_cli("train", cfg, "--output", tmp_path / "ref"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", cfg, "--output", run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    step_killed = json.loads((run / "checkpoints" / latest.read_text().strip() / "state.json").read_text())["step"]
    assert 10 <= step_killed < 60

    res = subprocess.run(_cli("train", cfg, "--output", run, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("model.safetensors",):
        a, b = load_file(tmp_path / "ref" / name), load_file(run / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = "checkpoints/step-00000060"
    for name in ("ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(tmp_path / "ref" / final / name), load_file(run / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # without --resume an existing run is refused (one line, exit 2)
    again = subprocess.run(_cli("train", cfg, "--output", run), env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr

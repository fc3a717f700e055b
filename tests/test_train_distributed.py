"""Many processes and interrupted runs, in subprocesses on CPU.

- 2 data-parallel processes (torchrun, gloo) end with identical weights on both ranks, equal to
  one process with the same global batch (to fp32 tolerance).
- A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run: killed at
  fixed points (right after a checkpoint is published; inside a checkpoint write, after the
  weights, before state.json and the rename), and once at a random time (slow).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_loop import synthetic_cache

_PATH = [str(Path(__file__).resolve().parent.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(_PATH)}

# `pixsigma train ...` in a process that SIGKILLs itself at a fixed point of checkpoint step
# argv[2]: "after" = once the checkpoint is published (its folder renamed, `latest` updated),
# "inside" = while it is written (weights, EMA, optimizer and RNG files are in the temporary
# folder; state.json and the rename are not done).
KILL_AT = """
import os, signal, sys
from pixsigma import cli
from pixsigma.train import checkpointing, loop

where, at = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "after":
    save = loop.save_checkpoint
    def save_then_die(run_dir, step, **kw):
        out = save(run_dir, step, **kw)
        if step == at:
            die()
        return out
    loop.save_checkpoint = save_then_die
else:
    write_json = checkpointing.write_json
    def write_json_or_die(path, obj, **kw):
        if path.name == "state.json" and obj["step"] == at:
            die()
        return write_json(path, obj, **kw)
    checkpointing.write_json = write_json_or_die
sys.exit(cli.main(sys.argv[3:]))
"""


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


def _assert_same_end(ref: Path, run: Path, steps: int, export: str = "model.safetensors") -> None:
    """The export, the last checkpoint's EMA and optimizer state, and the last logged losses are bit-identical."""
    a, b = load_file(ref / export), load_file(run / export)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = f"checkpoints/step-{steps:08d}"
    for name in ("ema.safetensors", "optimizer.safetensors"):
        a, b = load_file(ref / final / name), load_file(run / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: [json.loads(l)["loss"] for l in open(d / "log.jsonl") if '"loss"' in l]  # noqa: E731
    assert losses(run)[-steps // 2:] == losses(ref)[-steps // 2:]


def _run_cli(*args) -> None:
    res = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def assert_kill_then_resume_is_bit_identical(tmp_path: Path, command: list, export: str, steps: int, kill_after: int) -> None:
    """`pixsigma COMMAND` run through, and again killed (SIGKILL) right after the checkpoint of
    step `kill_after` and resumed: both runs end bit-identical (see `_assert_same_end`)."""
    ref, run = tmp_path / "ref", tmp_path / "killed"
    _run_cli(*command, "--output", ref)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "after", str(kill_after), *map(str, command), "--output", str(run)],
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run / export).exists()
    _run_cli(*command, "--output", run, "--resume")
    _assert_same_end(ref, run, steps, export)


def two_process_and_one_process_exports(tmp_path: Path, command: list, export: str) -> tuple[dict, dict]:
    """`pixsigma COMMAND` on 2 processes (batch 2 each) and on 1 (batch 4); checks that both ranks
    ended with identical weights and returns the two exports' tensors."""
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
                          "-m", "pixsigma.cli", *map(str, command), "--output", str(tmp_path / "ddp")], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    _run_cli(*command, "--output", tmp_path / "one", "--set", "schedule.batch_size=4")
    digests = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")][-1]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical weights
    return load_file(tmp_path / "ddp" / export), load_file(tmp_path / "one" / export)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """(config, cache, reference run folder): 12 steps, a checkpoint every 4, uninterrupted."""
    root = tmp_path_factory.mktemp("kill")
    cache = synthetic_cache(root / "cache")
    cfg = _config(root / "c.toml", cache, steps=12, every=4)
    ref = subprocess.run(_cli("train", cfg, "--output", root / "ref"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return cfg, root / "ref"


def _killed(cfg: Path, run: Path, where: str, step: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILL_AT, where, str(step), "train", str(cfg), "--output", str(run)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def _latest_step(run: Path) -> int:
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((latest / "state.json").read_text())["step"]


def test_kill_right_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, short_run):
    cfg, ref = short_run
    run = tmp_path / "killed"
    killed = _killed(cfg, run, "after", 8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _latest_step(run) == 8 and not (run / "model.safetensors").exists()
    res = subprocess.run(_cli("train", cfg, "--output", run, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _assert_same_end(ref, run, 12)


def test_kill_inside_a_checkpoint_write_then_resume_is_bit_identical(tmp_path, short_run):
    cfg, ref = short_run
    run = tmp_path / "killed"
    killed = _killed(cfg, run, "inside", 8)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = run / "checkpoints" / ".tmp-step-00000008"
    assert {"model.safetensors", "ema.safetensors", "optimizer.safetensors"} <= {f.name for f in partial.iterdir()}
    assert not (partial / "state.json").exists() and not (run / "checkpoints" / "step-00000008").exists()
    assert _latest_step(run) == 4  # `latest` still names the last complete checkpoint
    res = subprocess.run(_cli("train", cfg, "--output", run, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not partial.exists() and _latest_step(run) == 12
    _assert_same_end(ref, run, 12)


@pytest.mark.slow
def test_sigkill_at_a_random_time_then_resume_is_bit_identical(tmp_path):
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

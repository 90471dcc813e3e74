"""A full disk anywhere in training or evaluation: one clear line, nothing half-written left for a later
run to trust or trip over, and the rerun finishes. By injection at the library boundary (safetensors
raises its own SafetensorError, not OSError) and, when the tests run as root, on a real full tmpfs."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

import sae.base as sae_base
import train.checkpoint as ckpt_mod
from evaluate.__main__ import main as evaluate_main
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.checkpoint import CheckpointError, list_checkpoints
from train.run import TrainError, train, user_errors

FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def test_safetensors_disk_full_in_a_checkpoint_is_one_line_and_leaves_no_temporary(tiny_cache, tmp_path,
                                                                                   monkeypatch):
    real = ckpt_mod.save_file

    def full_at_20(tensors, path):
        if "step-00000020" in path:
            raise SafetensorError(FULL)
        real(tensors, path)

    monkeypatch.setattr(ckpt_mod, "save_file", full_at_20)
    with pytest.raises(CheckpointError) as info:
        train(tiny_config(tiny_cache, tmp_path))
    message = str(info.value)
    assert message.startswith("disk full while writing checkpoint step-00000020")
    assert "step-00000010) is intact" in message and "--resume" in message and "\n" not in message
    assert _temporaries(tmp_path / "run") == []
    monkeypatch.undo()
    assert train(tiny_config(tiny_cache, tmp_path, resume=True)).state.step == 40


def test_safetensors_disk_full_in_the_final_sae_is_one_line_and_the_rerun_finishes(tiny_cache, tmp_path,
                                                                                  monkeypatch):
    def full(tensors, path):
        Path(path).write_bytes(b"partial")  # as a real writer leaves a piece behind
        raise SafetensorError(FULL)

    monkeypatch.setattr(sae_base, "save_file", full)
    with pytest.raises(TrainError) as info:
        train(tiny_config(tiny_cache, tmp_path))
    message = str(info.value)
    assert message.startswith(f"disk full while training into {tmp_path / 'run'}")
    assert "checkpoint step-00000040 is intact" in message and "--resume" in message
    assert _temporaries(tmp_path / "run") == [] and not (tmp_path / "run" / "sae" / "sae.safetensors").exists()
    monkeypatch.undo()
    result = train(tiny_config(tiny_cache, tmp_path, resume=True))
    assert result.state.step == 40 and (tmp_path / "run" / "sae" / "sae.safetensors").is_file()


def test_disk_full_in_the_metrics_log_is_one_line(tiny_cache, tmp_path, monkeypatch):
    import train.metrics as metrics_mod

    real = metrics_mod.MetricsLog.log

    def log(self, record):
        if record.get("step", 0) >= 15:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(metrics_mod.MetricsLog, "log", log)
    with pytest.raises(TrainError, match=r"disk full while training into .*checkpoint step-00000010 is intact"):
        train(tiny_config(tiny_cache, tmp_path))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m"):
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a tmpfs mount, which needs root; the injected cases above cover it")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of `folder` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)
    return filler


def test_a_real_full_disk_during_training_then_resume(tiny_cache, tmp_path):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        filler: list[Path] = []

        def fill_after_the_first_checkpoint(state):
            if state.step == 11:
                filler.append(_fill(mnt))

        with pytest.raises(user_errors()) as info:
            train(tiny_config(tiny_cache, mnt), after_step=[fill_after_the_first_checkpoint])
        message = str(info.value)
        assert "disk full" in message and "--resume" in message and "\n" not in message
        assert _temporaries(mnt / "run") == []
        assert [p.name for p in list_checkpoints(mnt / "run")] == ["step-00000010"]
        filler[0].unlink()
        assert train(tiny_config(tiny_cache, mnt, resume=True)).state.step == 40


def test_a_real_full_disk_during_evaluation_is_one_line(tiny_cache, tmp_path, capsys):
    with small_tmpfs(tmp_path / "mnt", size="4m") as mnt:
        train(tiny_config(tiny_cache, mnt, steps=10))
        capsys.readouterr()
        filler = _fill(mnt)
        assert evaluate_main([str(mnt / "run"), "--no-downstream"]) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "disk full" in lines[0]
        assert _temporaries(mnt / "run") == []
        filler.unlink()
        assert evaluate_main([str(mnt / "run"), "--no-downstream"]) == 0

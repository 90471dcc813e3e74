"""verify finds truncated, bit-flipped and missing shards; the CLI prints and exits as documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

import cache
from cache.__main__ import main
from tests.cache.cache_producer import write_cache

REPO = Path(__file__).resolve().parents[2]


def _data_file(shard: Path) -> Path:
    """The file to damage: the shard itself, or (zarr) its first chunk of layer 2."""
    return shard if shard.is_file() else sorted(p for p in (shard / "layer.2" / "c").rglob("*") if p.is_file())[0]


def test_clean_cache_verifies(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=4)
    report = cache.verify_report(tmp_path / "c")
    assert report.problems == [] and report.warnings == []
    assert report.shards_checked == len(cache.open(tmp_path / "c").shards("train")) + 1


def test_manifest_checksums_follow_the_documented_rule(tmp_path, backend):
    """Recompute xxh3 here, from FORMAT.md's rule, without the package's checksum module."""
    write_cache(tmp_path / "c", backend, n_train=2)
    c = cache.open(tmp_path / "c")
    for info in c.shards("train"):
        path = tmp_path / "c" / info.name
        h = xxhash.xxh3_64()
        if path.is_file():
            h.update(path.read_bytes())
        else:
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                rel = f.relative_to(path).as_posix()
                h.update(rel.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little") + f.read_bytes())
        assert h.hexdigest() == info.xxh3


def test_flipped_byte_truncation_and_missing_shard(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=5)
    infos = cache.open(tmp_path / "c").shards("train")
    flipped = _data_file(tmp_path / "c" / infos[0].name)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    flipped.write_bytes(bytes(raw))
    truncated = _data_file(tmp_path / "c" / infos[1].name)
    truncated.write_bytes(truncated.read_bytes()[:-3])
    missing = tmp_path / "c" / infos[2].name
    shutil.rmtree(missing) if missing.is_dir() else missing.unlink()
    problems = cache.verify(tmp_path / "c")
    assert len(problems) == 3
    assert f"shard {infos[0].name}: does not match its checksum" in problems[0]
    assert f"shard {infos[1].name}:" in problems[1] and "truncated" in problems[1]
    assert problems[2] == f"shard {infos[2].name}: is missing"


def test_extra_files_and_temporaries_are_warnings(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2, finish=False)
    (tmp_path / "c" / "README.txt").write_text("hi")
    (tmp_path / "c" / ".tmp-train-000009.safetensors").write_bytes(b"x")
    report = cache.verify_report(tmp_path / "c")
    assert report.problems == []
    text = "\n".join(report.warnings)
    assert "README.txt: unknown file" in text and ".tmp-train-000009" in text and "incomplete" in text


def test_cli_exit_codes_and_messages(tmp_path, backend, capsys):
    write_cache(tmp_path / "c", backend, n_train=3)
    assert main(["verify", str(tmp_path / "c")]) == 0
    assert "ok: " in capsys.readouterr().out
    shard = cache.open(tmp_path / "c").shards("heldout")[0].name
    target = _data_file(tmp_path / "c" / shard)
    target.write_bytes(target.read_bytes()[:-1] + bytes([target.read_bytes()[-1] ^ 0xFF]))
    assert main(["verify", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert f"BAD: shard {shard}: does not match its checksum" in out and "1 problem(s)" in out
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "is not a cache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_cli_info(tmp_path, backend, capsys):
    write_cache(tmp_path / "c", backend, n_train=3, n_heldout=1)
    assert main(["info", str(tmp_path / "c")]) == 0
    c = cache.open(tmp_path / "c")
    out = capsys.readouterr().out
    for needle in ("model      tiny-test", "complete   yes", "layers     [0, 2, 5]", "d_model    12",
                   "dtype      float32", f"backend    {backend}",
                   f"tokens     train {c.num_rows('train'):,}, heldout {c.num_rows('heldout'):,}",
                   f"shards     train {len(c.shards('train'))}, heldout 1", "on disk",
                   "statistics (train)", f"{c.norm_scale(5):10.5g}"):
        assert needle in out, f"{needle!r} missing from:\n{out}"


def test_python_dash_m_entry_point(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2, finish=False)
    proc = subprocess.run([sys.executable, "-m", "cache", "info", str(tmp_path / "c")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "complete   NO" in proc.stdout, proc.stderr

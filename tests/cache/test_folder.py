"""The cache package's decisions about a folder (cache/folder.py): what a writer may do there, what a
distributed harvest may do, and what removing a cache deletes. Harvest only asks these."""

from __future__ import annotations

import pytest

from cache import folder, manifest
from cache.folder import FolderRefused
from tests.cache.cache_producer import IDENTITY, LAYERS, SHARD_ROWS, D, write_cache


def _requested(**change):
    layout = dict(identity=IDENTITY, metadata={}, layers=LAYERS, d_model=D, dtype="float32", backend="safetensors",
                  shard_rows=SHARD_ROWS, zarr_compression=None)
    return manifest.new(**{**layout, **change})


def _plan(path, overwrite=False, **change):
    return folder.plan_write(folder.survey(path, _requested(**change)), overwrite=overwrite)


def test_a_writer_creates_continues_replaces_or_is_refused(tmp_path):
    assert _plan(tmp_path / "absent") == "create"
    (tmp_path / "empty").mkdir()
    assert _plan(tmp_path / "empty") == "create"
    write_cache(tmp_path / "c", "safetensors", n_train=2, finish=False)
    assert _plan(tmp_path / "c") == "continue"  # resume
    write_cache(tmp_path / "done", "safetensors", n_train=2)
    assert _plan(tmp_path / "done") == "continue"  # extend (the budget is the caller's to judge)
    with pytest.raises(FolderRefused, match=r"different settings: shard_rows \(40 in the cache, 64 requested\).*"
                                            r"--overwrite"):
        _plan(tmp_path / "done", shard_rows=64)
    assert _plan(tmp_path / "done", overwrite=True, shard_rows=64) == "replace"
    (tmp_path / "done" / "manifest.json").write_text("{not json")
    with pytest.raises(FolderRefused, match="manifest is unusable"):
        _plan(tmp_path / "done")
    assert _plan(tmp_path / "done", overwrite=True) == "replace"


def test_foreign_folders_and_unfinished_distributed_harvests_are_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(FolderRefused, match="not empty and holds no cache"):
            _plan(tmp_path / "mine", overwrite=overwrite)
    write_cache(tmp_path / "d" / "rank-0", "safetensors", n_train=1)
    with pytest.raises(FolderRefused, match="unfinished harvest by several processes"):
        _plan(tmp_path / "d")


def test_ranks_may_start_replace_or_must_refuse(tmp_path):
    def prepare(path, overwrite=False, world=2, **change):
        return folder.prepare_rank_write(folder.survey(path, _requested(**change)), overwrite=overwrite, world=world)

    assert prepare(tmp_path / "new") == "ranks"
    write_cache(tmp_path / "done", "safetensors", n_train=2)
    assert prepare(tmp_path / "done") == "complete"
    write_cache(tmp_path / "half", "safetensors", n_train=2, finish=False)
    with pytest.raises(FolderRefused, match="interrupted one-process harvest"):
        prepare(tmp_path / "half")
    with pytest.raises(FolderRefused, match="different settings"):
        prepare(tmp_path / "done", shard_rows=64)
    (tmp_path / "done" / "notes.txt").write_text("mine")
    with pytest.raises(FolderRefused, match="not empty and holds no cache"):
        prepare(tmp_path / "done", overwrite=True, shard_rows=64)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["notes.txt"]  # only the cache went
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "merge-plan.json").write_text("{}")
    assert prepare(tmp_path / "p") == "finish-merge"


def test_remove_cache_deletes_only_what_a_cache_owns(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    (tmp_path / "c" / "README").write_text("keep")
    folder.remove_cache(tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["README"]

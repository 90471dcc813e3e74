"""A harvest holds its output cache: a second harvest (OVERWRITE=1 included) and a harvest into a cache
that a training reads are refused at once, naming the holder, with nothing in the folder touched."""

from __future__ import annotations

import pytest

import tests.harvest.test_run as test_run
from harvest.__main__ import main
from harvest.model import HarvestError
from harvest.run import harvest
from tests.lock_holder import holder, kill, start_holder

corpus, models = test_run.corpus, test_run.models  # the same module-scoped fixtures
_args, _cfg, _error_lines = test_run._args, test_run._cfg, test_run._error_lines


def _cache_bytes(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_harvest_is_refused_even_with_overwrite(models, corpus, tmp_path, capsys):
    out = tmp_path / "c"
    harvest(_cfg(models("gpt2"), corpus, out, "harvest.max_tokens=100"), progress=False)
    before = _cache_bytes(out)
    with holder(out) as other:  # a harvest in progress holds its cache so
        for extra in ([], ["--overwrite"]):
            code = main(["--quiet", *extra, *_args(models("gpt2"), corpus, out), "harvest.layers=0:2"])
            (err,) = _error_lines(capsys.readouterr().err)
            assert code == 2 and f"cache {out} is in use by pid {other.pid} on " in err, err
    assert _cache_bytes(out) == before


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_a_cache_read_by_a_training_is_not_overwritten_nor_extended(models, corpus, tmp_path, backend):
    out = tmp_path / "c"
    harvest(_cfg(models("gpt2"), corpus, out, "harvest.max_tokens=100", f"harvest.backend={backend}"),
            progress=False)
    before = _cache_bytes(out)
    with holder(out, "shared") as reader:
        for extra in (["harvest.overwrite=true", "harvest.layers=0:2"], ["harvest.max_tokens=300"]):
            with pytest.raises(HarvestError, match=rf"is being read by pid {reader.pid} .*cannot be replaced"):
                harvest(_cfg(models("gpt2"), corpus, out, f"harvest.backend={backend}", *extra), progress=False)
    assert _cache_bytes(out) == before


def test_a_harvest_killed_while_holding_its_cache_is_resumed_by_the_next(models, corpus, tmp_path, capsys):
    out = tmp_path / "c"
    kill(start_holder(out))
    harvest(_cfg(models("gpt2"), corpus, out), progress=False)
    assert "took over the lock on cache" in capsys.readouterr().err

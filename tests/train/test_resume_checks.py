"""Resume against the wrong cache: the refusal names the cache, not a setting derived from it."""

import pytest

from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY, tiny_config
from train.run import TrainError, train


def test_resume_on_another_cache_of_the_same_width_names_the_cache(tmp_path):
    first = write_cache(tmp_path / "a", content="sparse", **TINY).path
    other = write_cache(tmp_path / "b", content="sparse", **{**TINY, "n_train": 1536}, seed=1).path
    train(tiny_config(first, tmp_path / "runs", steps=None, num_epochs=1, checkpoint_every=4))
    with pytest.raises(TrainError) as info:
        train(tiny_config(other, tmp_path / "runs", steps=None, num_epochs=1, checkpoint_every=4, resume=True))
    message = str(info.value)
    # The steps and dead threshold derived from the cache differ too; the cache is the cause.
    assert "the cache is not the one this run trained on" in message
    assert "config changed" not in message and "training.steps" not in message

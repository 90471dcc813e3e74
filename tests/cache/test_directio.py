"""Files written with O_DIRECT through bounce buffers hold exactly the bytes given, hashed as given; a
filesystem that refuses O_DIRECT gets the same file through the page cache."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import xxhash

from cache import directio

SIZES = [13, 0, 4096, 9000, 1, 20000, 4095]  # parts that straddle chunks, empty and unaligned ones


def _parts(seed: int = 0) -> list[memoryview]:
    rng = np.random.default_rng(seed)
    return [memoryview(rng.integers(0, 256, n, dtype=np.uint8)) for n in SIZES]


@pytest.mark.parametrize("chunk", [4096, 16384, 8 << 20])
def test_written_bytes_size_and_hash_are_those_given(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(directio, "CHUNK", chunk)
    parts = _parts()
    expected = b"".join(bytes(p) for p in parts)
    size, digest = directio.write_new_file(tmp_path / "f", parts)
    assert (tmp_path / "f").read_bytes() == expected  # no padding left behind the last byte
    assert size == len(expected) and digest == xxhash.xxh3_64(expected).hexdigest()


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_o_direct_is_used_where_the_filesystem_takes_it(tmp_path, monkeypatch):
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(directio, "_buffered", lambda *a: pytest.fail("fell back to the page cache"))
    monkeypatch.setattr(directio, "CHUNK", 8192)
    parts = _parts(1)
    directio.write_new_file(tmp_path / "f", parts)
    assert (tmp_path / "f").read_bytes() == b"".join(bytes(p) for p in parts)


def test_a_filesystem_refusing_o_direct_gets_the_page_cache(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    parts = _parts(2)
    size, digest = directio.write_new_file(tmp_path / "f", parts)
    expected = b"".join(bytes(p) for p in parts)
    assert (tmp_path / "f").read_bytes() == expected and digest == xxhash.xxh3_64(expected).hexdigest()


def test_other_errors_are_raised_not_hidden(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError) as info:
        directio.write_new_file(tmp_path / "f", _parts())
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize("failing_write", [1, 3])
def test_a_failed_write_of_any_chunk_is_raised_and_nothing_is_written_after_it(tmp_path, monkeypatch,
                                                                               failing_write):
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(fd)
        if len(calls) == failing_write:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(directio, "CHUNK", 4096)
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OSError) as info:
        directio.write_new_file(tmp_path / "f", _parts())
    assert info.value.errno == errno.ENOSPC
    assert len(calls) == failing_write  # no chunk is handed over after a failed one

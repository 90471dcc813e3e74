"""The `native` package's builds: one compile per library and machine, even when threads ask at once."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading

import pytest

import native

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def test_threads_that_need_a_library_at_once_share_one_compile(tmp_path, monkeypatch):
    log = tmp_path / "compiles"
    wrapper = tmp_path / "cc"
    real = shutil.which(native.compiler()[0])
    # counts the compiles, not the `--version` calls of the cache key
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo x >> {log};; esac\nexec {real} "$@"\n')
    os.chmod(wrapper, 0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv(native.DIR_ENV, str(tmp_path / "lib"))
    src = tmp_path / "one.c"
    src.write_text("int one(void) { return 1; }\n")

    def build(force: bool = False):
        return native.build("one", [src], [], [("-O2",)], force=force)

    def bind(path):
        lib = ctypes.CDLL(str(path))
        lib.one.restype = ctypes.c_int
        return lib

    got = []
    threads = [threading.Thread(target=lambda: got.append(native.load("test", build, bind))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [lib.one() for lib in got] == [1, 1, 1, 1]
    assert log.read_text().count("x") == 1
    assert [p.suffix for p in (tmp_path / "lib").iterdir()] == [".so"]  # no temporary left behind

"""glibc malloc thresholds: set where glibc is, and left alone where the user chose their own."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdeflow.training import allocator

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")


def run_child(code: str, env: dict[str, str] | None = None) -> str:
    """A fresh interpreter, so the thresholds of the test process are not what is read."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


IN_HEAP = (
    "import ctypes\n"
    "libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
    "p = libc.malloc(8 << 20)\n"
    "spans = [line.split()[0].split('-') for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]')]\n"
    "print(any(int(a, 16) <= p < int(b, 16) for a, b in spans))\n"
)


@glibc
def test_a_big_block_comes_from_the_heap_once_the_thresholds_are_set():
    # glibc's defaults serve a first 8 MiB block with its own mmap, unmapped again on free.
    assert run_child(IN_HEAP) == "False"
    assert run_child("import sdeflow.training.allocator as a\nprint(a.keep_freed_memory())\n" + IN_HEAP).split() == [
        "True", "True"]


@glibc
def test_a_users_malloc_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False


def test_other_platforms_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_memory() is False

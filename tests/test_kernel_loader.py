"""gpt.kernels.native.Kernel, the loader every kernel module's `available()` and `why_unavailable()`
go through: it tries once however many threads ask, honours its environment switch, keeps a failure's
one-line reason, and builds, registers and calls a real library (a tiny FFI handler compiled here)."""

import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt.kernels import native

SOURCE = Path("/nonexistent/fake.cc")  # never read: these tests replace native.load


@pytest.fixture
def loads(monkeypatch):
  """native.load replaced by a slow fake that records its calls; set `loads.error` to make it fail."""
  calls = []
  lib = object()

  def load(source, flags, targets, *, cpu_specific, libraries):
    calls.append((source, flags, targets, cpu_specific, libraries))
    time.sleep(0.05)  # long enough for every thread below to be waiting on the first try
    if loads.error:
      raise loads.error
    return lib

  monkeypatch.setattr(native, "load", load)
  loads.calls, loads.lib, loads.error = calls, lib, None
  return loads


def _ask_at_once(kernel: native.Kernel, threads: int = 8) -> list[bool]:
  barrier = threading.Barrier(threads)
  answers = []

  def ask():
    barrier.wait()
    answers.append(kernel.available())

  workers = [threading.Thread(target=ask) for _ in range(threads)]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  return answers


def test_loads_once_under_concurrency(loads):
  kernel = native.Kernel(SOURCE, ("-O2",), ["GptA", "GptB"], fallback="XLA runs", cpu_specific=False,
                         libraries=("-ldl",))
  assert kernel.why_unavailable() == ""  # not tried yet
  assert _ask_at_once(kernel) == [True] * 8
  assert loads.calls == [(SOURCE, ("-O2",), ("GptA", "GptB"), False, ("-ldl",))]
  assert kernel.available() and kernel.library() is loads.lib and kernel.why_unavailable() == ""
  assert len(loads.calls) == 1


def test_a_failure_is_tried_once_logged_once_and_kept_as_one_line(loads, caplog):
  loads.error = RuntimeError("g++ failed:\n  fake.cc:1: error")
  kernel = native.Kernel(SOURCE, (), ("GptA",), fallback="XLA runs")
  with caplog.at_level("INFO"):
    assert _ask_at_once(kernel) == [False] * 8
    assert not kernel.available()
  assert len(loads.calls) == 1
  assert kernel.why_unavailable() == "g++ failed: fake.cc:1: error"
  assert [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()] == [
      "gpt.kernels.fake unavailable, XLA runs: g++ failed:\n  fake.cc:1: error"]
  with pytest.raises(RuntimeError, match="gpt.kernels.fake is unavailable: g\\+\\+ failed"):
    kernel.library()


@pytest.mark.parametrize("error", [OSError("cannot open"), AttributeError("no GptA")])
def test_every_load_error_means_unavailable(loads, error):
  loads.error = error
  kernel = native.Kernel(SOURCE, (), ("GptA",), fallback="XLA runs")
  assert not kernel.available() and kernel.why_unavailable() == str(error)


def test_the_environment_switch(loads, monkeypatch):
  kernel = native.Kernel(SOURCE, (), ("GptA",), env="GPT_TEST_LOADER_KERNEL", fallback="XLA runs")
  monkeypatch.setenv("GPT_TEST_LOADER_KERNEL", "0")
  assert not kernel.available() and kernel.switched_off()
  assert kernel.why_unavailable() == "GPT_TEST_LOADER_KERNEL=0 turns it off"
  with pytest.raises(RuntimeError, match="GPT_TEST_LOADER_KERNEL=0 turns it off"):
    kernel.library()
  assert loads.calls == []  # switched off before anything is built
  monkeypatch.setenv("GPT_TEST_LOADER_KERNEL", "1")  # read at every call
  assert kernel.available() and kernel.why_unavailable() == "" and len(loads.calls) == 1
  monkeypatch.setenv("GPT_TEST_LOADER_KERNEL", "0")  # off again even once loaded
  assert not kernel.available()


def test_flags_given_as_a_function_are_read_when_built(loads):
  flags = {"now": ("-march=native",)}
  kernel = native.Kernel(SOURCE, lambda: flags["now"], ("GptA",), fallback="XLA runs")
  flags["now"] = ("-march=x86-64",)  # as the portable checks set their module's FLAGS
  assert kernel.available()
  assert loads.calls[0][1] == ("-march=x86-64",)


def test_setup_runs_the_load_with_what_comes_before_and_after(loads):
  seen = []

  def setup(load):
    seen.append("before")
    lib = load()
    seen.append("after")
    return lib

  kernel = native.Kernel(SOURCE, (), ("GptA",), fallback="XLA runs", setup=setup)
  assert kernel.available() and kernel.library() is loads.lib and seen == ["before", "after"]

  def missing_dependency(load):
    raise RuntimeError("libfoo was not found")

  kernel = native.Kernel(SOURCE, (), ("GptB",), fallback="XLA runs", setup=missing_dependency)
  assert not kernel.available() and kernel.why_unavailable() == "libfoo was not found"
  assert len(loads.calls) == 1  # nothing built for the second


def test_untried_tries_again_and_leaves_the_original(loads):
  loads.error = RuntimeError("no compiler")
  kernel = native.Kernel(SOURCE, (), ("GptA",), fallback="XLA runs")
  assert not kernel.available()
  loads.error = None
  fresh = kernel.untried()
  assert fresh.why_unavailable() == "" and fresh.available() and len(loads.calls) == 2
  assert not kernel.available() and kernel.why_unavailable() == "no compiler"


TWICE = r"""
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

static ffi::Error Twice(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  for (size_t i = 0; i < x.element_count(); ++i) y->typed_data()[i] = 2 * x.typed_data()[i];
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptLoaderTestTwice, Twice,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

extern "C" int GptLoaderTestAnswer() { return 42; }
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """A kernel cache of this module's own, so the tiny library builds once here and nowhere else."""
  path = tmp_path_factory.mktemp("kernel_cache")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("GPT_KERNEL_CACHE", str(path))
    yield path


def test_a_source_that_does_not_compile(cache, tmp_path, caplog):
  source = tmp_path / "broken.cc"
  source.write_text("this is not C++;\n")
  kernel = native.Kernel(source, ("-std=c++17", "-shared", "-fPIC"), ("GptBroken",), fallback="XLA runs")
  assert not kernel.available()
  why = kernel.why_unavailable()
  assert why and "\n" not in why and ("failed" in why or "no C++ compiler" in why), why
  assert not [p for p in cache.iterdir() if p.name.startswith("broken-") or p.name.endswith(".tmp")]
  assert not kernel.available() and kernel.why_unavailable() == why


def test_a_real_library_builds_registers_and_runs(cache, tmp_path):
  source = tmp_path / "loader_twice.cc"
  source.write_text(TWICE)
  flags = ("-O2", "-std=c++17", "-shared", "-fPIC", "-w")
  kernel = native.Kernel(source, flags, ("GptLoaderTestTwice",), fallback="XLA runs")
  if not kernel.available() and "no C++ compiler" in kernel.why_unavailable():
    pytest.skip(kernel.why_unavailable())
  assert kernel.available(), kernel.why_unavailable()
  assert kernel.library().GptLoaderTestAnswer() == 42  # the CDLL's other exports
  x = jnp.arange(5, dtype=jnp.float32)
  call = jax.ffi.ffi_call("GptLoaderTestTwice", jax.ShapeDtypeStruct(x.shape, jnp.float32))
  np.testing.assert_array_equal(jax.jit(call)(x), 2 * np.arange(5, dtype=np.float32))
  # A target the library does not export: one line naming it, nothing raised to the caller.
  missing = native.Kernel(source, flags, ("GptLoaderTestTwice", "GptLoaderTestMissing"),
                          fallback="XLA runs")
  assert not missing.available() and "GptLoaderTestMissing" in missing.why_unavailable()

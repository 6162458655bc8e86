"""Shared test set-up: 8 fake CPU devices, access to ../shared (real data and fixtures), and the
programs several test files run.

Tests that need ../shared take the `shared_dir` fixture: they skip with a reason when it is absent,
and fail instead when GPT_REQUIRE_SHARED=1 (as in CI), so a missing ../shared cannot pass silently.

The fast tier's time is mostly XLA compiles. A jitted function compiles once per (function object,
argument shapes), so a program that several test files run is defined once here (`forward`): the
tiny fixture's forward compiles once for the whole run instead of once per file, and no test calls
a model eagerly (which compiles the scanned blocks afresh on every call).

Across runs, JAX's persistent compilation cache keeps the compiled programs in `.jax_test_cache/`
(git-ignored) at the repository root, so an edit loop recompiles only what the edit changed; the
training subprocesses of the slow tests inherit it. GPT_TEST_COMPILE_CACHE=0 turns it off (a cold
run, as a fresh clone), any other value is the folder to use instead. pytest.ini runs the tests on
pytest-xdist workers (one per core), which share the cache through its file lock.

That lock comes with jax's LRU eviction, which lists and reads every entry's files on each write,
so a write costs time in proportion to the entries already there (0.6 s at the 4,500 entries of a
full run, measured at load 10) and a cold run's writes grow with the square of its programs.
GPT_TEST_CACHE_MIN_COMPILE_S (default 0: every program, for the edit loop's warm reruns) keeps
programs that compile faster than it out of the cache; .ci/run's cold runs set 0.3, which keeps
about one program in six.
"""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: the sharded paths run on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GPT_SHARED_DIR", REPO.parent / "shared"))


def _compile_cache_dir() -> str | None:
  """The persistent compilation cache folder for this run (see the module docstring), or None."""
  setting = os.environ.get("GPT_TEST_COMPILE_CACHE", str(REPO / ".jax_test_cache"))
  return None if setting in ("", "0") else setting


COMPILE_CACHE = _compile_cache_dir()
# By default every program, however quick to compile (the tier is hundreds of sub-second compiles;
# GPT_TEST_CACHE_MIN_COMPILE_S raises the bar, see above). The size bound turns on jax's LRU
# eviction, whose file lock also keeps concurrent workers (xdist, subprocesses) from reading an
# entry while another writes it.
CACHE_SETTINGS = {"jax_compilation_cache_dir": COMPILE_CACHE,
                  "jax_persistent_cache_min_compile_time_secs":
                      float(os.environ.get("GPT_TEST_CACHE_MIN_COMPILE_S", "0")),
                  "jax_persistent_cache_min_entry_size_bytes": -1,
                  "jax_compilation_cache_max_size": 512 << 20}
if COMPILE_CACHE:
  os.environ.update({name.upper(): str(value) for name, value in CACHE_SETTINGS.items()})

import jax  # noqa: E402
import pytest  # noqa: E402

if COMPILE_CACHE:  # the environment is for subprocesses: a plugin may have imported jax already
  for _name, _value in CACHE_SETTINGS.items():
    jax.config.update(_name, _value)


def require_shared(*parts: str) -> Path:
  """The path ../shared/<parts>; skips (or fails under GPT_REQUIRE_SHARED=1) when it is missing."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    reason = f"needs {path} (the ../shared folder beside the checkout)"
    if os.environ.get("GPT_REQUIRE_SHARED") == "1":
      pytest.fail(f"GPT_REQUIRE_SHARED=1 but {reason}")
    pytest.skip(reason)
  return path


@jax.jit
def forward(model, tokens):
  """model(tokens): the logits [B, T, V] of a plain forward pass, one program for every test file."""
  return model(tokens)


@pytest.fixture
def shared_dir() -> Path:
  """../shared, or skip/fail as described in the module docstring."""
  return require_shared()


@pytest.fixture
def openai_fixture() -> Path:
  """The tiny GPT-2 in OpenAI's TensorFlow checkpoint format."""
  return require_shared("fixtures", "openai-gpt2-tiny")


@pytest.fixture
def hf_fixture() -> Path:
  """The same tiny GPT-2 as a Hugging Face folder."""
  return require_shared("fixtures", "hf-gpt2-tiny")


@pytest.fixture
def www(openai_fixture, tmp_path) -> Path:
  """tmp/www/124M/ holding the fixture's seven OpenAI files, as OpenAI's bucket lays them out
  (what the download tests serve from a loopback server)."""
  import shutil

  from gpt import download

  root = tmp_path / "www"
  (root / "124M").mkdir(parents=True)
  for name in download.OPENAI_FILES:
    shutil.copy(openai_fixture / name, root / "124M" / name)
  return root


@pytest.fixture
def repo_dir() -> Path:
  return REPO


@pytest.fixture
def gpt_main(capsys, monkeypatch):
  """Runs `python -m gpt.main ARGS` in this process, from the repository root, as a user would
  (one-line errors, exit codes): returns (exit code, stdout, stderr). No interpreter start, no
  re-import of jax, so these checks stay in the fast tier."""
  import logging
  import warnings

  from absl import logging as absl_logging

  from gpt import main

  monkeypatch.chdir(REPO)
  handler = absl_logging.get_absl_handler()

  def run(*args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    filters, formatter = list(handler.filters), handler.python_handler.formatter
    level = logging.getLogger("absl").level
    try:
      with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_info:
        main.run(list(args))
    finally:  # the console set-up is for a process of its own: leave pytest's logging as it was
      handler.filters[:] = filters
      handler.python_handler.setFormatter(formatter)
      logging.getLogger("absl").setLevel(level)
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err

  return run

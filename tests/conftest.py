"""Shared test set-up: 8 fake CPU devices, and access to ../shared (real data and fixtures).

Tests that need ../shared take the `shared_dir` fixture: they skip with a reason when it is absent,
and fail instead when GPT_REQUIRE_SHARED=1 (as in CI), so a missing ../shared cannot pass silently.
"""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: the sharded paths run on 8 fake CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("GPT_SHARED_DIR", REPO.parent / "shared"))


def require_shared(*parts: str) -> Path:
  """The path ../shared/<parts>; skips (or fails under GPT_REQUIRE_SHARED=1) when it is missing."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    reason = f"needs {path} (the ../shared folder beside the checkout)"
    if os.environ.get("GPT_REQUIRE_SHARED") == "1":
      pytest.fail(f"GPT_REQUIRE_SHARED=1 but {reason}")
    pytest.skip(reason)
  return path


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
def repo_dir() -> Path:
  return REPO

"""Every config file parses; sizes, aliases and the command-line entry point behave."""

import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import config_flags  # noqa: F401  (same loader gpt.main uses)

from gpt.config import canonical_model_name, is_model_name
from gpt.model import GPTConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("old,new,shape", [
    ("117m", "124m", (12, 768, 12)), ("345m", "355m", (24, 1024, 16)),
    ("762m", "774m", (36, 1280, 20)), ("1542m", "1558m", (48, 1600, 25))])
def test_size_configs_and_their_new_names(old, new, shape):
  a, b = load(old), load(new)
  assert a.to_dict() == b.to_dict()
  assert (a.model.n_layer, a.model.n_embd, a.model.n_head) == shape
  assert (a.model.n_ctx, a.model.n_vocab) == (1024, 50257)
  assert canonical_model_name(a.init) == canonical_model_name(old.upper())
  GPTConfig.from_config(a.model)  # valid model section


def test_every_config_file_builds_a_valid_model_config():
  for path in sorted(CONFIGS.glob("*.py")):
    config = load(path.stem)
    assert set(config.keys()) >= {"mode", "init", "model", "data", "train", "sampling", "eval", "mesh"}
    GPTConfig.from_config(config.model)


def commented_fields() -> tuple[set[str], list[str]]:
  """(dotted paths assigned in base_config(), those without a `#` comment on the line above),
  following the section aliases (`c.model = m = ConfigDict()`) whatever their names."""
  import ast
  source = (Path(__file__).resolve().parent.parent / "gpt" / "config.py").read_text()
  lines = source.splitlines()
  func = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == "base_config")
  paths, uncommented, alias = set(), [], {"c": ""}
  for node in ast.walk(func):
    if not isinstance(node, ast.Assign):
      continue
    targets = [t for t in node.targets if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)]
    names = [t.id for t in node.targets if isinstance(t, ast.Name)]
    for target in targets:
      path = f"{alias[target.value.id]}{target.attr}"
      if "ConfigDict" in ast.unparse(node.value):
        alias.update({n: f"{path}." for n in names})
        continue
      paths.add(path)
      if not lines[node.lineno - 2].strip().startswith("#"):
        uncommented.append(path)
  return paths, uncommented


def test_every_config_field_has_a_comment():
  """The base config documents each field, in every section, on the line above it."""
  from gpt.config import base_config, config_dict
  paths, uncommented = commented_fields()
  assert uncommented == [], f"config fields without a comment: {uncommented}"
  leaves = set()
  def walk(node, prefix=""):
    for key, value in node.items():
      if isinstance(value, config_dict.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        leaves.add(f"{prefix}{key}")
  walk(base_config())
  assert leaves == paths  # every field was seen, the attention view's (`av.`) included
  assert {"attention.prompt", "attention.max_tokens", "model.n_layer", "mesh.data"} <= paths


def test_model_names_in_both_spellings():
  assert canonical_model_name("117M") == canonical_model_name("124M") == "124M"
  assert canonical_model_name("1542m") == "1558M" and canonical_model_name("gpt2-medium") == "355M"
  assert not is_model_name("300M")


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/117m.py", "--config.model.n_layer=2", "--config.mode=nope"],
     "error: unknown mode 'nope': choose one of train, sample, interactive, eval"),
    (["--config=configs/117m.py", "--config.model.n_layr=2"],
     'error: unknown config key "n_layr" (did you mean "n_layer"?) in --config.model.n_layr'),
    (["--config=configs/117m.py", "--config.modle.n_layer=2"],
     'error: unknown config key "modle" (did you mean "mode"?)'),
    (["--config=configs/117m.py", "--config.model.n_layer=two"], "error: flag --config.model.n_layer=two"),
    (["--config=configs/nope.py"], "error: cannot load the config file"),
    (["--config=configs/tiny.py", "--config.init=/no/such/dir", "--config.mode=sample"],
     "error: --config.init='/no/such/dir' is not 'scratch', a model name"),
])
def test_cli_mistakes_are_one_clear_line(gpt_main, args, expected):
  code, _, stderr = gpt_main(*args)
  assert code == 2, stderr
  assert "Traceback" not in stderr
  lines = [l for l in stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and lines[0].startswith(expected), stderr


@pytest.mark.slow
def test_the_console_script_is_the_same_entry(repo_dir):
  """`python -m gpt.main` (and the `gpt` script, gpt.main:run) reach the same one-line errors."""
  result = subprocess.run([sys.executable, "-m", "gpt.main", "--config=configs/117m.py",
                           "--config.mode=nope"], capture_output=True, text=True, cwd=repo_dir,
                          timeout=300)
  assert result.returncode == 2 and result.stderr.startswith("error: unknown mode 'nope'"), result.stderr

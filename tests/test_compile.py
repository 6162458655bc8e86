"""Compile mode (gpt.compile, gpt.chips, gpt.compile_tables): memory figures, fit verdicts, the
search, and the sweep's --check_fit.

The CPU tests compile a tiny model on the 8 fake CPU devices. The TPU tests need libtpu (the
`[tpu]` extra): they skip without it, and fail under GPT_REQUIRE_SHARED=1 (as CI runs). A TPU
compile of a real GPT-2 takes 10-60 s of CPU, so every compile is made once per module (fixtures)
and shared through one Planner's cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt import chips
from gpt import compile as aot
from gpt import sharding
from gpt.compile_tables import format_search, format_table, human_bytes
from gpt.config import base_config, size_config
from gpt.errors import GPTError
from gpt.model import GPTConfig
from gpt.train import build_programs


def tiny_config():
  c = base_config()
  c.init = "scratch"
  c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_ctx = 2, 64, 2, 64
  c.train.seq_len, c.train.batch_size = 32, 8
  c.mesh.fsdp = 2
  c.sampling.batch_size = 2
  return c


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
  """compile mode's output (stdout, compile.json) for the tiny config on the local devices."""
  import contextlib
  import io

  workdir = tmp_path_factory.mktemp("compile")
  config = tiny_config()
  # Two search steps: fsdp=8 (the most sharded) and, by bisection, fsdp=2, the configured run
  # (its compile is reused).
  config.compile.search, config.compile.search_limit = True, 2
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    aot.run(config, str(workdir))
  return out.getvalue(), json.loads((workdir / "compile.json").read_text())


def test_cpu_memory_equals_the_compiled_train_and_eval_steps(cpu_run):
  stdout, result = cpu_run
  config = tiny_config()
  cfg = GPTConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)  # the mesh train builds
  built = build_programs(config, cfg, mesh)
  batch = jax.ShapeDtypeStruct((8, 33), np.int32, sharding=built.batch_sharding)
  expected = {
      "train": built.train_step.lower(built.abstract_state, batch, {}).compile().memory_analysis(),
      "eval": built.eval_step.lower(built.abstract_state.params, batch, {}).compile()
              .memory_analysis(),
  }
  assert [r["program"] for r in result["programs"]] == ["train", "eval", "decode"]
  for row in result["programs"][:2]:
    ma, pc = expected[row["program"]], row["per_chip"]
    assert row["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert pc["arguments"] == ma.argument_size_in_bytes
    assert pc["temporaries"] == ma.temp_size_in_bytes
    assert pc["outputs"] == ma.output_size_in_bytes and pc["aliased"] == ma.alias_size_in_bytes
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
             + ma.temp_size_in_bytes + ma.generated_code_size_in_bytes)
    assert pc["total"] == total
    # The breakdown of the arguments adds up to what the compiler counts.
    assert pc["params"] + pc["opt_state"] + pc["batch"] + pc["frozen"] == ma.argument_size_in_bytes
    assert pc["frozen"] == 0  # full fine-tuning: nothing frozen
    assert f"{human_bytes(ma.temp_size_in_bytes):>12}" in stdout
    assert f"{human_bytes(total):>12}" in stdout
  train = result["programs"][0]["per_chip"]
  # fsdp=2 halves the 2-D weights; Adam holds two slots per parameter.
  assert cfg.num_params() * 4 / 2 <= train["params"] < cfg.num_params() * 4
  assert train["opt_state"] >= 2 * train["params"]
  assert "multi-host: 8 chips on 1 host(s)" in stdout


def test_cpu_decode_row_is_the_samplers_step_on_one_device(cpu_run):
  from gpt.kv_cache import KVCache
  from gpt.model import init_model
  from gpt.sample import decoding_params

  stdout, result = cpu_run
  row = result["programs"][2]
  cfg = GPTConfig.from_config(tiny_config().model)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  pc = row["per_chip"]
  # What sample mode holds on its one device: the model prepared for decoding and a full-context
  # cache for sampling.batch_size rows.
  assert pc["params"] == nbytes(decoding_params(init_model(cfg)))
  assert pc["cache"] == nbytes(KVCache.init(cfg, 2, cfg.n_ctx))
  assert row["batch_size"] == 2 and row["seq_len"] == cfg.n_ctx and row["chips"] == 1
  # The compiler's arguments are exactly those, the loop state and the int32 `until`.
  assert pc["arguments"] == pc["params"] + pc["cache"] + pc["decode_state"] + 4
  assert pc["total"] >= pc["arguments"] and row["fits"]
  assert row["tokens_per_s"] is None  # a CPU's HBM bandwidth is unknown: no estimate
  assert "decode step (sampler, one chip as sample mode uses)" in stdout
  assert "(HBM bandwidth of cpu unknown)" in stdout


def test_decode_estimate_is_the_hbm_roofline():
  cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, n_ctx=64)
  row = chips.decode_estimate(chips.TPU_CHIPS["TPU v5 lite"], cfg, batch_size=4,
                              bytes_per_step=10 ** 9 + 6 * 10 ** 8, mfu=base_config().compile.mfu)
  # 1.6 GB read per step at v5e's 819 GB/s, 4 tokens a step (the FLOPs take far less time).
  assert row["step_s"] == pytest.approx(1.6e9 / 819e9)
  assert row["tokens_per_s"] == pytest.approx(4 * 819e9 / 1.6e9)


def test_chip_of_reads_the_tpu_and_gpu_tables_or_the_override():
  class Device:  # what chip_of reads of a jax device
    def __init__(self, kind):
      self.device_kind = kind

    def memory_stats(self):
      return {"bytes_limit": 80 * chips.GIB}

  assert chips.chip_of(Device("TPU v5 lite")) == chips.TPU_CHIPS["TPU v5 lite"]
  h100 = chips.chip_of(Device("NVIDIA H100 PCIe"))
  assert (h100.peak_flops, h100.hbm, h100.hbm_bandwidth) == (756e12, 80 * chips.GIB, None)
  assert chips.chip_of(Device("NVIDIA H200")).peak_flops == 989.4e12
  assert chips.chip_of(Device("cpu")).peak_flops is None  # unknown: memory figures only
  assert chips.chip_of(Device("cpu"), peak_override=1e12).peak_flops == 1e12
  assert chips.chip_of(Device("TPU v4"), peak_override=1e12).hbm == 32 * chips.GIB


def test_cpu_lora_trains_adapters_only(cpu_run):
  """With train.lora_rank, compile mode plans what train runs: the adapters get the optimizer
  state, the base weights are a frozen argument (lora.trained_config, no workdir needed)."""
  from gpt import lora

  full = cpu_run[1]["programs"][0]["per_chip"]
  config = tiny_config()
  config.train.lora_rank, config.train.lora_targets = 4, "c_attn,mlp.c_proj"
  cfg = lora.trained_config(config.train, GPTConfig.from_config(config.model))
  assert (cfg.lora_rank, cfg.lora_targets) == (4, ("c_attn", "mlp.c_proj"))
  assert lora.trained_config(tiny_config().train, cfg.replace(lora_rank=0)).lora_rank == 0
  planner = aot.Planner(config, jax.devices(), "")
  row = planner.compile(planner.configured(), ("train",))[0]
  pc = row["per_chip"]
  assert row["lora"] == {"rank": 4, "targets": ["c_attn", "mlp.c_proj"]}
  # Adam's two slots over the adapters only (+ the step and key), a sliver of full fine-tuning's.
  assert 2 * pc["params"] <= pc["opt_state"] <= 2 * pc["params"] + 64  # + counters, the key
  assert pc["opt_state"] < full["opt_state"] / 10
  assert pc["frozen"] == full["params"]  # the whole base model rides along, not trained
  assert pc["params"] + pc["opt_state"] + pc["batch"] + pc["frozen"] == pc["arguments"]
  assert "LoRA rank 4 on c_attn,mlp.c_proj" in format_table(row)
  assert "frozen base weights" in format_table(row)


def test_cpu_search_ranks_and_reuses_the_configured_compile(cpu_run):
  stdout, result = cpu_run
  ranked = result["search"]
  assert [(r["remat"], r["mesh"]["fsdp"], r["grad_accum"]) for r in ranked] == [
      ("none", 2, 1), ("none", 8, 1)]  # all fit on CPU: equal estimates, smaller fsdp first
  assert ranked[0] == result["programs"][0]  # the same compile, not a second one
  assert "[1] remat=none fsdp=8 grad_accum=1: fits" in stdout
  assert "2 setting(s) compiled; best: --config.model.remat=none --config.mesh.fsdp=2" in stdout


def test_impossible_setting_is_one_error_line(gpt_main, tmp_path):
  code, _, stderr = gpt_main("--config=configs/tiny.py", "--config.mode=compile",
                             "--config.mesh.fsdp=2", "--config.train.batch_size=3",
                             f"--workdir={tmp_path}")
  assert code == 2, stderr[-2000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "train.batch_size=3 must be a multiple" in errors[0], stderr
  assert "Traceback" not in stderr


def test_bad_topology_names_are_one_line_errors():
  with pytest.raises(GPTError, match="expected <chip>:<chips per axis>"):
    chips.topology_devices("v5litepod-16")


def test_oom_message_figures():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (368.73G) exceeds available HBM (15.75G).")
  assert aot.parse_oom(msg) == {"needed": int(368.73 * 2 ** 30), "available": int(15.75 * 2 ** 30)}


def test_remat_recompute_flops():
  cfg = GPTConfig(n_layer=4, n_embd=64, n_head=2, n_ctx=64)
  assert chips.recompute_flops_per_token(cfg.replace(remat="none"), 32) == 0
  full = chips.recompute_flops_per_token(cfg.replace(remat="full"), 32)
  # A block forward is a third of the blocks' training FLOPs (the head is not recomputed).
  head = 6 * cfg.n_vocab * cfg.n_embd
  assert full == pytest.approx((cfg.flops_per_token(32) - head) / 3, rel=1e-3)


class FakePlanner:
  """Stands in for aot.Planner in the search: a memory rule instead of compiles."""

  def __init__(self, fits, limit=12):
    self.config = base_config()
    self.config.train.batch_size = 32
    self.config.compile.search_limit = limit
    self.devices, self.topology = list(range(16)), "fake:4x4"
    self.base_cfg = GPTConfig(n_layer=2, n_embd=64, n_head=2, n_ctx=64)
    self.rule, self.compiled = fits, []

  def compile(self, s, programs):
    if (s.remat, s.fsdp, s.grad_accum) not in self.compiled:
      self.compiled.append((s.remat, s.fsdp, s.grad_accum))
    return [{"fits": self.rule(s.remat, s.fsdp, s.grad_accum)}]


def test_search_prunes_what_cannot_fit_or_rank_higher():
  # dots fits only with fsdp=16 and grad_accum=2; full fits from fsdp=4.
  planner = FakePlanner(lambda r, f, a: (r == "dots" and f == 16 and a == 2) or (r == "full" and f >= 4))
  tried = [(s.remat, s.fsdp, s.grad_accum) for s in aot.search_settings(planner, 12)]
  # none: the most sharded setting fails at both grad_accums, so no smaller fsdp is tried. dots:
  # fits at (16, 2), bisection over fsdp 1, 2, 4, 8, 16 tries 4 and 8. full recomputes more than
  # dots, so it cannot rank above it and is not tried.
  assert tried == [("none", 16, 1), ("none", 16, 2), ("dots", 16, 1), ("dots", 16, 2),
                   ("dots", 4, 2), ("dots", 8, 2)]
  assert tried == planner.compiled
  assert len(list(aot.search_settings(FakePlanner(lambda *_: False, limit=3), 3))) == 3


# --- TPU topologies (libtpu) ---


def require_libtpu() -> None:
  if not chips.libtpu_available():
    reason = "needs libtpu to compile for TPU topologies (pip install -e '.[tpu]')"
    if os.environ.get("GPT_REQUIRE_SHARED") == "1":
      pytest.fail(f"GPT_REQUIRE_SHARED=1 but {reason}")
    pytest.skip(reason)


def xl_config():
  c = size_config("1558M")
  c.model.dtype = "bfloat16"
  c.train.batch_size, c.train.seq_len = 32, 1024
  c.mesh.fsdp = 16
  c.mesh.topology = "v5e:4x4"
  # The search tries remat none, then full: none at fsdp=16 (the most sharded) is one fast
  # out-of-memory compile per grad_accum, and full at fsdp=16 is the fixture's compile (cached).
  c.compile.search_remat = "full,none"
  c.compile.search_limit = 3
  # Least compiler effort: half the CPU of a default compile; the verdicts here are far from the
  # line (8.6 of 16 GiB; 369 GiB), so the few % it adds to the figures cannot change them.
  c.compile.fast = True
  return c


@pytest.fixture(scope="module")
def xl_planner():
  require_libtpu()
  config = xl_config()
  return aot.Planner(config, chips.devices_for("v5e:4x4"), "v5e:4x4")


@pytest.mark.slow
def test_124m_fits_v5e_2x2():
  require_libtpu()
  c = size_config("124M")
  c.model.dtype = "bfloat16"
  c.train.batch_size, c.train.seq_len = 16, 1024
  c.mesh.topology = "v5e:2x2"
  c.compile.fast = True
  c.sampling.batch_size = 4
  planner = aot.Planner(c, chips.devices_for("v5e:2x2"), "v5e:2x2")
  row, decode = planner.compile(planner.configured(), ("train", "decode"))
  assert row["fits"] and row["chip"] == "v5e" and row["chips"] == 4 and row["hosts"] == 1
  assert 0 < row["per_chip"]["total"] <= 16 * 2 ** 30
  assert row["per_chip"]["temporaries"] > row["per_chip"]["params"]
  assert row["tokens_per_s"] > 0
  # Sampling 4 rows on one v5e: bf16 weights (2 bytes each) and a 1024-slot cache, read per token.
  pc = decode["per_chip"]
  assert decode["fits"] and decode["chips"] == 1
  assert pc["params"] == pytest.approx(2 * row["model"]["params"], rel=0.01)
  assert pc["cache"] == 2 * 12 * 4 * 1024 * 768 * 2 + 4 * 1024 + 4 + 16
  assert decode["tokens_per_s"] == pytest.approx(4 * 819e9 / (pc["params"] + pc["cache"]))


@pytest.mark.slow
def test_fast_compile_is_redone_at_full_effort_near_the_limit():
  require_libtpu()
  c = tiny_config()
  c.mesh.topology, c.mesh.fsdp = "v5e:2x2", 2

  def plan(margin):
    c.compile.exact_margin = margin
    planner = aot.Planner(c, chips.devices_for("v5e:2x2"), "v5e:2x2")
    return planner.compile(planner.configured(), ("train",))[0]

  fast = plan(0.05)  # a tiny model is nowhere near 16 GiB: the fast figures stand
  assert fast["effort"] == "fast" and fast["fits"]
  exact = plan(1.0)  # everything counts as near the limit: compiled again, exactly
  assert exact["effort"].startswith("full") and exact["fits"]
  # Least effort never plans for less memory than full effort does.
  assert fast["per_chip"]["total"] >= exact["per_chip"]["total"] > 0
  assert "XLA effort: full" in format_table(exact)
  c.compile.fast = False
  assert plan(1.0)["effort"] == "full"


@pytest.mark.slow
def test_1558m_v5e_4x4_fits_with_full_remat_not_without(xl_planner):
  full = xl_planner.compile(aot.Setting("full", 16, 1), ("train",))[0]
  assert full["fits"] and full["per_chip"]["total"] <= 16 * 2 ** 30
  assert full["multihost"] == {"hosts": 4, "chips_per_host": 4, "rows_per_host": 8,
                               "rows_per_chip_micro": 2}
  none = xl_planner.compile(aot.Setting("none", 16, 1), ("train",))[0]
  assert not none["fits"] and "RESOURCE_EXHAUSTED" in none["error"]
  assert none["oom"]["needed"] > none["oom"]["available"] > 15 * 2 ** 30
  assert "DOES NOT FIT" in format_table(none)
  # Recomputing costs FLOPs: the estimate ranks remat=none faster.
  assert none["tokens_per_s"] > full["tokens_per_s"]


@pytest.mark.slow
def test_search_finds_a_fitting_setting_for_1558m_on_v5e_4x4(xl_planner):
  ranked = xl_planner.search()
  table = format_search(ranked)
  tried = [(r["remat"], r["mesh"]["fsdp"], r["grad_accum"]) for r in ranked]
  # none: grad_accum 1 and 2 (2 rows per chip) do not fit at fsdp=16, so no smaller fsdp is
  # tried; full fits at fsdp=16 and is ranked first.
  assert tried == [("full", 16, 1), ("none", 16, 1), ("none", 16, 2)], table
  assert ranked[0]["fits"] and not any(r["fits"] for r in ranked[1:]), table
  assert "| 1 | full | 16 | 1 | 1 |" in table


@pytest.mark.slow
def test_sweep_check_fit_reports_points_that_do_not_fit_before_launching(tmp_path):
  require_libtpu()
  repo = Path(__file__).resolve().parent.parent
  marker = tmp_path / "launched"
  sweep_file = tmp_path / "fit.py"
  launch = f"open({str(marker)!r}, 'w')"  # what a launched point would do
  # A 1-layer model: batch 8 fits a v5e:2x2; 32768 rows (8192 per chip) need ~50 GiB of logits.
  sweep_file.write_text(
      f"base = {str(repo / 'configs/tiny.py')!r}\n"
      "fixed = {'model.n_layer': 1, 'model.n_embd': 64, 'model.n_head': 2, 'model.n_ctx': 64,\n"
      "         'train.seq_len': 32}\n"
      "product = {'train.batch_size': [8, 32768]}\n"
      f"program = [{sys.executable!r}, '-c', {launch!r}]\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "experiments/sweep.py", str(sweep_file), f"--workdir={tmp_path / 'runs'}",
       "--check_fit=v5e:2x2"], capture_output=True, text=True, env=env, cwd=repo, timeout=900)
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "batch_size=8: fits on v5e:2x2" in proc.stdout
  assert "batch_size=32768: DOES NOT FIT on v5e:2x2" in proc.stdout
  assert "1 point(s) do not fit on v5e:2x2: batch_size=32768; nothing was launched" in proc.stdout
  assert not marker.exists()


@pytest.fixture
def own_compile_cache(tmp_path):
  """JAX's persistent compilation cache in an empty folder of this test, every program cached;
  the session's cache settings come back afterwards."""
  from jax.experimental.compilation_cache import compilation_cache

  names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  folder = tmp_path / "cache"
  compilation_cache.reset_cache()
  for name, value in zip(names, (True, str(folder), 0, -1)):
    jax.config.update(name, value)
  try:
    yield folder
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.mark.slow  # compiles for a TPU slice (libtpu), as every test of this section
def test_tpu_programs_stay_out_of_the_persistent_cache_and_cpu_programs_go_in(own_compile_cache):
  """A slice's program could be written to the cache but not read back (the compile-only client
  cannot deserialize it): the next run warned "Error reading persistent compilation cache entry"
  and compiled again. Compile mode compiles for a slice with the cache off, so the folder gets no
  TPU program (nothing to fail to read), while a CPU program compiled afterwards is still cached."""
  import re

  require_libtpu()
  c = tiny_config()
  c.mesh.topology, c.model.n_layer = "v5e:2x2", 1
  planner = aot.Planner(c, chips.devices_for("v5e:2x2"), "v5e:2x2")
  assert planner.compile(planner.configured(), ("train",))[0]["fits"]
  train_step = re.match(r"module @(\S+)", planner.lower(planner.configured(), ["train"])[0].lowered.as_text())
  entries = lambda: [p.name for p in own_compile_cache.iterdir()] if own_compile_cache.exists() else []
  assert not [name for name in entries() if name.startswith(f"{train_step[1]}-")]
  jax.jit(lambda a: a * 3 + 1)(np.arange(5.0)).block_until_ready()  # a new program, so compiled
  assert [name for name in entries() if name.startswith("jit__lambda-")]

"""The benchmark scripts' measuring pieces, on tiny shapes: they run, and time what they claim to.

The scripts themselves print tables for BENCHMARKS.md (minutes each); these tests only keep them
from breaking silently when the package changes under them.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

from conftest import REPO
from gpt.kernels import gemm
from gpt.model import GPTConfig

TINY = GPTConfig(n_vocab=256, n_ctx=32, n_embd=32, n_head=2, n_layer=2)


def load_script(name: str):
  """experiments/<name>.py as a module (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench_decode():
  return load_script("bench_decode")


@pytest.fixture(scope="module")
def runners():
  return load_script("decode_runners")


@pytest.mark.slow  # runs the decode benchmark's runners
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_runners_sample_the_asked_shape(runners, dtype):
  cfg = TINY.replace(dtype=dtype, param_dtype=dtype)
  ours = runners.Ours(cfg, batch=2, new=5)
  tokens = ours()
  assert tokens.shape == (2, 5) and ((0 <= tokens) & (tokens < cfg.n_vocab)).all()
  assert not np.array_equal(tokens, ours())  # a new seed each call: the timed runs differ
  assert runners.Ours(cfg, 2, 5, model_decode=True)().shape == (2, 5)
  hidden = runners.MatmulsOnly(cfg, 2, 5)()
  assert hidden.shape == (2, 1, cfg.n_embd) and np.isfinite(hidden.astype(np.float32)).all()
  small_pages = runners.on_small_pages(runners.Ours(cfg, 2, 5))
  assert small_pages().shape == (2, 5)
  assert "GPT_GEMV_HUGEPAGES" not in os.environ  # the --small_pages runner restores the default
  os.environ["GPT_GEMV_HUGEPAGES"] = "1"  # ... and a value the caller set
  try:
    small_pages()
    assert os.environ["GPT_GEMV_HUGEPAGES"] == "1"
  finally:
    del os.environ["GPT_GEMV_HUGEPAGES"]


def test_ab_columns_run_ours_under_their_variable_at_every_call(runners, monkeypatch):
  """bench_decode.py --ab NAME=VALUE wraps "ours" in UnderEnv(..., every_call=True): the variable
  is set while each call runs (gemv.cc reads its switches per call) and restored after."""
  monkeypatch.delenv("GPT_GEMV_BF16DOT", raising=False)
  seen = []
  column = runners.UnderEnv(lambda: seen.append(os.environ.get("GPT_GEMV_BF16DOT")), "GPT_GEMV_BF16DOT",
                            "0", every_call=True)
  column(), column()
  assert seen == ["0", "0"] and "GPT_GEMV_BF16DOT" not in os.environ


def test_roofline_counts_weights_and_cache(bench_decode):
  one = bench_decode.roofline(TINY, batch=1, new=1, bandwidth=1e9)
  weights = (TINY.num_params() - TINY.n_ctx * TINY.n_embd) * 4
  cache = 2 * TINY.n_layer * TINY.n_embd * 4
  assert one == pytest.approx(1e9 / (weights + cache))
  # bfloat16 halves every byte; more rows share the weights.
  assert bench_decode.roofline(TINY.replace(dtype="bfloat16"), 1, 1, 1e9) == pytest.approx(2 * one)
  assert bench_decode.roofline(TINY, 8, 1, 1e9) > 7 * one


@pytest.mark.slow
def test_train_runners_compile_and_step():
  bench_train = load_script("bench_train")
  shape = (1, 32, 2, 16, 2)  # layers, width, heads, context, batch (GPT-2's vocabulary)
  (wall, cpu), run = bench_train.jax_runner(shape, "float32", scan=True)
  assert wall > 0 and cpu > 0
  run()
  # The compiled step, which --profile names instructions from: its products are XLA's dots, or
  # MKL's GEMM where model.matmul=auto takes it (gpt.kernels.gemm).
  hlo = run.hlo_text()
  assert "dot" in hlo or gemm.TARGET in hlo
  torch = pytest.importorskip("torch", reason="the PyTorch reference needs the [hf] extra")
  _, reference = load_script("torch_peers").torch_runner(torch, shape, "float32")
  reference()


def test_hlo_summaries_name_shapes_and_jax_ops():
  from experiments.xla_trace import hlo_summaries

  text = ('  %dot.7 = f32[8,50257]{1,0} dot(%a, %b), lhs_contracting_dims={1}, '
          'metadata={op_name="jit(step)/dot_general" stack_frame_id=3}\n'
          '  ROOT %tuple.1 = (f32[8]) tuple(%dot.7)\n')
  got = hlo_summaries(text)
  assert got["dot.7"].startswith("f32[8,50257]{1,0} dot(%a, %b)")
  assert got["dot.7"].endswith("<- jit(step)/dot_general")
  assert got["tuple.1"].startswith("(f32[8]) tuple(%dot.7)")


@pytest.mark.slow
def test_train_benchmark_profile_as_a_user_runs_it(repo_dir):
  """`bench_train.py --profile` in a fresh process (XLA's op events need a flag at start-up)."""
  import os
  import subprocess

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "experiments/bench_train.py", "--shapes=tiny",
                        "--impls=jax-f32-scan", "--rounds=1", "--steps=1", "--profile"],
                       cwd=repo_dir, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| tiny (4 x 256, 128, 8; 98 MFLOP/token) | jax-f32-scan |" in out.stdout
  profile = out.stdout.split("## profile: tiny, jax-f32-scan")[1]
  assert "By op kind:" in profile and "Largest instructions:" in profile
  # Instructions are named by the jax op they came from: the LM head's matmul (gpt.heads.logits) is
  # MKL's custom call where model.matmul=auto takes it (gpt.kernels.gemm), XLA's einsum elsewhere.
  from gpt.kernels import gemm
  assert ("/ffi_call" if gemm.available() else "...d,vd->...v") in profile


@pytest.mark.slow  # runs the decode benchmark's CTranslate2 runner (PyTorch's converter)
def test_ctranslate2_runner_samples_the_asked_shape(runners):
  pytest.importorskip("ctranslate2", reason="the CTranslate2 column needs the [bench] extra")
  pytest.importorskip("transformers", reason="CTranslate2's converter reads a Hugging Face export")
  cfg = TINY.replace(n_vocab=50257)  # the converter checks the vocabulary against the tokenizer's
  ct2 = runners.CTranslate2(cfg, batch=2, new=5, compute_type="float32")
  tokens = ct2()
  assert tokens.shape == (2, 5) and ((0 <= tokens) & (tokens < cfg.n_vocab)).all()
  assert not np.array_equal(tokens, ct2())  # it samples (top-k 40), as the other columns do


def test_bench_train_gemms_lists_every_matmul_of_a_step_with_consistent_shapes():
  """bench_train_gemms.py's classes: each einsum's operands fit, and their FLOPs add up to the
  step's matmul FLOPs (6 x the matmul weights x tokens: forward, dx and dW of each)."""
  import jax
  import jax.numpy as jnp

  gemms = load_script("bench_train_gemms")
  shape = gemms.SHAPES["tiny"]
  L, D, H, T, B = shape
  total = 0.0
  for name, count, spec, a, b in gemms.gemm_classes(shape):
    jax.eval_shape(lambda x, y, s=spec: jnp.einsum(s, x, y), jnp.zeros(a), jnp.zeros(b))
    total += count * gemms.flops(spec, a, b)
  weights = L * 12 * D * D + gemms.VOCAB * D
  assert total == 6 * weights * B * T


def test_nanogpt_style_peer_computes_transformers_loss_on_the_same_weights():
  """bench_train's second torch peer is the same GPT-2 as its transformers row: equal loss (and
  gradients of a block matrix) on transformers' weights and one batch."""
  torch = pytest.importorskip("torch", reason="the PyTorch peers need the [hf] extra")
  transformers = pytest.importorskip("transformers", reason="the reference needs the [hf] extra")
  nanogpt_torch = load_script("nanogpt_torch")
  L, D, H, T, V = 2, 32, 2, 16, 97
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=V, n_positions=T, n_embd=D, n_layer=L, n_head=H, resid_pdrop=0.0,
      embd_pdrop=0.0, attn_pdrop=0.0)).train()
  ours = nanogpt_torch.GPT(V, T, D, H, L).train()
  assert ours.lm_head.weight is ours.wte.weight  # tied, as GPT-2
  assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
  before = nanogpt_torch.GPT(V, T, D, H, L)(torch.zeros(1, T, dtype=torch.long))[0]
  nanogpt_torch.copy_from_transformers(ours, hf)
  batch = torch.from_numpy(np.random.default_rng(0).integers(0, V, (3, T + 1)))
  x, y = batch[:, :-1], batch[:, 1:]
  logits, loss = ours(x, y)
  hf_logits = hf(x).logits
  hf_loss = torch.nn.functional.cross_entropy(hf_logits.reshape(-1, V), y.reshape(-1))
  assert not torch.allclose(before, ours(torch.zeros(1, T, dtype=torch.long))[0])  # weights moved
  torch.testing.assert_close(logits, hf_logits, rtol=1e-5, atol=1e-5)
  torch.testing.assert_close(loss, hf_loss, rtol=1e-6, atol=1e-6)
  loss.backward()
  hf_loss.backward()
  torch.testing.assert_close(ours.h[1].mlp.c_fc.weight.grad,  # nn.Linear [out, in]; Conv1D [in, out]
                             hf.transformer.h[1].mlp.c_fc.weight.grad.t(), rtol=1e-4, atol=1e-6)
  torch.testing.assert_close(ours.wte.weight.grad, hf.transformer.wte.weight.grad,
                             rtol=1e-4, atol=1e-6)


def test_nanogpt_style_optimizer_decays_matrices_only_and_is_torchs_default_on_cpu():
  torch = pytest.importorskip("torch", reason="the PyTorch peers need the [hf] extra")
  nanogpt_torch = load_script("nanogpt_torch")
  model = nanogpt_torch.GPT(50, 8, 16, 2, 1)
  opt = nanogpt_torch.configure_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
  decayed, plain = opt.param_groups
  assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
  assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
  assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
  assert not decayed["fused"]  # nanoGPT fuses on CUDA only
  assert nanogpt_torch.configure_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1,
                                           fused=True).param_groups[0]["fused"]


@pytest.mark.slow  # compiles a torch model with inductor (g++)
def test_torch_peer_rows_step_and_pick_the_best_round_by_round():
  torch = pytest.importorskip("torch", reason="the PyTorch peers need the [hf] extra")
  peers = load_script("torch_peers")
  shape = (1, 32, 2, 16, 2)
  for variant in ((), ("fusedadam",), ("compile",)):
    compile_s, run = peers.nanogpt_runner(torch, shape, "float32", variant=variant)
    assert (compile_s is None) == ("compile" not in variant)
    run()
  compile_s, run = peers.torch_runner(torch, shape, "float32", variant=("compile", "foreachadam"))
  assert compile_s[0] > 0
  run()
  # A row by its name, as bench_train and a child process build it.
  compile_s, run = peers.make_row(torch, "nanogpt-bf16-fusedadam", shape, peers.train_section(""))
  assert compile_s is None
  run()
  # A row in a process of its own (allocator settings read at start) steps when called.
  child = peers.ChildRow("nanogpt-f32-proc", "tiny", {"OMP_WAIT_POLICY": "PASSIVE"})
  assert child.compile_s is None
  child()
  child.close()
  assert child.proc.returncode == 0
  with pytest.raises(FileNotFoundError, match="not installed"):
    peers.ChildRow("torch-f32-jemalloc", "tiny", {"LD_PRELOAD": "/nonexistent/libjemalloc.so.2"})
  times = {"jax-f32-scan": [1.0, 1.0], "torch-f32": [3.0, 2.0], "nanogpt-f32-compile": [2.5, 2.2],
           "torch-bf16": [0.5, 0.5]}
  assert peers.best_torch(times) == [(2.5, "nanogpt-f32-compile"), (2.0, "torch-f32")]
  assert peers.best_torch(times, ("f32", "bf16")) == [(0.5, "torch-bf16"), (0.5, "torch-bf16")]
  assert peers.best_torch({"jax-f32-scan": [1.0]}) == []


@pytest.mark.slow  # spawns a torch process
def test_torch_faults_measures_a_fresh_process_per_setting():
  pytest.importorskip("torch", reason="the PyTorch peers need the [hf] extra")
  torch_faults = load_script("torch_faults")
  res = torch_faults.run_setting("keepfreed", "nanogpt-f32", "tiny", steps=1)
  assert "error" not in res, res
  assert res["wall"] > 0 and res["user"] > 0 and res["minflt"] >= 0 and res["maxrss_mb"] > 0
  broken = torch_faults.run_setting("default", "nanogpt-f64", "tiny", steps=1)  # no such dtype
  assert "KeyError" in broken["error"]

"""The base experiment config and the GPT-2 size table.

Every file in `configs/` starts from `base_config()` and changes only what differs. Fields are
grouped in the sections the rest of the package reads: `model`, `data`, `train`, `sampling`,
`eval`, `mesh`, `compile`, plus the top-level `mode`, `init` and `seed`.
"""

from __future__ import annotations

import os
import re

import ml_collections
from ml_collections import config_dict

# OpenAI renamed its checkpoints in 2019 (the parameter count now includes the embeddings); both
# spellings are accepted everywhere a model size or name is given.
CANONICAL_NAMES = {"117M": "124M", "345M": "355M", "762M": "774M", "1542M": "1558M"}

# (n_layer, n_embd, n_head) per released size, keyed by OpenAI's current names.
MODEL_SIZES = {
    "124M": (12, 768, 12),
    "355M": (24, 1024, 16),
    "774M": (36, 1280, 20),
    "1558M": (48, 1600, 25),
}

# Hugging Face hub repos holding the same weights.
HF_REPOS = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


def canonical_model_name(name: str) -> str:
  """Maps '117M'/'124m'/'gpt2-medium'/... to OpenAI's current folder name ('124M', '355M', ...).

  Raises KeyError for names that are not one of the four released sizes.
  """
  upper = name.strip().upper()
  if upper in CANONICAL_NAMES:
    return CANONICAL_NAMES[upper]
  if upper in MODEL_SIZES:
    return upper
  for size, repo in HF_REPOS.items():
    if name.strip().lower() == repo:
      return size
  known = ", ".join(sorted(set(CANONICAL_NAMES) | set(MODEL_SIZES) | set(HF_REPOS.values())))
  raise KeyError(f"unknown GPT-2 model name {name!r}; known: {known}")


def is_model_name(name: str) -> bool:
  """True if `name` names a released GPT-2 size in any accepted spelling."""
  try:
    canonical_model_name(name)
    return True
  except KeyError:
    return False


def base_config() -> ml_collections.ConfigDict:
  """Shared defaults: GPT-2 small fine-tuned on the Kant corpus, as in the book chapter."""
  c = ml_collections.ConfigDict()

  # What to run: train | sample | interactive | eval (gpt.main dispatches on it).
  c.mode = "train"
  # Where weights come from: 'scratch', a model name (117M/124M/...), an OpenAI or HF folder, or a workdir.
  c.init = "124M"
  # Folder that downloaded OpenAI/HF model folders are kept in.
  c.models_dir = "models"
  # Base URL of OpenAI's model storage (the downloader appends '<model>/<file>').
  c.download_url = "https://openaipublic.blob.core.windows.net/gpt-2/models"
  # Global random seed (parameter init, data order, dropout).
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  # Vocabulary size (GPT-2 byte-level BPE: 50000 merges + 256 bytes + <|endoftext|>).
  m.n_vocab = 50257
  # Context length: the number of learned position embeddings.
  m.n_ctx = 1024
  # Residual stream width.
  m.n_embd = 768
  # Number of attention heads (n_embd must divide by it).
  m.n_head = 12
  # Number of transformer blocks.
  m.n_layer = 12
  # Dropout after the embedding sum (GPT-2 pretraining used 0.1; nshepperd's fine-tuning used 0).
  m.embd_pdrop = 0.0
  # Dropout on the attention probabilities.
  m.attn_pdrop = 0.0
  # Dropout on each residual branch output.
  m.resid_pdrop = 0.0
  # Compute dtype for matmuls and activations: float32 | bfloat16 | float16.
  m.dtype = "float32"
  # Storage dtype of the parameters (master weights).
  m.param_dtype = "float32"
  # Run the blocks under lax.scan (fast compiles) instead of unrolling them (faster steps on CPU).
  m.scan_layers = True
  # Rematerialisation per block: none | full | dots (save matmul outputs) | dots_no_batch.
  m.remat = "none"
  # Attention kernel (not the `attention` view section): auto (the fastest that runs: kernel for
  # training on one CPU device where it builds, cudnn on a GPU in bfloat16/float16, else blocked) |
  # blocked (causal query blocks over key prefixes with a hand-written backward,
  # gpt.attention.blocked_attention) | kernel (gpt.kernels.attention: fused causal FlashAttention-2
  # forward and backward for CPU float32; masked or bfloat16 calls run blocked; an error where it
  # cannot run) | xla (jax.nn.dot_product_attention's XLA version) | cudnn (fused, GPU, bf16/f16).
  # Decoding over the KV cache always spells it out.
  m.attention_impl = "auto"
  # The training loss through the tied output layer: logits (the whole float32 [B, T, V] logits,
  # then optax's cross-entropy, differentiated by JAX) | fused (gpt.output_loss: logits, softmax
  # cross-entropy and both gradients in one custom-VJP pass, same numbers; with MKL's matmuls one
  # threaded C++ pass over the logits, XLA's version elsewhere) | auto (fused where model.matmul
  # resolves to mkl, logits elsewhere; the default: with session 6's AVX-512 pass it measured
  # 1.10-1.20x the whole step at the 30M shape and within noise at the chapter's, quiet;
  # BENCHMARKS.md "The lead's quiet retake, session 6").
  m.output_loss = "auto"
  # The training step's float32 matmuls (dense layers and the tied head, forward and backward):
  # auto (Intel MKL's sgemm through gpt.kernels.gemm when training on one CPU device and MKL is
  # installed, `pip install 'gpt[mkl]'`; XLA's einsum otherwise and in sample/eval) | xla | mkl.
  m.matmul = "auto"
  # The dense layers' and tied head's products: auto (in model.dtype) | bfloat16 (inputs rounded to
  # bfloat16, float32 accumulation, forward and backward; activations, parameters and the other
  # kernels stay in model.dtype: with model.dtype=float32 this is torch's bf16 autocast). Pays on a
  # CPU with AVX512-BF16 (BENCHMARKS.md "train-bf16, session 9"); elsewhere XLA emulates it.
  m.matmul_dtype = "auto"
  # Weight-only quantization for inference (sample, interactive, eval, the harness model): none |
  # int8 (int8 matrices with per-output-channel scales, float activations; gpt.quantize). Applied
  # when the model is loaded; training refuses it.
  m.quantize = "none"
  # With int8 weights, decoding (sample, interactive) also quantizes each activation row to int8
  # (per-row scale, as CTranslate2 does) and multiplies in integers on AVX-512 VNNI: faster, a little
  # less exact (BENCHMARKS.md, decode). Only where the gemv kernels lay decoding out (a CPU); the eval
  # scorer's many-row products and GPU/TPU decoding stay float.
  m.int8_activations = False
  # With int8 weights and float activations, decoding at 2+ rows quantizes each activation row to
  # int16 (per-row scale, 16 bits: results within half an int16 step of the float product) and
  # multiplies with AVX-512 VNNI's vpdpwssd: faster at batch 8 (BENCHMARKS.md, gemv-b8). Only where
  # gpt.kernels.gemv runs with VNNI; elsewhere the float loop. int8_activations takes precedence.
  m.int16_activations = False

  c.data = d = ml_collections.ConfigDict()
  # Training text: a file, a directory, a glob, an encoded .npz/.bin token file, or a URL.
  d.path = "https://www.gutenberg.org/cache/epub/4280/pg4280.txt"
  # Validation text or token file; empty means split `val_fraction` off the training data.
  d.val_path = ""
  # Fraction of the training tokens held out for validation when `val_path` is empty.
  d.val_fraction = 0.05
  # Text encoding of the input files.
  d.encoding = "utf-8"
  # What to do with undecodable bytes: strict (error naming file and offset) | replace.
  d.errors = "strict"
  # Concatenate files (joined by <|endoftext|>) into chunks of at least this many characters.
  d.combine = 50_000
  # Folder for downloaded corpora and encoded token files.
  d.cache_dir = "data_cache"
  # Split of a `tfds:<name>` dataset used for training.
  d.tfds_split = "train"
  # Split of a `tfds:<name>` dataset used for validation ('' = split `val_fraction` off training).
  d.tfds_val_split = ""
  # Text field of the TFDS records.
  d.tfds_field = "text"
  # TFDS data_dir holding prepared datasets ('' = TFDS's default ~/tensorflow_datasets).
  d.tfds_data_dir = ""

  c.train = t = ml_collections.ConfigDict()
  # Total optimizer steps (a resumed run continues up to this number).
  t.steps = 1000
  # Global batch size in sequences per optimizer step (summed over devices and micro-batches).
  t.batch_size = 1
  # Sequence length of training windows (<= model.n_ctx).
  t.seq_len = 1024
  # Micro-batches accumulated per optimizer step (nshepperd's --accumulate_gradients).
  t.grad_accum = 1
  # Optimizer: adam | adamw | sgd.
  t.optimizer = "adam"
  # Peak learning rate (the chapter fine-tunes at 2e-5).
  t.learning_rate = 2e-5
  # Schedule: constant | cosine (linear warmup, then cosine decay to min_lr_ratio * lr).
  t.schedule = "constant"
  # Linear warmup steps.
  t.warmup_steps = 0
  # Final learning rate as a fraction of the peak (cosine schedule).
  t.min_lr_ratio = 0.1
  # AdamW weight decay (masked off biases, LayerNorms and embeddings).
  t.weight_decay = 0.0
  # Adam beta1.
  t.b1 = 0.9
  # Adam beta2.
  t.b2 = 0.999
  # Adam epsilon.
  t.eps = 1e-8
  # Adam/AdamW's update: auto (one pass per parameter array by gpt.kernels.adam where the step runs
  # on one CPU device, optax's elsewhere; the same numbers and state) | kernel | optax.
  t.adam_impl = "auto"
  # SGD momentum (0 = plain gradient descent, as nshepperd's --optimizer=sgd).
  t.momentum = 0.0
  # Clip gradients to this global norm (0 = off).
  t.grad_clip = 1.0
  # Train only the transformer blocks, freezing embeddings and ln_f (nshepperd's option).
  t.only_train_transformer_layers = False
  # Low-rank adapters (LoRA) of this rank in the `lora_targets` layers, base weights frozen (0 = off:
  # full fine-tuning). The workdir then stores only the adapters plus a reference to config.init.
  t.lora_rank = 0
  # LoRA scale numerator: the adapters' output is multiplied by lora_alpha / lora_rank.
  t.lora_alpha = 16.0
  # Comma-separated layers that get adapters: any of c_attn, attn.c_proj, c_fc, mlp.c_proj.
  t.lora_targets = "c_attn"
  # Dropout on the adapters' input (training only).
  t.lora_dropout = 0.0
  # Replace input tokens with random ones at this rate (nshepperd's --noise).
  t.noise = 0.0
  # Checkpoint to start from in the workdir: latest | fresh | a checkpoint path.
  t.restore_from = "latest"
  # Log a line (and TensorBoard scalars) every this many steps.
  t.log_every = 10
  # Validation loss every this many steps (0 = off).
  t.val_every = 100
  # Number of validation batches in each validation pass.
  t.val_batches = 8
  # Write samples to workdir/samples every this many steps (0 = off).
  t.sample_every = 100
  # Tokens per sample written during training.
  t.sample_length = 128
  # Samples written at each sampling step.
  t.sample_num = 1
  # Save a checkpoint every this many steps (a final one is always saved).
  t.save_every = 1000
  # Number of checkpoints to keep.
  t.keep = 2
  # Peak FLOP/s of one device for MFU (0 = measure a matmul at start-up).
  t.peak_flops = 0.0

  c.sampling = s = ml_collections.ConfigDict()
  # Softmax temperature (0 = greedy).
  s.temperature = 1.0
  # Keep only the k most likely tokens (0 = off; the original scripts default to 40).
  s.top_k = 40
  # Nucleus sampling: keep the smallest set whose probability reaches p (1.0 = off).
  s.top_p = 1.0
  # Sampling seed (same seed, same text).
  s.seed = 0
  # Number of samples per prompt (0 = keep sampling until Ctrl-C in sample mode).
  s.nsamples = 1
  # Samples generated in parallel (nsamples must be a multiple of it).
  s.batch_size = 1
  # New tokens per sample (0 = up to the context length).
  s.length = 0
  # Prompt for conditional samples without the REPL ('' = unconditional / interactive).
  s.prompt = ""
  # File holding the prompt (overrides `prompt`).
  s.prompt_file = ""
  # Stop a sample at <|endoftext|>: auto (on for prompts, off for unconditional) | true | false.
  s.stop_at_eot = "auto"
  # Cut prompts that do not fit from the left instead of failing.
  s.truncate_prompt = False
  # Also write the samples to this file ('' = stdout only).
  s.output_file = ""

  c.eval = e = ml_collections.ConfigDict()
  # Comma-separated task names (see `gpt.evals`).
  e.tasks = "lambada"
  # Comma-separated shot counts; every task runs at each.
  e.shots = "0"
  # Score at most this many examples per task (0 = all; negative is refused).
  e.limit = 0
  # Examples scored per forward pass.
  e.batch_size = 8
  # Seed for drawing demonstrations.
  e.seed = 1234
  # Folder holding the task data files; missing ones are downloaded into it on first use
  # ($GPT_EVAL_DATA moves the default; ../shared/data in this repository's environment).
  e.data_dir = os.environ.get("GPT_EVAL_DATA") or "data_cache/eval"
  # Base URL of a mirror laid out like data_dir, fetched from instead of the original hosts.
  e.mirror = ""
  # Where task data comes from: files (data_dir, fetched when missing) | tfds (TensorFlow
  # Datasets, for the tasks it carries; the others still read files).
  e.source = "files"
  # TFDS data_dir holding prepared datasets for eval.source=tfds ('' = TFDS's default).
  e.tfds_data_dir = ""
  # Separator between demonstrations.
  e.example_separator = "\n\n"
  # Separator between a question and its answer.
  e.target_delimiter = " "
  # Sliding-window stride for perplexity tasks (0 = n_ctx // 2).
  e.stride = 0
  # Also write per-example results as jsonl.
  e.write_examples = False
  # ARC: also report GPT-3's unconditional normalisation, log P(c|ctx) - log P(c|"Answer:").
  e.unconditional_norm = True
  # Text file scored by the 'text' perplexity task.
  e.text_path = ""
  # Padded row lengths (each one a compile) per task and shot count; more means less padding.
  e.max_buckets = 8

  c.mesh = mh = ml_collections.ConfigDict()
  # Devices on the data-parallel axis (-1 = all devices left over by the other axes).
  mh.data = -1
  # Devices on the fully-sharded data-parallel axis (parameters and optimizer state split).
  mh.fsdp = 1
  # Devices on the tensor-parallel axis (heads and MLP width split).
  mh.tensor = 1
  # Multi-host: call jax.distributed.initialize() (coordinator from the environment or below).
  mh.distributed = False
  # Multi-host coordinator address host:port ('' = auto-detect on TPU/Slurm).
  mh.coordinator_address = ""
  # Number of processes in a multi-host run (0 = auto-detect).
  mh.num_processes = 0
  # This process's index in a multi-host run (-1 = auto-detect).
  mh.process_id = -1
  # Compile mode: the TPU slice to plan for, e.g. v5e:4x4, v4:2x2x4 ('' = the local devices).
  mh.topology = ""

  c.compile = cp = ml_collections.ConfigDict()
  # Assumed model FLOPs utilisation for compile mode's step-time estimate (fraction of bf16 peak).
  cp.mfu = 0.5
  # Compile mode: try a grid of remat / fsdp / grad_accum settings and rank the ones that fit.
  cp.search = False
  # Most compiles the search may run (each takes seconds to minutes on a CPU).
  cp.search_limit = 12
  # Remat policies the search tries (comma-separated; tried from least recomputation up).
  cp.search_remat = "none,dots,full"
  # Programs compile mode compiles (comma-separated): train, eval, decode (the sampler's step).
  cp.programs = "train,eval,decode"
  # On a TPU slice, compile first with XLA's least optimisation effort: about 2x less CPU for a
  # train step, figures slightly pessimistic (1558M on v5e:4x4: 2.7% more temporaries).
  cp.fast = True
  # A fast compile whose total is this close to the chip's HBM (fraction, either side) is compiled
  # again at full effort, so that a verdict near the limit is the exact one.
  cp.exact_margin = 0.05

  c.attention = av = ml_collections.ConfigDict()
  # Text whose attention is shown (`--config.mode=attention`).
  av.prompt = "The critique of pure reason asks what we can know without experience."
  # File holding the prompt (overrides `prompt`).
  av.prompt_file = ""
  # Put <|endoftext|> in front of the prompt, as GPT-2 saw documents in training.
  av.prepend_eot = False
  # Longest prompt in tokens (the page embeds L x H x T x T weights).
  av.max_tokens = 64
  # Comma-separated layers drawn in the PNG heatmap grid ('' = all; the HTML page has all).
  av.png_layers = ""
  return c


def size_config(name: str) -> ml_collections.ConfigDict:
  """The base config with the model shape (and init weights) of a released GPT-2 size; the size
  configs in configs/ start from it, so MODEL_SIZES is the one place a size's shape is written."""
  size = canonical_model_name(name)
  c = base_config()
  c.model.n_layer, c.model.n_embd, c.model.n_head = MODEL_SIZES[size]
  c.init = size
  return c


__all__ = [
    "base_config", "size_config", "canonical_model_name", "is_model_name", "MODEL_SIZES",
    "HF_REPOS", "config_dict", "unknown_key_message",
]


def unknown_key_message(error: Exception, argv: list[str]) -> str:
  """One line naming the --config.* override that ml_collections could not find, and only it."""
  text = str(error).replace("\\", "")
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  lookup = re.search(r"Attempting to lookup: ([\w.]+)", text)
  if hint:
    bad, what = hint.group(2), f'unknown config key "{hint.group(2)}" (did you mean "{hint.group(1)}"?)'
  elif lookup:
    bad = lookup.group(1)
    what = f'unknown config key "{bad}" ({bad.rsplit(".", 1)[0]} is a value, not a section)'
  else:
    bad = (str(error.args[0]) if isinstance(error, KeyError) and error.args else text).strip("'\" ")
    what = f'unknown config key "{bad}"'
  keys = [a.split("=")[0].removeprefix("--config.") for a in argv[1:] if a.startswith("--config.")]
  culprits = [k for k in keys if k == bad or bad in k.split(".")]
  where = f" in {' '.join('--config.' + k for k in culprits)}" if culprits else ""
  return f"{what}{where}; see the config file for valid keys"

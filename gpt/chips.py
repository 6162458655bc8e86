"""Accelerator chips: what one holds and how fast it can go, and the estimates drawn from that.

Why apart from compiling (gpt.compile): the compiler says how many bytes a program needs; whether
that fits, and how long a step should take, depends on the chip, whose figures are published, not
compiled. This module keeps those figures in one table (TPU HBM, dense bf16 peak and HBM bandwidth
per chip; published GPU peaks) and the arithmetic on them: the FLOPs remat adds to a step, a step
time at an assumed model FLOPs utilisation, and the HBM roofline of a decode step. It also finds
the devices to compile for: a TPU slice described by libtpu without any TPU, or the local ones.

Step times are estimates, not measurements: the model's FLOPs (GPTConfig.flops_per_token; XLA's
cost analysis counts a `scan` body once, so it undercounts the layers) plus what remat recomputes,
at the chip's published bf16 peak times an assumed utilisation (`compile.mfu`). They rank
settings; they do not model communication.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import jax

from gpt.errors import GPTError
from gpt.model import GPTConfig

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """What the estimates need to know about one accelerator chip."""

  name: str
  hbm: int | None  # bytes of HBM per chip (None: unknown, e.g. host RAM)
  peak_flops: float | None  # dense bf16 FLOP/s per chip (None: unknown)
  hbm_bandwidth: float | None = None  # bytes/s between HBM and the chip (None: unknown)


# Per-chip HBM and dense bf16 peak, keyed by jax's device_kind, from Google Cloud's TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e, read 2025):
#   v4   275 TFLOP/s bf16, 32 GiB HBM2,  1200 GB/s      v5e  197 TFLOP/s bf16, 16 GiB HBM2,  819 GB/s
#   v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s      v6e  918 TFLOP/s bf16, 32 GiB HBM, 1640 GB/s
# (The compiler keeps a little HBM for itself: it reports 15.75G available on a v5e.)
TPU_CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1200e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1640e9),
    "TPU v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9),
}
# Dense bf16 peak FLOP/s of GPUs by device kind (NVIDIA data sheets: H100 SXM 989.4 TF, H100 PCIe
# 756 TF, H200 989.4 TF, A100 312 TF, L4 121 TF). Matched by substring of jax's device_kind, first
# wins (so "H100 PCIe" before "H100").
GPU_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12),
                 ("L4", 121e12))
TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:4x4, v4:2x2x4, v5p:2x2x2, v6e:4x4"


def libtpu_available() -> bool:
  """True when libtpu (the `[tpu]` extra) is installed, so TPU topologies can be compiled for."""
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """The compile-only devices of TPU slice `name` (e.g. 'v5e:4x4'): no TPU or network needed."""
  if not TOPOLOGY_RE.match(name):
    raise GPTError(f"mesh.topology={name!r}: expected <chip>:<chips per axis>, e.g. {TOPOLOGY_EXAMPLES}")
  if not libtpu_available():
    raise GPTError(f"mesh.topology={name} needs libtpu to compile for TPUs: pip install 'gpt[tpu]' "
                   f"(or jax[tpu] matching the installed jax {jax.__version__})")
  # Off a TPU VM, libtpu asks a metadata server for the accelerator type and worker hostnames and
  # prints notices when there is none, and takes /tmp/libtpu_lockfile, meant for processes that
  # share a real TPU (any jax process on the machine may hold it). A compile needs none of that.
  for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  # v4 chips run as one device of two cores ("megacore"), as jax.devices() shows on a v4 VM.
  kwargs = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError/ValueError for bad shapes
    raise GPTError(f"mesh.topology={name}: {str(e).splitlines()[0]} (examples: "
                   f"{TOPOLOGY_EXAMPLES})") from None


def devices_for(topology: str) -> list:
  """The devices to compile for: the TPU slice named `topology`, or the local ones when empty."""
  if not topology:
    return jax.devices()
  if "JAX_PLATFORMS" not in os.environ:
    # The host only traces and lowers: keep jax from opening a local TPU another run may be using.
    jax.config.update("jax_platforms", "cpu")
  return topology_devices(topology)


def gpu_peak_flops(device_kind: str) -> float | None:
  """The published dense bf16 FLOP/s of a GPU of `device_kind`, or None when it is not listed."""
  return next((peak for name, peak in GPU_PEAK_BF16 if name in device_kind), None)


def device_memory(device: Any) -> int | None:
  """Bytes XLA may use on `device`, or None where it does not say (CPU)."""
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # noqa: BLE001 - CPU devices and compile-only ones have no memory stats
    return None


def chip_of(device: Any, peak_override: float = 0.0) -> Chip:
  """The Chip of `device`: the TPU table, or what a local GPU/CPU reports about itself (with a
  listed GPU's published peak); `peak_override` (train.peak_flops), when set, replaces the peak."""
  if device.device_kind in TPU_CHIPS:
    chip = TPU_CHIPS[device.device_kind]
    return dataclasses.replace(chip, peak_flops=peak_override or chip.peak_flops)
  peak = peak_override or gpu_peak_flops(device.device_kind)
  return Chip(device.device_kind, device_memory(device), peak or None, None)


def recompute_flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
  """FLOPs per token that remat adds to a training step (beyond GPTConfig.flops_per_token).

  full recomputes every block's forward (2 per weight + 4 T D per layer of attention); dots saves
  every matmul output, so only cheap elementwise work is redone (counted as 0); dots_no_batch
  saves the weight matmuls but redoes the attention ones (batched: 4 T D per layer).
  """
  attention = 4 * cfg.n_layer * seq_len * cfg.n_embd
  blocks = 2 * (cfg.num_params() - cfg.n_vocab * cfg.n_embd - cfg.n_ctx * cfg.n_embd)
  return {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention),
          "full": float(blocks + attention)}[cfg.remat]


def step_estimate(chip: Chip, cfg: GPTConfig, *, train: bool, batch_size: int, seq_len: int,
                  chips: int, mfu: float) -> dict:
  """The estimated time of one train step (`train`) or eval step (forward only) of `batch_size`
  rows of `seq_len` tokens over `chips` chips at `mfu` of the chip's peak: {mfu, peak_flops,
  flops_per_step, step_s, tokens_per_s}, the last two None when the peak is unknown."""
  tokens = batch_size * seq_len
  per_token = cfg.flops_per_token(seq_len)
  if train:
    per_token += recompute_flops_per_token(cfg, seq_len)
  else:
    per_token /= 3  # forward only
  out = {"mfu": mfu, "peak_flops": chip.peak_flops, "flops_per_step": per_token * tokens,
         "step_s": None, "tokens_per_s": None}
  if chip.peak_flops and mfu > 0:
    out["step_s"] = per_token * tokens / (chips * chip.peak_flops * mfu)
    out["tokens_per_s"] = tokens / out["step_s"]
  return out


def decode_estimate(chip: Chip, cfg: GPTConfig, *, batch_size: int, bytes_per_step: int,
                    mfu: float) -> dict:
  """A roofline bound on decoding speed on one chip: every step (one token per row) reads
  `bytes_per_step` (all the weights and the whole fixed-size cache: attention runs over every
  slot, masked) from HBM and does 2 FLOPs per weight per row; the step takes the longer of the
  two at the chip's HBM bandwidth and bf16 peak x `mfu`. Sampling and cache writes are ignored,
  so it is an upper bound on tokens/s; step_s and tokens_per_s are None when the chip's
  bandwidth or peak is unknown (local devices)."""
  flops = 2 * cfg.num_params() * batch_size
  out = {"mfu": mfu, "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
         "bytes_per_step": bytes_per_step, "flops_per_step": flops, "step_s": None,
         "tokens_per_s": None}
  if chip.hbm_bandwidth and chip.peak_flops:
    out["step_s"] = max(bytes_per_step / chip.hbm_bandwidth, flops / (chip.peak_flops * mfu))
    out["tokens_per_s"] = batch_size / out["step_s"]
  return out

"""Adam / AdamW's update of one float32 parameter array in one pass: adam.cc behind JAX's FFI.

Why: optax's chain (clip, scale_by_adam, add_decayed_weights, scale_by_learning_rate,
apply_updates) is compiled by XLA:CPU into fusions that cross every parameter-sized array about 11
times per step; one pass reading p, g, m, v and writing p, m, v in place is the minimum (7). The
numbers are optax's as XLA:CPU compiles them: the same float32 operations, the same reciprocal of
the bias corrections and the same fused multiply-adds (adam.cc's comment), and a run may switch
between this kernel and optax at any checkpoint (gpt.optim keeps optax's state tree).

`update(p, g, m, v, scalars, ...)` is the FFI call; its outputs alias p, m and v, so inside the
training step (state donated) XLA updates the state's buffers where they are. gpt.optim uses it for
`train.adam_impl` "kernel", and for "auto" where it runs (`resolve`: one CPU device, the library
built); elsewhere (GPU/TPU, a mesh of several devices: the custom call has no sharding rule) the
step keeps optax's update. The library is compiled from adam.cc at first use (-march=native:
AVX-512 where the CPU has it) and cached (gpt.kernels.native); PORTABLE selects a build without
-march (the same loop in SSE2), for the tests and same-run comparisons.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt.errors import GPTError
from gpt.kernels import native

IMPLS = ("auto", "kernel", "optax")
SOURCE = Path(__file__).with_name("adam.cc")
# -ffp-contract=off: fused multiply-adds only where adam.cc writes them (where XLA's code has them).
# -fno-math-errno: sqrt without an errno path, which would keep the loop scalar.
_COMMON = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-ffp-contract=off", "-fno-math-errno")
FLAGS = (*_COMMON, "-march=native", "-mprefer-vector-width=512")
PORTABLE_FLAGS = (*_COMMON, "-DGPT_ADAM_PORTABLE")
TARGET, PORTABLE_TARGET = "GptAdamF32", "GptAdamF32Portable"
# True: `update` calls the portable build (no -march=native) instead of the native one.
PORTABLE = False
# Set False to keep optax's update where "auto" would take the kernel (experiments/bench_train.py's
# `optaxadam` variant); read by `resolve`.
USE_KERNEL = True
KERNEL = native.Kernel(SOURCE, FLAGS, (TARGET,), env="GPT_ADAM_KERNEL",
                       fallback="the optimizer stays optax's")
PORTABLE_KERNEL = native.Kernel(SOURCE, PORTABLE_FLAGS, (PORTABLE_TARGET,), cpu_specific=False,
                                env="GPT_ADAM_KERNEL", fallback="the optimizer stays optax's")


def available(portable: bool | None = None) -> bool:
  """True when the kernel library (`portable` build or not; default PORTABLE) is built and
  registered with XLA, building it now if needed. GPT_ADAM_KERNEL=0 turns it off."""
  portable = PORTABLE if portable is None else portable
  return (PORTABLE_KERNEL if portable else KERNEL).available()


def why_unavailable() -> str:
  """Why the kernel is not available ("" when it is, or before `available()` was asked)."""
  return (PORTABLE_KERNEL if PORTABLE else KERNEL).why_unavailable()


def resolve(choice: str, devices) -> str:
  """What `train.adam_impl=choice` means for a step on `devices` (a mesh's devices): "kernel" or
  "optax". "auto" is "kernel" on one CPU device where the library loads; an explicit "kernel"
  where it cannot run is a GPTError saying why."""
  if choice not in IMPLS:
    raise GPTError(f"train.adam_impl={choice!r}; choose one of {', '.join(IMPLS)}")
  if choice == "optax":
    return "optax"
  if choice == "auto" and not USE_KERNEL:
    return "optax"
  why = native.cannot_run_on(devices, available, why_unavailable)
  if why is None:
    return "kernel"
  if choice == "kernel":
    raise GPTError(f"train.adam_impl=kernel cannot be used: {why}; use train.adam_impl=auto or optax")
  return "optax"


def update(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, scalars: jax.Array, *,
           b1: float, b2: float, eps: float, weight_decay: float) -> tuple[jax.Array, ...]:
  """(p', m', v'): one Adam step of float32 arrays of one shape, in place (outputs aliased to p,
  m, v). `scalars` is float32[4]: [clip scale, 1 / (1 - b1^count), 1 / (1 - b2^count),
  -learning rate];
  `weight_decay` (0: none) is AdamW's, for a leaf in the decay mask. Call only where
  `available()`."""
  out = jax.ShapeDtypeStruct(p.shape, jnp.float32)
  call = jax.ffi.ffi_call(PORTABLE_TARGET if PORTABLE else TARGET, (out, out, out),
                          vmap_method="sequential", input_output_aliases={0: 0, 2: 1, 3: 2})
  # optax writes (1 - b) * g with a Python float 1 - b rounded once to float32: the same here.
  return call(p, g, m, v, scalars.astype(jnp.float32), b1=np.float32(b1), b2=np.float32(b2),
              c1=np.float32(1 - b1), c2=np.float32(1 - b2), eps=np.float32(eps),
              wd=np.float32(weight_decay), decay=int(weight_decay != 0))

"""The training loss through the tied output layer, fused (`model.output_loss=fused`; the default
is "logits"): cross-entropy of h wte^T with its gradient made in the same pass.

Why: at the chapter's shape (117M, ctx 1024, batch 1) the output layer is the largest single
piece of the step: three [1024 x 768 x 50257] matmuls (79 GFLOP each) around float32 logits of
206 MB. Differentiated by JAX, the loss walks those logits several times (log-softmax forward,
softmax again in the backward, a one-hot scatter). Here one custom VJP does, per chunk of rows
(one chunk by default, see ROWS): the logits, their row max and exp-sum, the loss,
dlogits = softmax - onehot and both gradient matmuls; the backward pass only scales the saved
gradients by the incoming cotangent (a scalar loss: usually 1). Measured with
experiments/bench_train.py's `-fusedloss` / `-logitsloss` variants (BENCHMARKS.md "Training
speed routes"): not faster than the logits path in the same-run comparisons on a loaded 2-core
Xeon (slower at the chapter's shape; at 30m once ahead, once behind), so not the default until
a quiet run decides.

Where the train step's matmuls run on MKL (a resolved `model.matmul=mkl`, gpt.kernels.gemm: one CPU
device, float32), the same VJP runs as `_mkl_loss`: the logits by MKL's sgemm, then ONE threaded
C++ pass over them (gemm.softmax_xent: per 200 KB row its max, exp-sum, loss term, and
(softmax - onehot) / N written over the logits in place), then dh and d(wte) by sgemm. XLA's
fusions of the same loss read and write the [rows, 50257] float32 logits about four times (the
30m step's profile: the exp fusion alone 4.6% of op time, the reductions and the gradient's
multiply another 3.2%); the pass reads and writes them once. In session 5 its exp was MKL's vsExp
over the row (a trip through memory) and alone it took ~1.3x XLA's time beyond the logits' copy;
since session 6 the exp is AVX-512 in registers, fused with the sum (simd_exp.h), and alone the
pass takes 0.2-0.4x XLA's time beyond the copy (BENCHMARKS.md "train-head6, session 6", with
the whole-step numbers that decide `auto`). Elsewhere (GPU/TPU, meshes, bf16, no MKL) the XLA
version below runs.

The numbers are the same function as `optax.softmax_cross_entropy_with_integer_labels` of the
float32 logits (tests/test_output_loss.py compares values and gradients); only the order of the
float32 sums differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gpt import matmul as matmul_lib
from gpt.kernels import gemm

# Rows per chunk. Smaller chunks would bound the logits' memory, but XLA:CPU's GEMM repacks the
# whole [50257, D] wte for every chunk: at 256 rows the chapter step's output layer took ~3x as
# long as unchunked (BENCHMARKS.md "Training speed routes"), so by default one chunk up to this size.
ROWS = 16384
# True: the bf16 route with the C++ pass (model.matmul_dtype=bfloat16 where model.matmul resolves
# to "mkl") runs as `_bf16_head`: the pass writes the bf16 dlogits and their row-major transpose
# itself (gemm.softmax_xent_bf16), so neither backward product waits on an XLA convert or a
# transposing gather of [rows, 50257]. False (the default): bf16_matmul around `_xent` (session
# 9's route). Opt-in (bench_train's `-bf16head`): in the same-run A/Bs of a shared machine the
# step ran 0.75-1.05x (30m) and 0.85-1.36x (chapter) session 9's route (BENCHMARKS.md
# "train-head, session 10"): no reliable gain; the head's time is its three dots.
BF16_HEAD = False
# How the bf16 head makes dh = dlogits wte [rows, D] (train-head, session 10, route 2; see
# experiments/bench_head.py): "dl_wte", dlogits [rows, V] . wte [V, D] as is; "wte_t", dlogits .
# (a row-major [D, V] copy of wte, made per step) contracting both last axes: 0.90-0.96x, kept
# for comparisons. (dh^T = that copy . dlogits^T, transposed back, fails at run time: XLA folds
# the transpose into the dot's output layout, which its bf16 DotThunk rejects.)
DH_ROUTE = "dl_wte"
# True: the bf16 head's dh and d(wte) products run one after the other. Independent, XLA:CPU ran
# the two at once on its one thread pool (the 30m step's trace: both ~2x their time alone); in
# sequence the step ran 1.06x (30m, 0.99-1.12x per round), 0.97x (chapter, 0.68-1.85x) and in a
# later run 0.98x (30m, 0.82-1.02x) the concurrent products' (BENCHMARKS.md "train-head, session
# 10"): undecided on a shared machine. False: at once (bench_train's `-headpar`).
SEQUENTIAL = True


def tied_cross_entropy(hidden: jax.Array, wte: jax.Array, targets: jax.Array,
                       rows: int = ROWS, impl: str = "xla", bf16: bool = False) -> jax.Array:
  """Mean next-token cross-entropy of logits hidden @ wte^T (float32 accumulation) at `targets`.

  hidden [..., D] (the final states after ln_f, in the compute dtype); wte [V, D] (cast to
  hidden's dtype); targets [...] int. Differentiable in hidden and wte (the gradient is made in
  the forward pass, so call it under jax.grad, or for its value alone, which then skips it).
  `impl`: a resolved `model.matmul`; "mkl" runs the MKL route (`_mkl_loss`) for float32 operands
  where the kernel is available (`rows` does not apply: one pass per row), XLA's otherwise.
  `bf16` (model.matmul_dtype=bfloat16), or bfloat16 operands (gpt.matmul.BF16_VJP): the three
  products bf16 x bf16 -> f32 by gpt.matmul.bf16_matmul around `_xent` (the C++ pass with "mkl").
  """
  D = hidden.shape[-1]
  if bf16 or (matmul_lib.BF16_VJP and hidden.dtype == jnp.bfloat16):
    if BF16_HEAD and impl == "mkl" and gemm.available():
      return _bf16_head(hidden.reshape(-1, D), wte, targets.reshape(-1))
    logits = matmul_lib.bf16_matmul(hidden.reshape(-1, D), wte, transpose_w=True)
    return _xent(logits, targets.reshape(-1), impl == "mkl" and gemm.available())
  if (impl == "mkl" and hidden.dtype == jnp.float32 and wte.dtype == jnp.float32
      and gemm.available()):
    return _mkl_loss(hidden.reshape(-1, D), wte, targets.reshape(-1))
  return _loss(hidden.reshape(-1, D), wte.astype(hidden.dtype), targets.reshape(-1), rows)


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
  return [(a, min(a + rows, n)) for a in range(0, n, max(rows, 1))]


def _softmax_xent(logits, targets, N):
  """XLA's pass over float32 logits [M, V] at targets [M]: the summed cross-entropy of the rows and
  d(mean loss over N rows)/d(logits) = (softmax - onehot) / N, float32."""
  m = logits.max(-1, keepdims=True)
  e = jnp.exp(logits - m)
  s = e.sum(-1, keepdims=True)
  picked = jnp.take_along_axis(logits, targets[:, None], -1)
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == targets[:, None]
  return jnp.sum(jnp.log(s) + m - picked), (e / s - onehot) * (1.0 / N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss(h, wte, targets, rows):
  total = 0.0
  for a, b in _chunks(h.shape[0], rows):
    logits = jnp.einsum("md,vd->mv", h[a:b], wte, preferred_element_type=jnp.float32)
    m = logits.max(-1, keepdims=True)
    lse = jnp.log(jnp.exp(logits - m).sum(-1)) + m[:, 0]
    picked = jnp.take_along_axis(logits, targets[a:b, None], -1)[:, 0]
    total = total + jnp.sum(lse - picked)
  return total / h.shape[0]


def _loss_forward(h, wte, targets, rows):
  N = h.shape[0]
  total, dh, dwte = 0.0, [], None
  for a, b in _chunks(N, rows):
    hc, tc = h[a:b], targets[a:b]
    logits = jnp.einsum("md,vd->mv", hc, wte, preferred_element_type=jnp.float32)
    chunk_loss, dlogits = _softmax_xent(logits, tc, N)
    total = total + chunk_loss
    dlogits = dlogits.astype(h.dtype)  # in the operands' dtype for the matmuls
    dh.append(jnp.einsum("mv,vd->md", dlogits, wte, preferred_element_type=jnp.float32))
    dw = jnp.einsum("mv,md->vd", dlogits, hc, preferred_element_type=jnp.float32)
    dwte = dw if dwte is None else dwte + dw
  dh = dh[0] if len(dh) == 1 else jnp.concatenate(dh)
  return total / N, (dh.astype(h.dtype), dwte.astype(wte.dtype), targets)


def _loss_backward(rows, res, g):
  dh, dwte, targets = res
  del rows
  # Integer targets get the symbolic zero cotangent (float0).
  return ((g * dh).astype(dh.dtype), (g * dwte).astype(dwte.dtype),
          np.zeros(targets.shape, jax.dtypes.float0))


_loss.defvjp(_loss_forward, _loss_backward)


def _mkl_forward(h, wte, targets):
  N = h.shape[0]
  logits = gemm.gemm(h, wte, transpose_b=True)
  dlogits, row_loss = gemm.softmax_xent(logits, targets, 1.0 / N)
  dh = gemm.gemm(dlogits, wte)
  dwte = gemm.gemm(dlogits, h, transpose_a=True)
  return jnp.sum(row_loss) / N, (dh, dwte, targets)


@jax.custom_vjp
def _mkl_loss(h, wte, targets):
  # The value alone (no gradient asked): the logits and the one pass; XLA drops the unused
  # gradient products.
  N = h.shape[0]
  _, row_loss = gemm.softmax_xent(gemm.gemm(h, wte, transpose_b=True), targets, 1.0 / N)
  return jnp.sum(row_loss) / N


def _mkl_backward(res, g):
  return _loss_backward(None, res, g)


_mkl_loss.defvjp(_mkl_forward, _mkl_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _xent(logits, targets, kernel):
  """Mean softmax cross-entropy of float32 logits [N, V] at targets [N]; its gradient is made in
  the forward pass (gemm.softmax_xent's one C++ pass with `kernel`, XLA's fusions without), for
  the bf16 route, whose products are gpt.matmul.bf16_matmul's."""
  return _xent_forward(logits, targets, kernel)[0]


def _xent_forward(logits, targets, kernel):
  N = logits.shape[0]
  if kernel:
    dlogits, row_loss = gemm.softmax_xent(logits, targets, 1.0 / N)
    return jnp.sum(row_loss) / N, (dlogits, targets)
  total, dlogits = _softmax_xent(logits, targets, N)
  return total / N, (dlogits, targets)


def _xent_backward(kernel, res, g):
  del kernel
  dlogits, targets = res
  return g * dlogits, np.zeros(targets.shape, jax.dtypes.float0)


_xent.defvjp(_xent_forward, _xent_backward)


def _bf16_dots(h, wte, targets):
  """(mean loss, dh, d(wte)) of the bf16 head: the three products bf16 x bf16 -> f32, each with
  a left operand contracting its last axis, the one layout XLA:CPU runs as its fast bf16 dot."""
  N = h.shape[0]
  hb, wb = h.astype(jnp.bfloat16), wte.astype(jnp.bfloat16)
  logits = matmul_lib.bf16_dot(hb, wb, (1, 1))
  dl, dl_t, row_loss = gemm.softmax_xent_bf16(logits, targets, 1.0 / N)
  dh = _bf16_dh(dl, wb)
  if SEQUENTIAL:
    # d(wte)'s operand made to depend on dh (a zero from it: XLA:CPU drops optimization barriers
    # before it schedules), so that the two products run one after the other, not at once. A NaN
    # or inf in dh[0, 0] (a diverged step, whose loss is NaN already) makes d(wte) NaN too.
    hb = hb + (dh[0, 0] * 0.0).astype(hb.dtype)
  dwte = matmul_lib.bf16_dot(dl_t, hb, (1, 0))  # [V, N] . [N, D]
  return jnp.sum(row_loss) / N, dh, dwte


def _bf16_dh(dl, wb):
  """dh = dl wb [N, D] from the bf16 dlogits [N, V] and wte [V, D], in DH_ROUTE's orientation."""
  if DH_ROUTE == "wte_t":
    return matmul_lib.bf16_dot(dl, matmul_lib.row_major_t(wb), (1, 1))  # [N, V] . [D, V]
  return matmul_lib.bf16_dot(dl, wb, (1, 0))  # [N, V] . [V, D]


@jax.custom_vjp
def _bf16_head(h, wte, targets):
  """Mean cross-entropy of h wte^T (bf16 products, float32 logits and loss) at targets, for
  model.matmul_dtype=bfloat16 with the C++ pass: the gradient is made in the forward pass, as
  `_mkl_loss`'s. The value alone needs only the logits and softmax_xent's float32 pass."""
  N = h.shape[0]
  logits = matmul_lib.bf16_dot(h.astype(jnp.bfloat16), wte.astype(jnp.bfloat16), (1, 1))
  _, row_loss = gemm.softmax_xent(logits, targets, 1.0 / N)
  return jnp.sum(row_loss) / N


def _bf16_head_forward(h, wte, targets):
  loss, dh, dwte = _bf16_dots(h, wte, targets)
  return loss, (dh.astype(h.dtype), dwte.astype(wte.dtype), targets)


def _bf16_head_backward(res, g):
  return _loss_backward(None, res, g)


_bf16_head.defvjp(_bf16_head_forward, _bf16_head_backward)

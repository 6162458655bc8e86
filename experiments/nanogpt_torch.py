"""A GPT-2 in PyTorch written the way nanoGPT's model.py writes it: the second torch peer.

bench_train's first torch peer is transformers' GPT2LMHeadModel in eager mode. Researchers who
train GPT-2 in PyTorch often start from nanoGPT (github.com/karpathy/nanoGPT) instead, and its
structure is faster on a CPU: one fused `F.scaled_dot_product_attention(is_causal=True)` per layer
(no materialised mask, no separate softmax), plain nn.Linear layers (transformers' Conv1D does an
addmm on a view), and `torch.compile` in its train.py by default. A benchmark that claims to beat
"torch" should beat that too, so this module rebuilds it (our own code, same structure):

- the same architecture as GPT-2 (and as gpt.model): learned positions, pre-LayerNorm blocks with
  bias=True everywhere, a tied LM head, no dropout (nanoGPT's `dropout=0.0`, `bias=True`);
- nanoGPT's initialisation (normal 0.02, residual projections 0.02/sqrt(2 * layers));
- GELU with the tanh approximation, GPT-2's own function (nanoGPT's nn.GELU() is the exact erf
  form; the tanh form keeps the loss equal to transformers' and ours on the same weights: tested);
- the vocabulary the benchmark gives (GPT-2's 50257, not nanoGPT's 50304 padding), so every row
  does the same work;
- nanoGPT's `configure_optimizers`: AdamW with weight decay on the >= 2-D tensors only; `fused=True`
  only on CUDA, so on a CPU torch picks its default, which there is the per-tensor for-loop
  (torch.optim's foreach/fused defaults cover CUDA devices only).

`copy_from_transformers` loads a GPT2LMHeadModel's weights (transposing its Conv1D matrices), so a
test can check that both peers compute the same loss.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
  """Multi-head causal attention as one fused SDPA call (nanoGPT's `flash` path)."""

  def __init__(self, n_embd: int, n_head: int):
    super().__init__()
    self.n_head = n_head
    self.c_attn = nn.Linear(n_embd, 3 * n_embd)
    self.c_proj = nn.Linear(n_embd, n_embd)

  def forward(self, x):
    B, T, C = x.shape
    q, k, v = self.c_attn(x).split(C, dim=2)
    # (B, T, C) -> (B, heads, T, head size): SDPA works per head.
    q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
  """The 4x feed-forward layer with GPT-2's tanh GELU."""

  def __init__(self, n_embd: int):
    super().__init__()
    self.c_fc = nn.Linear(n_embd, 4 * n_embd)
    self.c_proj = nn.Linear(4 * n_embd, n_embd)

  def forward(self, x):
    return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, n_embd: int, n_head: int):
    super().__init__()
    self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
    self.attn = CausalSelfAttention(n_embd, n_head)
    self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
    self.mlp = MLP(n_embd)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """GPT-2 with a tied LM head; forward(idx, targets) -> (logits, mean cross-entropy or None)."""

  def __init__(self, n_vocab: int, n_ctx: int, n_embd: int, n_head: int, n_layer: int):
    super().__init__()
    self.wte = nn.Embedding(n_vocab, n_embd)
    self.wpe = nn.Embedding(n_ctx, n_embd)
    self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
    self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
    self.lm_head = nn.Linear(n_embd, n_vocab, bias=False)
    self.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
    self.apply(_init_weights)
    for name, p in self.named_parameters():
      if name.endswith("c_proj.weight"):  # GPT-2's scaled residual projections
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

  def forward(self, idx, targets=None):
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = self.wte(idx) + self.wpe(pos)
    for block in self.h:
      x = block(x)
    logits = self.lm_head(self.ln_f(x))
    if targets is None:
      return logits, None
    # float() so that under autocast the softmax runs in float32, as the transformers row does
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
    return logits, loss


def _init_weights(module: nn.Module) -> None:
  if isinstance(module, (nn.Linear, nn.Embedding)):
    nn.init.normal_(module.weight, mean=0.0, std=0.02)
  if isinstance(module, nn.Linear) and module.bias is not None:
    nn.init.zeros_(module.bias)


def configure_optimizer(model: nn.Module, learning_rate: float, betas, eps: float,
                        weight_decay: float, device_type: str = "cpu", fused: bool | None = None):
  """nanoGPT's optimizer: AdamW, decay on >= 2-D tensors only, fused on CUDA only (its default).

  `fused` overrides that choice (True: torch's fused CPU/CUDA kernel; False: its default). With
  weight_decay 0 this is Adam (configs/117m.py's optimizer)."""
  params = [p for p in model.parameters() if p.requires_grad]
  groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
  if fused is None:
    fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type == "cuda"
  extra = {"fused": True} if fused else {}
  return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **extra)


def copy_from_transformers(model: GPT, hf_model) -> None:
  """Loads a transformers GPT2LMHeadModel's weights into `model` (same shapes). transformers'
  Conv1D stores [in, out], nn.Linear [out, in]: those four matrices per block are transposed."""
  src = hf_model.transformer.state_dict()
  conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "lm_head.weight":  # tied to wte
        continue
      value = src[name]
      p.copy_(value.t() if name.endswith(conv1d) else value)

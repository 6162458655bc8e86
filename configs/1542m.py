"""GPT-2 XL (1542M; OpenAI later counted it as 1558M)."""
from gpt.config import base_config


def get_config():
  c = base_config()
  c.init = "1558M"
  c.model.n_layer = 48
  c.model.n_embd = 1600
  c.model.n_head = 25
  # Fits training on a single 80 GB GPU only with rematerialisation and bf16 compute.
  c.model.remat = "dots"
  c.model.dtype = "bfloat16"
  return c

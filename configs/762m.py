"""GPT-2 large (762M; OpenAI later counted it as 774M)."""
from gpt.config import base_config


def get_config():
  c = base_config()
  c.init = "774M"
  c.model.n_layer = 36
  c.model.n_embd = 1280
  c.model.n_head = 20
  # 774M parameters plus Adam state do not fit beside full activations on one 16 GB card.
  c.model.remat = "dots"
  return c

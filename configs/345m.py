"""GPT-2 medium (345M; OpenAI later counted it as 355M): the model the chapter talks to.

  python -m gpt.main --config=configs/345m.py --config.mode=interactive
"""
from gpt.config import base_config


def get_config():
  c = base_config()
  c.init = "355M"
  c.model.n_layer = 24
  c.model.n_embd = 1024
  c.model.n_head = 16
  return c

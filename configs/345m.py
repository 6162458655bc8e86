"""GPT-2 medium (345M; OpenAI later counted it as 355M): the model the chapter talks to.

  python -m gpt.main --config=configs/345m.py --config.mode=interactive
"""
from gpt.config import size_config


def get_config():
  # Shape (24 layers, 1024 wide, 16 heads) and weights of the released 355M model.
  return size_config("355M")

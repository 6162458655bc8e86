"""GPT-2 large (762M; OpenAI later counted it as 774M)."""
from gpt.config import size_config


def get_config():
  # Shape (36 layers, 1280 wide, 20 heads) and weights of the released 774M model.
  c = size_config("774M")
  # 774M parameters plus Adam state do not fit beside full activations on one 16 GB card.
  c.model.remat = "dots"
  return c

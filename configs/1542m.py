"""GPT-2 XL (1542M; OpenAI later counted it as 1558M)."""
from gpt.config import size_config


def get_config():
  # Shape (48 layers, 1600 wide, 25 heads) and weights of the released 1558M model.
  c = size_config("1558M")
  # Fits training on a single 80 GB GPU only with rematerialisation and bf16 compute.
  c.model.remat = "dots"
  c.model.dtype = "bfloat16"
  return c

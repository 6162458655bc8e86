"""GPT-2 small (117M; OpenAI later counted it as 124M): the book chapter's fine-tuning run.

Fine-tunes OpenAI's released weights on Kant's Critique of Pure Reason at lr 2e-5, as nshepperd's
train.py does, sampling as it goes:
  python -m gpt.main --config=configs/117m.py --workdir=runs/kant
"""
from gpt.config import size_config


def get_config():
  # Shape (12 layers, 768 wide, 12 heads) and weights of the released 124M model, which are also
  # the base config's defaults.
  return size_config("124M")

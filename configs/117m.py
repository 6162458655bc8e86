"""GPT-2 small (117M; OpenAI later counted it as 124M): the book chapter's fine-tuning run.

Fine-tunes OpenAI's released weights on Kant's Critique of Pure Reason at lr 2e-5, as nshepperd's
train.py does, sampling as it goes:
  python -m gpt.main --config=configs/117m.py --workdir=runs/kant

On a CPU with AVX512-BF16 (grep avx512_bf16 /proc/cpuinfo), adding
--config.model.matmul_dtype=bfloat16 multiplies in bfloat16 with float32 accumulation (everything
else float32, as torch's bf16 autocast): 1.5-1.9x this step's float32 speed in session 9's
measurements (BENCHMARKS.md "train-bf16, session 9"). Elsewhere keep the float32 default.
"""
from gpt.config import size_config


def get_config():
  # Shape (12 layers, 768 wide, 12 heads) and weights of the released 124M model, which are also
  # the base config's defaults.
  return size_config("124M")

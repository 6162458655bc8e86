"""Export any loadable model (a workdir, a released size, an OpenAI or HF folder) to a folder.

  python -m gpt.export --init=runs/kant --out=exports/kant-hf --format=hf
  python -m gpt.export --init=../shared/fixtures/hf-gpt2-tiny --out=/tmp/tiny-openai --format=openai
  python -m gpt.export --init=models/124M --out=exports/124M-int8 --format=int8

`hf` writes config.json + model.safetensors + vocab.json + merges.txt (loads in transformers'
GPT2LMHeadModel.from_pretrained); `openai` writes OpenAI's TF checkpoint layout (hparams.json,
checkpoint, model.ckpt.index/data, encoder.json, vocab.bpe) that this package and OpenAI's
scripts read. `int8` writes int8 weights with per-output-channel scales (gpt.quantize:
model.int8.safetensors + config.json with a `quantization` entry + the tokenizer), which
gpt.weights loads back as an int8 model (`--config.init=<folder>`). A LoRA workdir (gpt.lora)
exports as its base with the adapters merged in;
`adapters` writes only its adapters, as Hugging Face PEFT loads them (adapter_config.json +
adapter_model.safetensors, for the base its lora.json names):

  python -m gpt.export --init=runs/kant-lora --out=exports/kant-lora-peft --format=adapters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt import console
from gpt.config import base_config
from gpt.errors import GPTError, print_error


FORMATS = ("hf", "openai", "int8", "adapters")


def export(init: str, out: str, fmt: str = "hf", models_dir: str = "models") -> Path:
  """Loads `init` as `config.init` would and writes it to `out` in format `fmt` (hf | openai |
  int8, through gpt.weights; int8: gpt.quantize's folder), or writes the adapters of LoRA
  workdir `init` (fmt `adapters`)."""
  config = base_config()
  config.init, config.models_dir = init, models_dir
  if fmt == "adapters":
    from gpt.lora import export_peft
    return export_peft(init, out, config)
  from gpt import weights  # imports jax: only after main() has set up the console

  weights.check_export_format(fmt)  # before loading: a typo should not cost a model load
  loaded = weights.load_model(config)
  return weights.export(loaded.model, loaded.tokenizer, out, fmt)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m gpt.export", description=__doc__.split("\n")[0])
  parser.add_argument("--init", required=True, help="what to export (anything config.init accepts)")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--format", default="hf", choices=FORMATS)
  parser.add_argument("--models_dir", default="models")
  parser.add_argument("--verbosity", type=int, default=None,
                      help="absl log level; shows the libraries' logs too (as GPT_VERBOSE=1 does)")
  args = parser.parse_args(argv)
  verbose = console.verbose_requested() or args.verbosity is not None
  if not verbose:
    console.quiet_native_logs()
  console.setup(verbose)
  if args.verbosity is not None:
    from absl import logging
    logging.set_verbosity(args.verbosity)
  try:
    folder = export(args.init, args.out, args.format, args.models_dir)
  except GPTError as e:
    return print_error(e)
  print(f"wrote {folder}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

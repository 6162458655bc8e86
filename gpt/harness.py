"""lm-evaluation-harness on this package's JAX model: any lm-eval task on any model we can load.

  python -m gpt.harness --model gpt --model_args init=124M,batch_size=16 --tasks lambada_openai,hellaswag
  python -m gpt.harness --model gpt --model_args init=runs/kant,max_gen_toks=64 --tasks arithmetic_2da \\
      --include_path my_tasks/ --output_path results/

takes the `lm_eval` command line unchanged (the `[harness]` extra: `pip install gpt[harness]`; lm-eval
does not need torch for this model) and runs it with the model `gpt` registered. Model arguments:

  init          anything `--config.init` accepts: 124M/355M/774M/1558M, an OpenAI or Hugging Face
                folder, a training workdir (required)
  batch_size    rows per forward pass or decode batch (default 16; lm-eval's --batch_size too)
  dtype         compute dtype: float32 (default) or bfloat16
  max_gen_toks  new tokens per generate_until request unless the task says otherwise (256)
  max_buckets   padded row lengths the scorer compiles per call (8; see gpt.evals.scoring)
  seed          sampling seed for generate_until requests with do_sample (0)
  models_dir    where released models are downloaded to ("models")

The three request types go through the same code as the eval mode:
  loglikelihood          gpt.evals.scoring.Scorer: requests that share a context are packed into one
                         row (the context once, every continuation after it), so a multiple-choice
                         question costs one pass. Contexts are encoded and cut from the left as
                         lm-eval's `hf` model does, so results agree with it per request.
  loglikelihood_rolling  gpt.evals.perplexity.rolling_windows with stride = n_ctx: lm-eval's disjoint
                         windows, each token predicted once with the most context that fits.
  generate_until         gpt.evals.greedy.TextGenerator (the jitted KV-cache decoder): rows of different
                         lengths left-padded in one batch, stopped at <|endoftext|> and cut before the
                         earliest `until` string; greedy unless the request samples (do_sample with
                         temperature > 0, and top_k/top_p if given). Other generation arguments
                         (e.g. num_beams) are not supported and fail with a message.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
from typing import Any

from gpt.errors import GPTError, print_error

from tqdm import tqdm

try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
  HAVE_LM_EVAL = True
except ImportError:  # main() says how to install it; importing this module still works
  HAVE_LM_EVAL = False
  TemplateLM = object
  register_model = lambda *names: (lambda cls: cls)  # noqa: E731

from gpt.evals.base import TokenRequest
from gpt.evals.greedy import GREEDY, TextGenerator
from gpt.evals.perplexity import rolling_windows
from gpt.evals.scoring import Scorer
from gpt.sampling import SamplingOptions

log = logging.getLogger(__name__)
# Generation arguments that the decoder honours; any other one is refused rather than ignored.
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}


@register_model("gpt")
class GPTLM(TemplateLM):
  """The lm-eval model `gpt` (see the module docstring for its arguments)."""

  def __init__(self, init: str = "", batch_size: int | str = 16, dtype: str = "float32",
               max_gen_toks: int = 256, max_buckets: int = 8, seed: int = 0,
               models_dir: str = "models", device: str | None = None,
               max_batch_size: int | None = None, **unknown: Any):
    super().__init__()
    from gpt.config import base_config
    from gpt.weights import load_model

    if unknown:
      raise GPTError(f"unknown --model_args {', '.join(sorted(unknown))} for --model gpt; known: init, "
                     f"batch_size, dtype, max_gen_toks, max_buckets, seed, models_dir")
    if not str(init):
      raise GPTError("--model gpt needs --model_args init=<model> (124M, a folder or a workdir)")
    del device, max_batch_size  # JAX places the model itself; batches have one fixed size
    if str(batch_size).startswith("auto"):
      log.warning("batch_size=%s: the gpt model uses a fixed batch size; using 16", batch_size)
      batch_size = 16
    self._batch_size = int(batch_size)
    self._max_gen_toks = int(max_gen_toks)
    config = base_config()
    config.init, config.models_dir, config.model.dtype = str(init), str(models_dir), str(dtype)
    loaded = load_model(config)
    self.loaded = loaded
    self.gpt_tokenizer = loaded.tokenizer  # not `tokenizer`: lm-eval reads that as a HF tokenizer
    self.n_ctx = loaded.cfg.n_ctx
    self.scorer = Scorer(loaded.model, self._batch_size, int(max_buckets))
    self.generator = TextGenerator(loaded.model, loaded.tokenizer, self._batch_size, int(seed))
    log.info("gpt model: %s (%s parameters)", loaded.source, f"{loaded.cfg.num_params():,}")

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """As lm-eval's, except that --model_args win over the CLI's defaults (e.g. batch_size)."""
    from lm_eval.utils import simple_parse_args_string
    return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  # Properties lm-eval reads.
  @property
  def eot_token_id(self) -> int:
    return self.gpt_tokenizer.eot_id

  @property
  def max_length(self) -> int:
    return self.n_ctx

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return "gpt2"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Token ids; a literal <|endoftext|> is the special token, as in Hugging Face's tokenizer."""
    return self.gpt_tokenizer.encode(string, allow_special=True)

  def tok_decode(self, tokens: list[int]) -> str:
    return self.gpt_tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """(log P(continuation | context), is_greedy) per (key, context ids, continuation ids).

    The context is cut from the left to n_ctx + 1 - len(continuation) tokens, as lm-eval's `hf`
    model cuts its input; requests whose cut contexts are equal share one packed row.
    """
    rows: dict[tuple[int, ...], list[tuple[int, ...]]] = collections.OrderedDict()
    where = []
    for _, context, continuation in requests:
      if not continuation:
        raise GPTError("lm-eval asked for the log-likelihood of an empty continuation")
      room = self.n_ctx + 1 - len(continuation)
      if room < 1:
        raise GPTError(f"a continuation of {len(continuation)} tokens does not fit the context of "
                       f"{self.n_ctx} tokens")
      context = tuple(context[-room:])
      conts = rows.setdefault(context, [])
      where.append((context, len(conts)))
      conts.append(tuple(continuation))
    keys = list(rows)
    scores = self.scorer.score([TokenRequest(k, tuple(rows[k])) for k in keys],
                               desc=None if disable_tqdm else "loglikelihood (gpt)")
    by_context = dict(zip(keys, scores))
    out = []
    for (key, _, _), (context, i) in zip(requests, where):
      s = by_context[context][i]
      out.append((s.logprob, s.greedy))
      self.cache_hook.add_partial("loglikelihood", key, out[-1])
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of each whole string after <|endoftext|>, in disjoint n_ctx windows."""
    windows, owner = [], []
    for n, (string,) in enumerate(req.args for req in requests):
      doc = rolling_windows([self.eot_token_id] + self.tok_encode(string), self.n_ctx, self.n_ctx)
      windows += doc
      owner += [n] * len(doc)
    totals = [0.0] * len(requests)
    scores = self.scorer.score(windows, desc=None if disable_tqdm else "loglikelihood_rolling (gpt)")
    for n, s in zip(owner, scores):
      totals[n] += s[0].logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of each context until its `until` strings (see the module docstring)."""
    groups: dict[str, list[int]] = collections.OrderedDict()
    for n, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
    out: list[str] = [""] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (gpt)")
    for members in groups.values():
      gen_kwargs = requests[members[0]].args[1]
      kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
      until = handle_stop_sequences(kwargs.pop("until", None), eos=self.gpt_tokenizer.eot_text)
      max_new = int(kwargs.pop("max_gen_toks"))
      options = self._options(kwargs)
      room = self.n_ctx - max_new
      if room < 1:
        raise GPTError(f"max_gen_toks={max_new} leaves no room for a prompt in the context of "
                       f"{self.n_ctx} tokens; lower max_gen_toks")
      prompts = [self.tok_encode(requests[n].args[0])[-room:] or [self.eot_token_id]
                 for n in members]
      texts = self.generator.generate_until(prompts, [until] * len(prompts), max_new, options)
      for n, text in zip(members, texts):
        out[n] = text
        self.cache_hook.add_partial("generate_until", requests[n].args, text)
      bar.update(len(members))
    bar.close()
    return out

  @staticmethod
  def _options(kwargs: dict) -> SamplingOptions:
    """Greedy, or sampling as do_sample/temperature/top_k/top_p ask (others are refused)."""
    unknown = set(kwargs) - _SAMPLING_KEYS
    if unknown:
      raise GPTError(f"generation arguments {', '.join(sorted(unknown))} are not supported by --model "
                     f"gpt (it supports until, max_gen_toks, do_sample, temperature, top_k, top_p)")
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature == 0.0:
      return GREEDY
    return SamplingOptions(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                           top_p=float(kwargs.get("top_p") or 1.0))


def main(argv: list[str] | None = None) -> int:
  """The lm_eval command line with the `gpt` model registered."""
  if not HAVE_LM_EVAL:
    return print_error("python -m gpt.harness needs lm-evaluation-harness: pip install "
                       "'gpt[harness]' (or pip install lm-eval)")
  from lm_eval.__main__ import cli_evaluate

  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  except GPTError as e:
    return print_error(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())

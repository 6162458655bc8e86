"""The `sample` mode (unconditional or from a prompt) and `interactive` (a REPL).

  python -m gpt.main --config=configs/117m.py --config.mode=sample --config.sampling.nsamples=4
  python -m gpt.main --config=configs/117m.py --config.mode=sample --config.sampling.prompt="Kant said"
  python -m gpt.main --config=configs/117m.py --config.mode=interactive

Weights and tokenizer come from `config.init` (gpt.weights). `Generator` is "a decoder for this
model": gpt.model's one forward pass, laid out by gpt.decoding's `prepare_for_decoding` (per-layer weights in the
compute dtype, a KVCache that XLA updates in place), run by `gpt.sampling.Decoder` through
`decoding_functions`' `logits_fn`; training's in-loop samples use the same `make_decoder`.
Prompts are left-padded to a power-of-two bucket and the cache sized to bucket(prompt) +
bucket(length), so a session compiles once per (batch size, length bucket).
Output follows OpenAI's generate_unconditional_samples.py / interactive_conditional_samples.py:
`===== SAMPLE n =====` separators, the first sample of a batch streamed as it is generated.
"""

from __future__ import annotations

import codecs
import contextlib
import sys
from typing import Any, Iterator, TextIO

import jax
import numpy as np
from absl import logging

from flax import nnx

from gpt.decoding import decoding_functions, prepare_for_decoding
from gpt.errors import GPTError
from gpt.model import GPT, GPTConfig
from gpt.prompt_reader import PromptReader
from gpt.sampling import Decoder, SamplingOptions, trim

# New tokens per decode call when streaming: small enough to feel live and to react to Ctrl-C.
STREAM_CHUNK = 8
# Smallest length bucket (prompt and new tokens are each padded up to a power of two >= this).
MIN_BUCKET = 16
SEPARATOR = "=" * 40


def bucket(n: int) -> int:
  """The power of two >= max(n, MIN_BUCKET)."""
  return max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())


def options_from_config(s: Any) -> SamplingOptions:
  """SamplingOptions from the `sampling` config section (raises GPTError on bad values)."""
  return SamplingOptions(temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p))


def check_counts(nsamples: int, batch_size: int) -> None:
  """nsamples >= 0 and a multiple of batch_size >= 1, or GPTError."""
  if batch_size < 1:
    raise GPTError(f"sampling.batch_size={batch_size} must be >= 1")
  if nsamples < 0 or nsamples % batch_size:
    raise GPTError(f"sampling.nsamples={nsamples} must be a multiple of sampling.batch_size={batch_size} "
                   f"(0 = keep sampling until Ctrl-C)")


def stop_at_eot(value: Any, conditional: bool) -> bool:
  """sampling.stop_at_eot: 'auto' stops conditional samples only, as the original scripts did."""
  text = str(value).strip().lower()
  if text == "auto":
    return conditional
  if text in ("true", "1", "yes"):
    return True
  if text in ("false", "0", "no"):
    return False
  raise GPTError(f"sampling.stop_at_eot={value!r}: use auto, true or false")


def fit_prompt(prompt: list[int], length: int, n_ctx: int, truncate: bool) -> tuple[list[int], int]:
  """(prompt, number of new tokens) that fit the context.

  The model sees the prompt and every new token but the last, so prompt + length may be n_ctx + 1.
  length 0 means as many as fit. A prompt that is too long is an error, or cut from the left when
  `truncate`.
  """
  P = len(prompt)
  if P == 0:
    raise GPTError("the prompt is empty (it encodes to no tokens)")
  if length < 0 or length > n_ctx:
    raise GPTError(f"sampling.length={length} must be between 0 (fill the context) and n_ctx={n_ctx}")
  if length == 0:
    if P <= n_ctx:
      return prompt, n_ctx + 1 - P
    if not truncate:
      raise GPTError(f"the prompt has {P} tokens, more than the context of n_ctx={n_ctx}; shorten it, or "
                     f"set sampling.length and sampling.truncate_prompt=True to cut it from the left")
    length = n_ctx // 2  # cut the prompt so that half the context is left for new text
  room = n_ctx + 1 - length
  if P > room:
    if not truncate:
      raise GPTError(f"prompt ({P} tokens) + sampling.length ({length}) = {P + length} tokens do not fit "
                     f"n_ctx={n_ctx} (at most {n_ctx + 1}, the last new token is never fed back): "
                     f"shorten the prompt, lower sampling.length, or set sampling.truncate_prompt=True "
                     f"to keep the last {room} prompt tokens")
    prompt = prompt[-room:]
  return prompt, length


def pad_left(prompts: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded int32 tokens [B, width] and the mask of real tokens."""
  tokens = np.zeros((len(prompts), width), np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, ids in enumerate(prompts):
    if ids:
      tokens[row, -len(ids):] = ids
      mask[row, -len(ids):] = True
  return tokens, mask


def make_decoder(cfg: GPTConfig, options: SamplingOptions, *, stop_token: int,
                 stop_at_token: bool) -> Decoder:
  """A gpt.sampling.Decoder for models of shape `cfg`; pass it `decoding_params(model)` as params.

  The decoder (and its compiled programs) can be kept while the weights change (training)."""
  logits_fn, init_cache = decoding_functions(cfg)
  return Decoder(logits_fn, init_cache, options, stop_token=stop_token, stop_at_token=stop_at_token)


def decoding_params(model: GPT) -> nnx.State:
  """The weights a `make_decoder` decoder runs: the model prepared for decoding, as a pytree."""
  return nnx.state(prepare_for_decoding(model))


class Generator:
  """A model and tokenizer wrapped for sampling: token prompts in, new tokens out.

  Decoding runs the model prepared for decoding (gpt.decoding.prepare_for_decoding: per-layer weights
  in the compute dtype, a per-layer cache); the stacked model itself is not kept.
  """

  def __init__(self, model: GPT, tokenizer: Any, options: SamplingOptions, *, stop_at_eot: bool):
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.stop_at_eot = stop_at_eot
    self.params = decoding_params(model)
    self.decoder = make_decoder(self.cfg, options, stop_token=tokenizer.eot_id, stop_at_token=stop_at_eot)

  def stream(self, prompts: list[list[int]], length: int, key: jax.Array,
             chunk: int = STREAM_CHUNK) -> Iterator[np.ndarray]:
    """Yields the new tokens [B, k] of every row, `chunk` steps at a time (k may be smaller).

    Prompts may differ in length; each must fit with `length` (see fit_prompt). Rows that hit
    <|endoftext|> (when stopping) are padded with it; the stream ends when every row has.
    """
    longest = max(map(len, prompts))
    if min(map(len, prompts)) == 0 or length < 1 or longest + length - 1 > self.cfg.n_ctx:
      raise GPTError(f"prompts of {min(map(len, prompts))}..{longest} tokens and length={length} do not "
                     f"fit n_ctx={self.cfg.n_ctx}; see gpt.sample.fit_prompt")
    tokens, mask = pad_left(prompts, bucket(longest))
    max_new = bucket(length)
    state = self.decoder.start(self.params, tokens, mask, key, cache_length=tokens.shape[1] + max_new,
                               max_new=max_new)
    emitted = 0
    while True:
      new, step, done = jax.device_get((state.tokens, state.step, state.done))
      step = min(int(step), length)
      if step > emitted:
        yield new[:, emitted:step]
        emitted = step
      if step >= length or done.all():
        return
      state = self.decoder.advance(self.params, state, min(step + chunk, length))

  def generate(self, prompts: list[list[int]], length: int, key: jax.Array) -> list[list[int]]:
    """Each row's new tokens (cut before <|endoftext|> when stopping), in one decode call."""
    rows = np.concatenate(list(self.stream(prompts, length, key, chunk=length)), axis=1)
    return trim(rows, self.tokenizer.eot_id, self.stop_at_eot, length)


class TextStream:
  """Token ids to text, a piece at a time, never splitting a UTF-8 character across pieces."""

  def __init__(self, tokenizer: Any, stop_at_eot: bool):
    self.tokenizer = tokenizer
    self.stop_at_eot = stop_at_eot
    self.stopped = False
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def cut(self, ids: list[int]) -> list[int]:
    """`ids` up to the first <|endoftext|> when stopping at it."""
    eot = self.tokenizer.eot_id
    return ids[:ids.index(eot)] if self.stop_at_eot and eot in ids else ids

  def feed(self, ids: list[int]) -> str:
    """The text that the next ids complete."""
    if self.stopped:
      return ""
    kept = self.cut(ids)
    self.stopped = len(kept) < len(ids)
    return self._utf8.decode(self.tokenizer.decode_bytes(kept))

  def finish(self) -> str:
    return self._utf8.decode(b"", final=True)


class Output:
  """Writes to stdout (flushed as it goes) and, optionally, to a file."""

  def __init__(self, path: str = ""):
    try:
      self.file: TextIO | None = open(path, "w", encoding="utf-8") if path else None
    except OSError as e:
      raise GPTError(f"cannot write sampling.output_file={path!r}: {e.strerror}") from None

  def write(self, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
    if self.file:
      self.file.write(text)
      self.file.flush()

  def header(self, n: int) -> None:
    self.write(f"{SEPARATOR} SAMPLE {n} {SEPARATOR}\n")

  def close(self) -> None:
    if self.file:
      self.file.close()


def write_batch(gen: Generator, prompt: list[int], length: int, key: jax.Array, batch: int,
                out: Output, first: int) -> None:
  """Samples `batch` continuations of `prompt`, printing SAMPLE first..first+batch-1.

  The first row is streamed as it is generated; the others are printed when the batch is done.
  """
  streams = [TextStream(gen.tokenizer, gen.stop_at_eot) for _ in range(batch)]
  pending = [""] * batch
  out.header(first)
  for chunk in gen.stream([prompt] * batch, length, key):
    out.write(streams[0].feed(chunk[0].tolist()))
    for row in range(1, batch):
      pending[row] += streams[row].feed(chunk[row].tolist())
  out.write(streams[0].finish() + "\n")
  for row in range(1, batch):
    out.header(first + row)
    out.write(pending[row] + streams[row].finish() + "\n")


def _load(config: Any, conditional: bool) -> Generator:
  from gpt.weights import load_model

  s = config.sampling
  options = options_from_config(s)
  check_counts(int(s.nsamples), int(s.batch_size))
  stop = stop_at_eot(s.stop_at_eot, conditional)
  loaded = load_model(config)
  logging.info("sampling from %s (%s)", loaded.source, options)
  return Generator(loaded.model, loaded.tokenizer, options, stop_at_eot=stop)


def _prompt_text(s: Any) -> str:
  if s.prompt_file:
    try:
      with open(s.prompt_file, encoding="utf-8") as f:
        return f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise GPTError(f"cannot read sampling.prompt_file={s.prompt_file!r}: {e}") from None
  return s.prompt


def _sample_loop(gen: Generator, prompt: list[int], s: Any, key: jax.Array, out: Output) -> int:
  """nsamples samples of `prompt` (forever when 0); returns how many were finished."""
  prompt, length = fit_prompt(prompt, int(s.length), gen.cfg.n_ctx, bool(s.truncate_prompt))
  done, batch = 0, int(s.batch_size)
  while int(s.nsamples) == 0 or done < int(s.nsamples):
    write_batch(gen, prompt, length, jax.random.fold_in(key, done // batch), batch, out, done + 1)
    done += batch
  return done


def run_sample(config: Any, workdir: str | None) -> None:
  """`--config.mode=sample`: unconditional samples, or conditional ones from sampling.prompt(_file).

  nsamples=0 samples until Ctrl-C, which ends the run cleanly.
  """
  del workdir  # samples go to stdout and sampling.output_file
  s = config.sampling
  text = _prompt_text(s)
  gen = _load(config, conditional=bool(text))
  prompt = gen.tokenizer.encode(text, allow_special=True) if text else [gen.tokenizer.eot_id]
  out = Output(s.output_file)
  try:
    _sample_loop(gen, prompt, s, jax.random.key(int(s.seed)), out)
  except KeyboardInterrupt:
    out.write("\n")
    print("stopped (Ctrl-C)", file=sys.stderr)
  finally:
    out.close()


def run_interactive(config: Any, workdir: str | None) -> None:
  """`--config.mode=interactive`: the `Model prompt >>> ` loop of interactive_conditional_samples.py.

  A prompt is one line; a line ending in a backslash continues on the next line, and on a
  terminal a pasted block of lines is taken as one prompt. Ctrl-C stops the samples of the current
  prompt and asks again; Ctrl-D (end of input) exits.
  """
  del workdir
  s = config.sampling
  gen = _load(config, conditional=True)
  reader = PromptReader(sys.stdin)
  out = Output(s.output_file)
  key = jax.random.key(int(s.seed))
  try:
    for index, text in _prompts(reader):
      with _interruptible():
        try:
          prompt = gen.tokenizer.encode(text, allow_special=True)
          _sample_loop(gen, prompt, s, jax.random.fold_in(key, index), out)
        except GPTError as e:  # e.g. a prompt too long for the context: say so, ask again
          print(f"error: {e}", file=sys.stderr)
          continue
        out.write("=" * 80 + "\n")
  finally:
    out.close()


def _prompts(reader: PromptReader) -> Iterator[tuple[int, str]]:
  """(prompt number, text) until end of input; empty prompts and Ctrl-C at the prompt ask again."""
  number = 0
  while True:
    sys.stdout.write("Model prompt >>> ")
    sys.stdout.flush()
    try:
      text = reader.read()
    except KeyboardInterrupt:
      sys.stdout.write("\n(Ctrl-D exits)\n")
      continue
    if text is None:
      sys.stdout.write("\n")
      return
    if not reader.is_tty:  # nothing echoed the input: show it, so the transcript reads right
      sys.stdout.write(text + "\n")
    if not text.strip():
      print("Prompt should not be empty!")
      continue
    yield number, text
    number += 1


@contextlib.contextmanager
def _interruptible():
  """Turns Ctrl-C inside the block into a note, so the REPL asks for the next prompt."""
  try:
    yield
  except KeyboardInterrupt:
    sys.stdout.write("\n[stopped: Ctrl-C]\n")
    sys.stdout.flush()

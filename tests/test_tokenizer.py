"""gpt.tokenizer: ids identical to tiktoken's `gpt2` encoding, round trips, loading, saving, errors.

The reference is tiktoken's own Encoding built offline from ../shared/data/gpt2/gpt2.tiktoken (the
file tiktoken pins for r50k/gpt2) with tiktoken's gpt2 pattern and special token: nothing of ours.
"""

import hashlib
import json
import os
import select
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from conftest import require_shared
from gpt import tokenizer as tokenizer_lib
from gpt.errors import GPTError
from gpt.tokenizer import EOT_TEXT, bytes_to_unicode, get_tokenizer, split_for_parallel

EOT = 50256
# sha256 of OpenAI's encoder.json and vocab.bpe, as pinned by tiktoken_ext.openai_public.gpt2.
ENCODER_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
CORPORA = {
    "kant": ("data", "kant", "critique_of_pure_reason.txt"),
    "tinyshakespeare": ("data", "tinyshakespeare", "input.txt"),
}
# Pieces the fuzz strings are built from: whitespace runs, contractions, scripts, emoji, specials.
FRAGMENTS = [
    " ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r", "\u00a0", "\u2003", "\u3000",
    "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'",
    "don't", "I'M", "a", "Hello", "world", "GPT", "123", "4.5", "1,000", "-", "!!", "...", "é", "e\u0301",
    "ﬁ", "你好", "日本語", "Привет", "Ελληνικά", "مرحبا", "שלום", "नमस्ते", "😀", "👍🏽", "👨‍👩‍👧",
    "🇺🇸", "\u200b", "\ufeff", "<|endoftext|>", "<|endoftext", "|>", "<|", "def f(x):", "https://a.b/c?d=1",
]
fuzz_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=40).map("".join),
)
# GPT-2's pre-tokenizer in Python's `regex` (tiktoken runs the same pattern in Rust).
pre_tokens = regex.compile(r50k_pat_str).findall
fuzz = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ref() -> tiktoken.Encoding:
  """tiktoken's gpt2 encoding from the local .tiktoken file."""
  ranks = load_tiktoken_bpe(str(require_shared("data", "gpt2", "gpt2.tiktoken")))
  return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                           special_tokens={EOT_TEXT: EOT}, explicit_n_vocab=50257)


@pytest.fixture(scope="module")
def tok():
  return get_tokenizer()


@pytest.fixture(scope="module", params=sorted(CORPORA))
def corpus(request) -> str:
  return require_shared(*CORPORA[request.param]).read_text(encoding="utf-8")


def test_known_ids_and_properties(tok):
  # Ids published with GPT-2 (OpenAI's encoder.py gives the same), independent of tiktoken.
  assert tok.encode("Hello world") == [15496, 995]
  assert tok.encode(" the") == [262]
  assert tok.encode("\n\n") == [628]
  assert tok.encode("a\n\nb") == [64, 198, 198, 65]
  assert (tok.eot_id, tok.eot_text, tok.n_vocab) == (EOT, "<|endoftext|>", 50257)
  assert tok.encode("") == [] and tok.decode([]) == ""


def test_pattern_is_tiktokens():
  assert tokenizer_lib.GPT2_PATTERN == r50k_pat_str
  assert tokenizer_lib._PATTERN_COPY == r50k_pat_str  # The fallback used without tiktoken_ext.


@pytest.fixture(params=[1, 4], ids=["serial", "4 threads"])
def free_cpus(request, monkeypatch) -> int:
  """Long texts run on as many threads as CPUs look free; test both ways whatever the load."""
  monkeypatch.setattr(tokenizer_lib, "free_cpus", lambda: request.param)
  return request.param


def test_corpus_matches_tiktoken(tok, ref, corpus, free_cpus):
  assert len(corpus) > tokenizer_lib.SPLIT_CHARS  # So the split (and threaded) path is tested.
  expected = ref.encode_ordinary(corpus)
  assert tok.encode(corpus) == expected
  assert tok.encode(corpus, allow_special=True) == expected
  assert tok.decode(expected) == corpus


def test_split_is_safe_at_every_cut(ref, corpus):
  """With chunk_chars=1 the text is cut at every place the rule allows (any subset of safe cuts is
  safe too). The ids and, stronger (so any vocabulary is safe), the pre-tokens are unchanged."""
  pieces = split_for_parallel(corpus, 1)
  assert "".join(pieces) == corpus
  assert len(pieces) > len(corpus) // 10  # The rule finds cuts almost everywhere (~1 per word).
  assert [i for p in pieces for i in ref.encode_ordinary(p)] == ref.encode_ordinary(corpus)
  assert [t for p in pieces for t in pre_tokens(p)] == pre_tokens(corpus)


def test_lambada_matches_tiktoken(tok, ref, free_cpus):
  path = require_shared("data", "lambada", "lambada_test.jsonl")
  texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
  assert len(texts) == 5153
  expected = [ref.encode_ordinary(t) for t in texts]
  assert tok.encode_batch(texts) == expected  # > SPLIT_CHARS in all: the grouped threads path.
  assert [tok.encode(t) for t in texts[:500]] == expected[:500]
  # All of it as one document with separators: the long path with specials allowed and not.
  joined = EOT_TEXT.join(texts)
  with_eot = tok.encode(joined, allow_special=True)
  assert with_eot == ref.encode(joined, allowed_special={EOT_TEXT})
  assert with_eot.count(EOT) == len(texts) - 1
  plain = tok.encode(joined)
  assert plain == ref.encode_ordinary(joined) and EOT not in plain


@fuzz
@given(fuzz_text)
def test_fuzz_matches_tiktoken_and_round_trips(tok, ref, text):
  ids = tok.encode(text)
  assert ids == ref.encode_ordinary(text)
  assert EOT not in ids
  assert tok.decode(ids) == text
  assert tok.decode_bytes(ids) == text.encode("utf-8")
  special = tok.encode(text, allow_special=True)
  assert special == ref.encode(text, allowed_special={EOT_TEXT})
  assert special.count(EOT) == text.count(EOT_TEXT)
  assert tok.decode(special) == text


@fuzz
@given(st.lists(fuzz_text, max_size=6), st.integers(1, 6), st.booleans())
def test_fuzz_long_path(tok, ref, texts, chunk_chars, allow_special):
  """The split + threads path, made to run on short strings by shrinking its thresholds."""
  text = "".join(texts)
  pieces = split_for_parallel(text, chunk_chars)
  assert "".join(pieces) == text
  assert [i for p in pieces for i in ref.encode_ordinary(p)] == ref.encode_ordinary(text)
  assert [t for p in pieces for t in pre_tokens(p)] == pre_tokens(text)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tokenizer_lib, "free_cpus", lambda: 3)
    mp.setattr(tokenizer_lib, "SPLIT_CHARS", 0)
    mp.setattr(tokenizer_lib, "CHUNK_CHARS", chunk_chars)
    allowed = {EOT_TEXT} if allow_special else set()
    assert tok.encode(text, allow_special) == ref.encode(text, allowed_special=allowed, disallowed_special=())
    assert tok.encode_batch(texts, allow_special) == [
        ref.encode(t, allowed_special=allowed, disallowed_special=()) for t in texts]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_long_text_in_forked_child(tok, ref, monkeypatch):
  """A child forked after the worker threads exist must not wait on the parent's (absent) threads."""
  monkeypatch.setattr(tokenizer_lib, "free_cpus", lambda: 2)
  text = "Fork me, 'twas brillig.\n\n" * 20000  # > SPLIT_CHARS: uses the worker threads.
  expected = ref.encode_ordinary(text)
  assert tok.encode(text) == expected
  # The parent has worker threads (gpt.tokenizer names them tokenizer_N) the child will not have.
  assert any(t.name.startswith("tokenizer") for t in threading.enumerate())
  read_end, write_end = os.pipe()
  pid = os.fork()
  if pid == 0:  # Child: report whether it got the right ids, then leave without pytest's cleanup.
    os.close(read_end)
    os.write(write_end, b"ok" if tok.encode(text) == expected else b"bad")
    os._exit(0)
  os.close(write_end)
  ready, _, _ = select.select([read_end], [], [], 30)
  answer = os.read(read_end, 8) if ready else b"timed out"
  os.close(read_end)
  if not ready:
    os.kill(pid, signal.SIGKILL)
  os.waitpid(pid, 0)
  assert answer == b"ok"


def test_free_cpus_follows_load(monkeypatch):
  cpus = tokenizer_lib.cpu_count()
  for load, expected in ((0.0, cpus), (cpus - 1.0, 2 if cpus > 1 else 1), (cpus + 5.0, 1)):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert tokenizer_lib.free_cpus() == min(cpus, expected)


def test_cut_rule_whitespace_agrees_with_tiktoken():
  """Cuts rely on Python's \\s covering the Unicode White_Space that tiktoken's \\s means."""
  everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
  white_space = regex.findall(r"\p{White_Space}", everything)
  assert len(white_space) == 25 and all(c.isspace() for c in white_space)


def test_lone_surrogates_are_replaced_like_tiktoken(tok, ref):
  for text in ("\ud800", "a\udfffb", "\ud83d\ude00"):
    assert tok.encode(text) == ref.encode_ordinary(text)


def test_decode(tok):
  assert tok.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
  assert tok.decode((15496, 995)) == "Hello world"
  partial = tok.encode("😀")[:1]  # The first 3 of the emoji's 4 bytes.
  assert tok.decode_bytes(partial) == "😀".encode("utf-8")[:3]
  assert tok.decode(partial) == "\ufffd"  # errors="replace", as OpenAI's encoder.py.
  for bad in ([50257], [-1], [1, 2**40]):
    with pytest.raises(ValueError, match="not in the vocabulary"):
      tok.decode(bad)
  with pytest.raises(ValueError, match="1-D"):
    tok.decode(np.zeros((2, 2), dtype=np.int32))
  with pytest.raises(TypeError):
    tok.encode_batch("not a list")
  assert tok.encode_batch([]) == [] and tok.encode_batch(["", "a"]) == [[], [64]]


def test_load_folders_and_cache(tok, openai_fixture, hf_fixture, monkeypatch):
  sample = "Kant's \u201cCritique\u201d\n\n\tof  pure reason 😀 <|endoftext|>"
  expected = tok.encode(sample, allow_special=True)
  both = require_shared("data", "gpt2")  # Has both formats; OpenAI's names win.
  for folder in (openai_fixture, hf_fixture, both):
    loaded = get_tokenizer(folder)
    assert loaded.encode(sample, allow_special=True) == expected
    assert loaded.n_vocab == 50257 and loaded.eot_id == EOT
    assert get_tokenizer(str(folder)) is loaded
  assert get_tokenizer(hf_fixture).source == str(Path(hf_fixture).resolve())
  monkeypatch.chdir(openai_fixture.parent)
  assert get_tokenizer(openai_fixture.name) is get_tokenizer(openai_fixture)
  assert get_tokenizer() is tok and get_tokenizer(None) is tok


def test_save_round_trip(tok, hf_fixture, tmp_path):
  tok.save(tmp_path / "openai")
  sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
  assert sha(tmp_path / "openai" / "encoder.json") == ENCODER_SHA
  assert sha(tmp_path / "openai" / "vocab.bpe") == VOCAB_BPE_SHA
  tok.save(tmp_path / "hf", fmt="hf")
  for name in ("vocab.json", "merges.txt"):  # As transformers saved them for the fixture.
    assert (tmp_path / "hf" / name).read_bytes() == (hf_fixture / name).read_bytes()
  text = "round trip 'tis 123 \u00a0 😀"
  for folder in ("openai", "hf"):
    assert get_tokenizer(tmp_path / folder).encode(text) == tok.encode(text)
  # Windows line endings in the merges file, and a stray half of the other format, still load.
  crlf = tmp_path / "crlf"
  tok.save(crlf, fmt="hf")
  merges = crlf / "merges.txt"
  merges.write_bytes(merges.read_bytes().replace(b"\n", b"\r\n"))
  (crlf / "encoder.json").write_text("{}")
  assert get_tokenizer(crlf).encode(text) == tok.encode(text)
  with pytest.raises(GPTError, match="unknown tokenizer format"):
    tok.save(tmp_path / "x", fmt="sentencepiece")


def write_vocab(folder, encoder, merges, names=("encoder.json", "vocab.bpe")):
  """A vocabulary folder from an encoder dict and (a, b) merges."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / names[0]).write_text(json.dumps(encoder), encoding="utf-8")
  (folder / names[1]).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  return folder


TINY_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")]


def tiny_vocab():
  """256 byte tokens, 4 merges (ids 256..259) and <|endoftext|> = 260."""
  encoder = {char: b for b, char in bytes_to_unicode().items()}
  encoder.update({a + b: 256 + k for k, (a, b) in enumerate(TINY_MERGES)})
  encoder[EOT_TEXT] = 260
  return encoder


def test_tiny_vocabulary_merges_by_rank(tmp_path):
  """A hand-checkable vocabulary: 'hello world' -> hell|o|Ġw|o|r|l|d."""
  tiny = get_tokenizer(write_vocab(tmp_path / "tiny", tiny_vocab(), TINY_MERGES, ("vocab.json", "merges.txt")))
  assert tiny.encode("hello world") == [258, ord("o"), 259, ord("o"), ord("r"), ord("l"), ord("d")]
  assert (tiny.n_vocab, tiny.eot_id) == (261, 260)
  assert tiny.encode("<|endoftext|>", allow_special=True) == [260]


def corrupt_cases():
  """(name, encoder, merges or raw vocab.bpe text, expected message) for broken vocabularies."""
  enc = tiny_vocab()
  no_eot = {k: v for k, v in enc.items() if k != EOT_TEXT}
  bad_char = dict(enc, **{"a b": 261})
  swapped = [TINY_MERGES[1], TINY_MERGES[0]] + TINY_MERGES[2:]
  return [
      ("no eot", no_eot, TINY_MERGES, "has no <|endoftext|>"),
      ("bad char", bad_char, TINY_MERGES, "outside GPT-2's byte alphabet"),
      ("swapped merges", enc, swapped, r"vocab.bpe: merge 1 'l l' must make token id 256"),
      ("missing merge", enc, TINY_MERGES[:3], "do not belong together"),
      ("bad line", enc, "#version: 0.2\nh e\nhell\n", "vocab.bpe line 3"),
  ]


@pytest.mark.parametrize("case", corrupt_cases(), ids=lambda c: c[0])
def test_corrupt_vocabulary_errors(tmp_path, case):
  _, encoder, merges, message = case
  folder = write_vocab(tmp_path, encoder, merges if isinstance(merges, list) else [])
  if isinstance(merges, str):
    (folder / "vocab.bpe").write_text(merges)
  with pytest.raises(GPTError, match=message) as err:
    get_tokenizer(folder)
  assert "\n" not in str(err.value)


def test_folder_errors(tmp_path):
  assets = tokenizer_lib.importlib.resources.files("gpt").joinpath("assets", "gpt2")
  cases = {
      "missing": ("does not exist", None),
      "empty": ("has no tokenizer files.*encoder.json \\+ vocab.bpe.*vocab.json \\+ merges.txt", {}),
      "only_encoder": ("has encoder.json but not vocab.bpe", {"encoder.json": "{}"}),
      "only_merges": ("has merges.txt but not vocab.json", {"merges.txt": ""}),
      "truncated": ("encoder.json is not valid JSON",
                    {"encoder.json": assets.joinpath("encoder.json").read_text()[:5000],
                     "vocab.bpe": assets.joinpath("vocab.bpe").read_text()}),
      "not_a_dict": ("must be a JSON object", {"vocab.json": "[1, 2]", "merges.txt": ""}),
  }
  for name, (message, files) in cases.items():
    folder = tmp_path / name
    if files is not None:
      folder.mkdir()
      for file, text in files.items():
        (folder / file).write_text(text, encoding="utf-8")
    with pytest.raises(GPTError, match=message) as err:
      get_tokenizer(folder)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
  (tmp_path / "file.txt").write_text("x")
  with pytest.raises(GPTError, match="is a file, not a folder"):
    get_tokenizer(tmp_path / "file.txt")


def test_package_files_are_openais():
  assets = tokenizer_lib.importlib.resources.files("gpt").joinpath("assets", "gpt2")
  assert hashlib.sha256(assets.joinpath("encoder.json").read_bytes()).hexdigest() == ENCODER_SHA
  assert hashlib.sha256(assets.joinpath("vocab.bpe").read_bytes()).hexdigest() == VOCAB_BPE_SHA

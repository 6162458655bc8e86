"""Zero/one/few-shot evaluation tasks, by name.

  lambada                           lambada.py          last word: acc, acc_last_token, ppl
  hellaswag piqa arc_easy           multiple_choice.py  acc, acc_norm, acc_norm_tokens
  arc_challenge winogrande                              (+ acc_uncond for ARC; winogrande: acc)
  boolq sst2                        cloze.py            PET patterns: acc_p0.. and ensemble acc
  wikitext2 text                    perplexity.py       token/word/byte perplexity, bits_per_byte
  arithmetic_2da 2ds 3da 3ds 4da    arithmetic.py       generated answers: exact_match (GPT-3 3.9.1)
  4ds 5da 5ds 2dm 1dc
  cycle_letters anagrams1 anagrams2 scramble.py         generated answers: exact_match (GPT-3 3.9.2)
  random_insertion reversed_words
  lambada_generate                  lambada_generate.py the last word generated: exact_match

`gpt.evals.runner.evaluate` runs one task at one shot count; `gpt.evaluate.run` is the eval mode.
`gpt.evals.sources` says where each task's files come from; `gpt.evals.fetch` downloads a missing
one on first use from its original release (or `eval.mirror`) and `gpt.evals.data_checks` checks
it; `gpt.evals.tfds_source` reads the tasks TensorFlow Datasets carries instead.
"""

from __future__ import annotations

from typing import Any, Callable

from gpt.errors import GPTError
from gpt.evals import arithmetic, scramble
from gpt.evals.base import Task
from gpt.evals.cloze import SST2, BoolQ
from gpt.evals.lambada import Lambada
from gpt.evals.lambada_generate import LambadaGenerate
from gpt.evals.multiple_choice import ARC, PIQA, HellaSwag, Winogrande
from gpt.evals.perplexity import TextFile, WikiText2

# name -> factory taking the config's `eval` section (a ConfigDict, dict or None for defaults).
TASKS: dict[str, Callable[[Any], Task]] = {
    "lambada": lambda e: Lambada(),
    "hellaswag": lambda e: HellaSwag(),
    "piqa": lambda e: PIQA(),
    "arc_easy": lambda e: ARC("Easy", _get(e, "unconditional_norm", True)),
    "arc_challenge": lambda e: ARC("Challenge", _get(e, "unconditional_norm", True)),
    "winogrande": lambda e: Winogrande(),
    "boolq": lambda e: BoolQ(),
    "sst2": lambda e: SST2(),
    "wikitext2": lambda e: WikiText2(_get(e, "stride", 0)),
    "text": lambda e: TextFile(_get(e, "text_path", ""), _get(e, "stride", 0)),
    # Generative tasks (gpt.evals.generative): the model writes the answer, scored by exact match.
    **{name: (lambda e, name=name: arithmetic.Arithmetic(name)) for name in arithmetic.NAMES},
    **{name: (lambda e, name=name: scramble.Scramble(name)) for name in scramble.NAMES},
    "lambada_generate": lambda e: LambadaGenerate(),
}


def _get(section: Any, key: str, default: Any) -> Any:
  if section is None:
    return default
  return section.get(key, default)


def get_task(name: str, eval_config: Any = None) -> Task:
  """The task called `name`, set up from the config's `eval` section."""
  if name not in TASKS:
    raise GPTError(f"unknown eval task {name!r}; choose from {', '.join(TASKS)}")
  return TASKS[name](eval_config)


__all__ = ["TASKS", "get_task", "Task"]

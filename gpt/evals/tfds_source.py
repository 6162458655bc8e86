"""The eval tasks that TensorFlow Datasets carries, read with `tfds.data_source` (eval.source=tfds).

An alternative to the released files (gpt.evals.sources) for a machine where TFDS data is
already prepared: each TFDS record becomes the same doc the task's own file loader makes from the
same item, so prompts and scores do not depend on where the data came from. The records' sha256
is recorded with the results in place of the files' hashes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from gpt.errors import GPTError


# task -> (TFDS name, scored split, few-shot split or None: demonstrations from the scored split).
# Features as TFDS's builders define them (tensorflow_datasets/{datasets,text}/...).
TFDS_TASKS: dict[str, tuple[str, str, str | None]] = {
    "hellaswag": ("hellaswag", "validation", None),
    "piqa": ("piqa", "validation", None),
    "arc_easy": ("ai2_arc/ARC-Easy", "test", "train"),
    "arc_challenge": ("ai2_arc/ARC-Challenge", "test", "train"),
    "winogrande": ("winogrande", "validation", "train_s"),
    "boolq": ("bool_q", "validation", None),
    "sst2": ("glue/sst2", "validation", "train"),
}
_ARC_LABELS = "ABCDE"  # TFDS's ClassLabel names for ARC (it maps labels 1-5 to A-E)


def _plain(value: Any) -> Any:
  """A TFDS record value as plain Python: bytes -> str, arrays -> lists, numpy scalars -> items."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return _plain(value.tolist())
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _tfds_doc(task: Any, r: dict, where: str) -> Any:
  """One TFDS record as the doc the task's file loader makes from the same item."""
  from gpt.evals.cloze import SST2, BoolQ
  from gpt.evals.multiple_choice import ARC, PIQA, HellaSwag, Winogrande
  name = task.name
  if name == "hellaswag":
    return HellaSwag.from_context(r["activity_label"], r["context"], r["endings"], r["label"])
  if name == "piqa":
    return PIQA.to_doc(r, r["label"])
  if name.startswith("arc_"):
    choices = [{"text": t, "label": _ARC_LABELS[l]}
               for t, l in zip(r["choices"]["text"], r["choices"]["label"])]
    return ARC.to_doc({"id": r.get("id"), "question": {"stem": r["question"], "choices": choices},
                       "answerKey": _ARC_LABELS[r["answerKey"]]})
  if name == "winogrande":
    return Winogrande.to_doc({**r, "answer": str(r["label"] + 1)}, where)
  if name == "boolq":
    return BoolQ.to_doc({**r, "answer": bool(r["answer"])}, where)
  if name == "sst2":
    return SST2.to_doc(r["sentence"].strip(), r["label"])  # GLUE's sentences end with a space
  raise GPTError(f"task {name!r} has no TFDS reader")


def _tfds_split(task: Any, name: str, split: str, data_dir: str) -> tuple[list[Any], str]:
  """(docs, sha256 of the records) of one split of a prepared TFDS dataset."""
  import tensorflow_datasets as tfds
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises many types (DatasetNotFoundError, ValueError, ...)
    raise GPTError(f"cannot open TFDS dataset {name!r} split {split!r}: {str(e).splitlines()[0]} "
                   f"(prepare it with `tfds build {name.split('/')[0]}`, or use eval.source=files)") from None
  digest, docs = hashlib.sha256(), []
  for i in range(len(source)):
    record = _plain(source[i])
    digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    try:
      docs.append(_tfds_doc(task, record, f"tfds:{name}/{split}[{i}]"))
    except (KeyError, IndexError, TypeError) as e:
      raise GPTError(f"tfds:{name}/{split}[{i}] is not a {task.name} record (no {e})") from None
  return docs, digest.hexdigest()


def load_tfds(task: Any, data_dir: str = "") -> Any:
  """The task's data read with `tfds.data_source` (TFDS's record order; see TFDS_TASKS)."""
  from gpt.evals.base import TaskData
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    raise GPTError("eval.source=tfds needs TensorFlow Datasets: pip install -e '.[tfds]'") from None
  name, split, fewshot = TFDS_TASKS[task.name]
  docs, digest = _tfds_split(task, name, split, data_dir)
  files = {f"tfds:{name}/{split}": digest}
  pool = None
  if fewshot:
    pool, files[f"tfds:{name}/{fewshot}"] = _tfds_split(task, name, fewshot, data_dir)
  return TaskData(docs, pool, files, f"tfds {fewshot}" if fewshot else f"tfds {split} (minus the item)")

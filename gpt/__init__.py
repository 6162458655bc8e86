"""GPT-2 in JAX/Flax NNX: one model, one forward pass, every mode a config (`python -m gpt.main`).

Each concern has one module; follow the data from the command line:

  main.py                  the entry point: the config, the console, `config.mode` -> a mode's `run`
  config.py                every field with its comment; the GPT-2 size table
  console.py, errors.py    what a command prints; GPTError, the one-line error a user can cause
  weights.py               the one way weights come in and go out (`config.init`: a size, a folder,
                           a workdir), with the model shape and the tokenizer
  formats/                 the file formats: OpenAI's TF checkpoint (tf_checkpoint, tf_table),
                           Hugging Face (hf_checkpoint), the renames between them (convert)
  download.py              fetching released models (resumable, atomic); download_checks.py what a
                           fetched file must be; ranged_file.py a remote zip read by Range requests;
                           hashing.py the one file hash
  tokenizer.py, encode.py  GPT-2's BPE; text -> token files
  model.py                 the model's layers and its one forward pass; heads.py what is computed at
                           the top of the stack (logits, training loss, attention probabilities);
                           matmul.py the one float32-accumulating matmul; kv_cache.py the decoding
                           cache and the position/mask builder; attention.py its attention
                           function and formulations; output_loss.py the tied head's fused training loss;
                           quantize.py int8 weights; kernels/ the CPU kernels (gemv for decoding,
                           gemm for training's matmuls, native.py builds them, pool.h threads them)
  data.py                  training data -> seeded, resumable windows
  train.py                 train mode: the loop; train_step.py the jitted steps; optim.py the
                           optimizer; sharding.py the mesh; checkpoint.py orbax checkpoints;
                           train_log.py logs and metrics; workdir_lock.py one run per workdir;
                           stop_signals.py Ctrl-C/kill as a clean stop; lora.py low-rank adapters
  sampling.py, sample.py   the decoder (knows no model); sample and interactive modes;
                           decoding.py the model laid out for decoding (prepare_for_decoding);
                           prompt_reader.py the REPL's input
  evaluate.py, evals/      eval mode; the tasks, their data (sources, fetch, data_checks) and scorer
  harness.py               this model inside lm-evaluation-harness
  attention_view.py        attention mode; attention_page.py its HTML page
  compile.py               compile mode: compiles a run for a TPU slice without one; chips.py the
                           chips' figures and step-time estimates; compile_tables.py what it prints
  export.py                `python -m gpt.export`: any loadable model to an OpenAI, HF or int8 folder
"""

"""Weight file formats, each in its own module, all speaking one interchange form.

  convert.py        our stacked parameter tree <-> a flat dict of OpenAI-named numpy arrays
                    (`wte`, `h0/attn/c_attn/w`, ...), the shape fields, shape checks
  tf_checkpoint.py  OpenAI's TensorFlow checkpoint (hparams.json + model.ckpt.*), read and written
  tf_table.py       the LevelDB SSTable and protobuf plumbing of the checkpoint's .index file
  hf_checkpoint.py  Hugging Face GPT-2 folders (config.json + model.safetensors), read and written

Callers load and export through `gpt.weights`, which picks the format; a new format is a new
module here that produces or consumes the flat dict.
"""

"""A 4-layer, 256-wide GPT-2 trained from scratch: CPU smoke runs and tests in seconds.

  python -m gpt.main --config=configs/tiny.py --workdir=/tmp/run \
      --config.data.path=../shared/data/kant/critique_of_pure_reason.txt
"""
from gpt.config import base_config


def get_config():
  c = base_config()
  c.init = "scratch"
  c.model.n_layer = 4
  c.model.n_embd = 256
  c.model.n_head = 4
  c.model.n_ctx = 256
  c.train.seq_len = 128
  c.train.batch_size = 8
  c.train.steps = 300
  c.train.optimizer = "adamw"
  c.train.learning_rate = 1e-3
  c.train.schedule = "cosine"
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.1
  c.train.b2 = 0.99
  c.train.val_every = 100
  c.train.sample_every = 100
  c.train.save_every = 100
  return c

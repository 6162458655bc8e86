"""What the layer scan copies in the compiled float32 train step, with and without the in-place routes.

train-scan, session 8: gpt.model reads each layer's dense weights in place in the stacked parameter
(WEIGHTS_IN_PLACE) and adds each layer's dW in place into the stacked gradient (GRADS_IN_PLACE).
This compiles bench_train's program (nothing allocated) per route and counts, in the optimized HLO,
the dynamic-slices of a weight's [1, K, N] out of a stack and the dynamic-update-slices into an
[L, K, N] stack, the in-place kernel calls, and XLA's temporary buffer (memory_analysis): the check
that a route removed the copies it is for, next to bench_train's timings.

  python experiments/scan_copies.py --shapes=30m,chapter
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train  # noqa: E402  (experiments/ is not a package)

ROUTES = {"in place (default)": (True, True), "weights in place, dW copied (-gslice)": (True, False),
          "both copied (-wslice)": (False, False)}


def count(shape, weights: bool, grads: bool) -> dict:
  """Copy counts and temp bytes of the compiled step at `shape` with the routes as given."""
  from gpt import model
  from gpt.kernels import gemm
  L, D = shape[0], shape[1]
  saved = model.WEIGHTS_IN_PLACE, model.GRADS_IN_PLACE
  model.WEIGHTS_IN_PLACE, model.GRADS_IN_PLACE = weights, grads
  try:
    step, state, batch, frozen = bench_train.train_program(shape, "float32", True, abstract=True)
    compiled = step.lower(state, batch, frozen).compile()
  finally:
    model.WEIGHTS_IN_PLACE, model.GRADS_IN_PLACE = saved
  hlo = compiled.as_text()
  kn = ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D))
  return {"slices": sum(hlo.count(f"dynamic_slice_sizes={{1,{k},{n}}}") for k, n in kn),
          "writes": sum(hlo.count(f"f32[{L},{k},{n}]{{2,1,0}} dynamic-update-slice(") for k, n in kn),
          "layer calls": hlo.count(gemm.LAYER_TARGET) + hlo.count(gemm.LAYER_ADD_TARGET),
          "temp MiB": compiled.memory_analysis().temp_size_in_bytes / 2**20}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="30m,chapter")
  args = parser.parse_args()
  print("| shape | route | weight slices | dW writes | in-place kernel calls | XLA temp MiB |")
  print("|---|---|---|---|---|---|")
  for name in args.shapes.split(","):
    for route, (weights, grads) in ROUTES.items():
      c = count(bench_train.SHAPES[name], weights, grads)
      print(f"| {name} | {route} | {c['slices']} | {c['writes']} | {c['layer calls']} | "
            f"{c['temp MiB']:.0f} |", flush=True)


if __name__ == "__main__":
  main()

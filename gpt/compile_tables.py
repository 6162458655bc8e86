"""The tables compile mode prints: one per compiled program, the multi-host arithmetic, and the
search's ranking, from the rows gpt.compile.Planner makes.

Why apart from compiling: a row (a dict, also written to compile.json) is the whole answer; how it
reads on a terminal is a separate concern, shared by compile mode, the sweep's --check_fit and
experiments/bench_compile.py (human_bytes, human_rate).
"""

from __future__ import annotations

from gpt.chips import GIB


def human_bytes(n: int | None) -> str:
  """`n` bytes in GiB, MiB or KiB; "-" for None (unknown)."""
  if n is None:
    return "-"
  if n >= GIB:
    return f"{n / GIB:.2f} GiB"
  if n >= 2 ** 20:
    return f"{n / 2 ** 20:.1f} MiB"
  return f"{n / 2 ** 10:.1f} KiB"


def human_rate(r: float | None) -> str:
  """A rate with thousands separators; "-" for None (no estimate)."""
  return "-" if r is None else f"{r:,.0f}"


def format_table(row: dict) -> str:
  """One program's table: per-chip memory, fit, compile time and the estimates."""
  m, pc = row["model"], row["per_chip"]
  decode = row["program"] == "decode"
  head = (f"{m['n_layer']} layers x {m['n_embd']} ({m['params'] / 1e6:.0f}M params), "
          f"{m['dtype']} compute")
  if decode:
    lines = [f"decode step (sampler, one chip as sample mode uses): {head}, {row['batch_size']} row(s), "
             f"KV cache of {row['seq_len']} slots; on 1 {row['chip']} of {row['topology']}"]
    items = [("parameters", pc["params"]), ("KV cache", pc["cache"]),
             ("decode state", pc["decode_state"])]
  else:
    mesh = " ".join(f"{k}={v}" for k, v in row["mesh"].items())
    lora = row.get("lora")
    lines = [f"{row['program']} step: {head}, remat={row['remat']}, batch {row['batch_size']} x "
             f"{row['seq_len']}" + (f", grad_accum {row['grad_accum']}" if row["program"] == "train" else "")
             + (f", LoRA rank {lora['rank']} on {','.join(lora['targets'])}" if lora else "")
             + f"; mesh {mesh} on {row['topology']} ({row['chips']} x {row['chip']})"]
    items = [("parameters" + (" (adapters)" if lora else ""), pc["params"]),
             ("optimizer state", pc["opt_state"])]
    if pc.get("frozen"):
      items.append(("frozen base weights", pc["frozen"]))
    items.append(("batch", pc["batch"]))
  if "temporaries" in pc:
    items += [("temporaries", pc["temporaries"]), ("code", pc["code"]),
              ("outputs not donated", pc["outputs"] - pc["aliased"]),
              ("total (compiler)", pc["total"])]
  items.append(("chip HBM", row["hbm"]))
  width = max(len(k) for k, _ in items) + 2
  lines += [f"  {k:<{width}}{human_bytes(v):>12}" for k, v in items]
  if row["fits"]:
    verdict = "fits" if row["hbm"] else "compiles (no HBM figure for this device)"
  else:
    oom = row.get("oom", {})
    verdict = (f"DOES NOT FIT: the compiler needs {human_bytes(oom.get('needed'))} of "
               f"{human_bytes(oom.get('available'))} ({row.get('error', '')})" if "error" in row else
               "DOES NOT FIT: total exceeds the chip's HBM")
  lines.append(f"  {'verdict':<{width}}{verdict}")
  lines.append(f"  {'compile time':<{width}}{row['compile_s']:>10.1f} s"
               + (f" (XLA effort: {row['effort']})" if row.get("effort") else ""))
  if row["step_s"] is None:
    what = "HBM bandwidth" if decode else "peak FLOP/s"
    lines.append(f"  {'est. step':<{width}}- ({what} of {row['chip']} unknown"
                 + ("" if decode else ": set --config.train.peak_flops") + ")")
  elif decode:
    lines.append(f"  {'est. step':<{width}}{row['step_s'] * 1e3:>10.2f} ms = "
                 f"{human_rate(row['tokens_per_s'])} tokens/s at most: each step reads "
                 f"{human_bytes(row['bytes_per_step'])} at {row['hbm_bandwidth'] / 1e9:.0f} GB/s HBM")
  else:
    lines.append(f"  {'est. step':<{width}}{row['step_s']:>10.3f} s = {human_rate(row['tokens_per_s'])} "
                 f"tokens/s at {row['mfu']:.0%} MFU of {row['peak_flops'] / 1e12:.0f} TFLOP/s bf16 per chip")
  return "\n".join(lines)


def format_multihost(row: dict) -> str:
  """How a train row's slice spreads over hosts, and the command each host runs."""
  mh = row["multihost"]
  return (f"multi-host: {row['chips']} chips on {mh['hosts']} host(s), {mh['chips_per_host']} each; "
          f"run the same command on every host with --config.mesh.distributed=true (and the mode "
          f"you want); each host reads {mh['rows_per_host']} of the {row['batch_size']} rows per "
          f"step, {mh['rows_per_chip_micro']} per chip per micro-batch")


def format_search(rows: list[dict]) -> str:
  """The search's ranking as a Markdown table."""
  out = ["| rank | remat | fsdp | data | grad_accum | rows/chip/micro | per-chip total | fits | "
         "est. tokens/s | compile |", "|---|---|---|---|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    total = r["per_chip"].get("total") or r.get("oom", {}).get("needed")
    out.append(f"| {i} | {r['remat']} | {r['mesh']['fsdp']} | {r['mesh']['data']} | {r['grad_accum']} | "
               f"{r['multihost']['rows_per_chip_micro']} | {human_bytes(total)} | "
               f"{'yes' if r['fits'] else 'no'} | {human_rate(r['tokens_per_s'])} | {r['compile_s']:.0f}s |")
  return "\n".join(out)

r"""Regenerates the results table of bench/README.md on this machine's backend.

    python bench/results_table.py              # CPU rows here; GPU / TPU rows on an accelerator
    python bench/results_table.py --dry_run    # print the rows, leave the README alone

Runs bench/train_step.py once per row of ROWS that fits the backend (each in a fresh process,
so one setting cannot warm the next), and replaces that backend's rows in the table between the
`<!-- results -->` markers, stamped with the date and the commit. Rows of other backends stay as
they are, including the GPU rows marked "not measured" until someone runs this on a GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'bench', 'README.md')
START, END = '<!-- results -->', '<!-- /results -->'
HEADER = (
  '| config | backend | batch | dtype | step (s) | images/s | MFU | vs | peak mem | date | commit |\n'
  '|---|---|---|---|---|---|---|---|---|---|---|'
)

# (label, backend, train_step.py arguments)
ROWS = (
  ('ViT-Ti/16 (issue reference): unrolled, oneDNN dots', 'cpu', ['--preset=vit_ti16']),
  (
    'ViT-Ti/16, scanned blocks',
    'cpu',
    ['--config=bench/train_step.py:vit_ti16', '--config.model.scan_blocks=True'],
  ),
  (
    'ViT-Ti/16, Eigen dots',
    'cpu',
    ['--config=bench/train_step.py:vit_ti16', '--config.xla_cpu_matmul=eigen'],
  ),
  (
    "ViT-Ti/16, XLA's default YNNPACK dots",
    'cpu',
    ['--config=bench/train_step.py:vit_ti16', '--config.xla_cpu_matmul=ynnpack'],
  ),
  ('tiny (digits default)', 'cpu', ['--config=configs/tiny.py', '--steps=20']),
  (
    'ViT-B/16',
    'gpu',
    ['--config=configs/vitb16.py', '--batch=128', '--config.model.dtype=bfloat16'],
  ),
  (
    'ViT-L/16',
    'gpu',
    ['--config=configs/vitl16.py', '--batch=128', '--config.model.dtype=bfloat16'],
  ),
  (
    'ViT-H/14',
    'gpu',
    ['--config=configs/vith14.py', '--batch=64', '--config.model.dtype=bfloat16'],
  ),
)

_DRY = flags.DEFINE_bool('dry_run', False, 'Print the rows only.')
_STEPS = flags.DEFINE_integer('steps', 8, 'Timed steps per row.')


def _backend() -> str:
  out = subprocess.run(
    [sys.executable, '-c', 'import jax; print(jax.default_backend())'],
    capture_output=True,
    text=True,
    check=True,
  )
  return out.stdout.strip().splitlines()[-1]


def _commit() -> str:
  try:
    return subprocess.run(
      ['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def run_row(args: list[str]) -> dict:
  cmd = [sys.executable, 'bench/train_step.py', f'--steps={_STEPS.value}', '--xla_unrolled=false']
  proc = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True)
  lines = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'{" ".join(cmd + args)} failed:\n{proc.stderr[-3000:]}')
  return json.loads(lines[-1][len('RESULT ') :])


def format_row(label: str, r: dict, date: str, commit: str) -> str:
  versus = 'measured matmul peak' if r['backend'] == 'cpu' else 'bf16 datasheet peak'
  mem = r.get('peak_memory_bytes')
  return (
    f'| {label} | {r["backend"]} ({r["device"]}) | {r["batch"]} | {r["dtype"]} | '
    f'{r["step_s_used"]:.3f} | {r["images_per_s"]:.2f} | {100 * r["mfu"]:.1f}% | {versus} | '
    f'{"-" if not mem else f"{mem / 2**30:.1f} GiB"} | {date} | {commit} |'
  )


def main(argv):
  del argv
  backend = _backend()
  date, commit = datetime.date.today().isoformat(), _commit()
  new_rows = {}
  for label, kind, args in ROWS:
    if kind != backend:
      continue
    r = run_row(args)
    new_rows[label] = format_row(label, r, date, commit)
    print(new_rows[label], flush=True)
  if _DRY.value:
    return
  text = open(README).read()
  if START not in text or END not in text:
    raise SystemExit(f'{README} has no {START} ... {END} block to update.')
  head, rest = text.split(START, 1)
  table, tail = rest.split(END, 1)
  old = {}
  for line in table.strip().splitlines()[2:]:
    m = re.match(r'\|\s*([^|]+?)\s*\|', line)
    if m:
      old[m.group(1)] = line
  rows = []
  for label, kind, _ in ROWS:
    if label in new_rows:
      rows.append(new_rows[label])
    elif label in old:
      rows.append(old[label])
    else:
      rows.append(f'| {label} | {kind} | not measured | | | | | | | | |')
  with open(README, 'w') as f:
    f.write(head + START + '\n' + HEADER + '\n' + '\n'.join(rows) + '\n' + END + tail)


if __name__ == '__main__':
  app.run(main)

"""Chaos campaigns: SIGKILL-and-resume training runs, and a corpus of hostile image files.

  python tools/chaos.py [--task spixnet|disco] [--kills 5] [--files N] [--seed 0] [--root DIR]
      [--json out.json]

Kill/resume (tools/kill_resume.py): a reference run of the tiny stage-1 config (`--task disco`:
the tiny colorizer with dropout, k-means anchors, spectral norm and the VGG19 term), then the same
command killed with SIGKILL `--kills` times (mid-step, mid checkpoint write, between steps) and
rerun each time; the final parameters, optimizer state, BatchNorm statistics and spectral-norm
vectors of both runs are compared bit for bit. Hostile input (tools/hostile_corpus.py): `--files`
bad or odd files through the image-folder dataset and the colorize command. Ends with one summary
line; exits 1 when a kill was not survived, a resume was not bit-identical, a file was misjudged or
anything crashed.
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import hostile_corpus, kill_resume  # pylint: disable=g-import-not-at-top


def summary(kills: dict | None, files: dict | None) -> str:
  """The one-line verdict of both campaigns (either may be None when skipped)."""
  parts = []
  if kills is not None:
    parts.append(f"kills survived {kills['kills_survived']}/{kills['kills']}, resumes "
                 f"bit-identical {'yes' if kills['resumes_bit_identical'] else 'NO'} (max |diff| "
                 f"{kills['max_abs_diff']:g} over {len(kills['compared'])} arrays)")
  if files is not None:
    parts.append(f"files tried {files['files_tried']}, rejected with a clear error "
                 f"{files['rejected_with_clear_error']}, colorized {files['colorized']}, "
                 f"misjudged {files['wrong']}, crashes {files['crashes']}")
  return 'chaos: ' + '; '.join(parts)


def passed(kills: dict | None, files: dict | None) -> bool:
  ok = True
  if kills is not None:
    ok &= kills['kills_survived'] == kills['kills'] and kills['resumes_bit_identical']
  if files is not None:
    ok &= files['crashes'] == 0 and files['wrong'] == 0
  return bool(ok)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=5, help='SIGKILLs of the training run (0: skip)')
  parser.add_argument('--task', choices=kill_resume.TASKS, default='spixnet',
                      help='the training run killed: stage 1 or the colorizer (stage 2)')
  parser.add_argument('--files', type=int, default=None,
                      help='hostile files (default: the base corpus, about 60; more adds seeded '
                           'variants; 0: skip)')
  parser.add_argument('--seed', type=int, default=0, help='kill moments')
  parser.add_argument('--root', help='work directory (default: a temporary one, removed)')
  parser.add_argument('--json', help='also write both campaigns\' full results here')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.root or tmp
    kills = files = None
    if args.kills:
      print(f'kill/resume ({args.task}): {args.kills} kills ...', flush=True)
      kills = kill_resume.campaign(os.path.join(root, 'kills'), args.kills, args.seed,
                                   task=args.task)
    if args.files != 0:
      print(f"hostile input: {args.files or 'the base corpus of'} files ...", flush=True)
      files = hostile_corpus.campaign(os.path.join(root, 'files'), args.files)
      files = {k: v for k, v in files.items() if k != 'details'} | {
          'problems': [d for d in files['details'] if d['problems']]}
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'kills': kills, 'files': files}, f, indent=2, default=str)
  print(summary(kills, files))
  return 0 if passed(kills, files) else 1


if __name__ == '__main__':
  sys.exit(main())

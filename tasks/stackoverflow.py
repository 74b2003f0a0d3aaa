"""`stackoverflow_tags`: tag generation over Stack Overflow questions, as a registered task.

The same task gin/examples/stackoverflow_tags.gin registers (title + body -> tags, prefix
'assign tag: ', accuracy and tag-set P/R/F1), importable by name so `t5tpu study
--tasks=stackoverflow_tags` can run it. By default it reads the sample shipped in tasks/data;
point it at the full data with STACKOVERFLOW_DATA_DIR (a folder, local or gs://, holding
stackoverflow_train.tsv and stackoverflow_validation.tsv).
"""
from __future__ import annotations

import os

from tasks import custom

_HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


def paths() -> dict:
  root = os.environ.get('STACKOVERFLOW_DATA_DIR')
  if root:
    return {s: f'{root.rstrip("/")}/stackoverflow_{s}.tsv' for s in ('train', 'validation')}
  return {s: os.path.join(_HERE, f'stackoverflow_sample_{s}.tsv') for s in ('train', 'validation')}


custom.register_file_task(
    name='stackoverflow_tags', paths=paths(), format='tsv', input_field=['title', 'body'],
    target_field='tags', prefix='assign tag: ', metric='tagging')

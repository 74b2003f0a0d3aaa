"""`t5tpu gcs`: set up a GCS bucket for t5tpu, copy checkpoints and data in, and size it.

  t5tpu gcs init gs://BUCKET [--project P] [--location us-central1]
  t5tpu gcs cp SRC DST          a file or directory, local <-> gs:// (either way)
  t5tpu gcs du gs://BUCKET      what the bucket holds against the 5 GB free tier, and what
                                each model size needs there

The layout `init` makes (empty "folder" objects, as the Cloud console does):
  gs://BUCKET/models/   MODEL_DIRs of runs and imported checkpoints (INITIAL_CHECKPOINT_PATH)
  gs://BUCKET/data/     custom data files, vocabularies, cached seqio tasks
  gs://BUCKET/tfds/     a TFDS data dir (--tfds_data_dir)

Bucket metadata (create, look up, list sizes) goes through google-cloud-storage; file copies
through t5tpu.storage (gcsfs), the same path training uses. With STORAGE_EMULATOR_HOST set
(a local test server) both talk to it anonymously.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

from t5tpu import errors
from t5tpu import storage

LAYOUT = ('models/', 'data/', 'tfds/')
FREE_TIER_BYTES = 5 * 10 ** 9  # "5 GB-months" of Standard storage (decimal GB)
# Always Free storage applies to Standard buckets in these regions only.
FREE_TIER_REGIONS = ('US-WEST1', 'US-CENTRAL1', 'US-EAST1')


def client(project: Optional[str] = None):
  """A google-cloud-storage client: anonymous against a local server, else the user's
  application-default credentials (`gcloud auth application-default login`, or Colab's
  `google.colab.auth.authenticate_user()`)."""
  from google.cloud import storage as gcs
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    from google.auth.credentials import AnonymousCredentials
    return gcs.Client(project=project or 'test', credentials=AnonymousCredentials())
  return gcs.Client(project=project)


def _bucket_name(url: str) -> str:
  bucket, key = storage.split_gs(url)
  if key.strip('/'):
    raise ValueError(f'{url}: give the bucket only (gs://BUCKET)')
  return bucket


def init(url: str, project: Optional[str] = None, location: str = 'us-central1',
         out=sys.stdout) -> dict:
  """Creates the bucket if it does not exist, checks it if it does, and adds the layout."""
  name = _bucket_name(url)
  from google.api_core import exceptions
  c = client(project)
  try:
    bucket = c.lookup_bucket(name)
  except exceptions.Forbidden as e:
    raise SystemExit(f'gs://{name} exists but this account cannot read it (bucket names are '
                     f'global: pick another name): {e}') from e
  created = bucket is None
  if created:
    bucket = c.create_bucket(name, location=location)
    print(f'created gs://{name} in {bucket.location} ({bucket.storage_class})', file=out)
  else:
    print(f'gs://{name} exists: {bucket.location} ({bucket.storage_class})', file=out)
  for folder in LAYOUT:
    blob = bucket.blob(folder)
    if not blob.exists():
      blob.upload_from_string(b'')
      print(f'  added gs://{name}/{folder}', file=out)
    else:
      print(f'  gs://{name}/{folder} is there', file=out)
  region = (bucket.location or '').upper()
  if region not in FREE_TIER_REGIONS or (bucket.storage_class or 'STANDARD') != 'STANDARD':
    print(f'  note: the free tier covers Standard storage in {", ".join(FREE_TIER_REGIONS)} '
          f'only; this bucket is {bucket.storage_class} in {region}', file=out)
  print(f'  MODEL_DIR=gs://{name}/models/<run>   --tfds_data_dir=gs://{name}/tfds', file=out)
  return {'bucket': name, 'created': created, 'location': region,
          'storage_class': bucket.storage_class}


def usage(url: str) -> Dict[str, int]:
  """Bytes per top-level folder of a bucket (or of a prefix in it), via object listings."""
  bucket, key = storage.split_gs(url)
  prefix = key.strip('/') + '/' if key.strip('/') else ''
  sizes: Dict[str, int] = {}
  for blob in client().list_blobs(bucket, prefix=prefix or None):
    rest = blob.name[len(prefix):]
    top = rest.split('/', 1)[0] + ('/' if '/' in rest else '')
    sizes[top] = sizes.get(top, 0) + int(blob.size or 0)
  return dict(sorted(sizes.items()))


# ----------------------------------------------------------------------------- model sizes

def model_storage_needs(names: Optional[Sequence[str]] = None) -> List[dict]:
  """Bytes each named model takes on GCS, from abstract shapes (nothing is allocated).

  params_fp32: an exported or converted checkpoint (parameters only); params_bf16: the same
  in bfloat16; train_checkpoint: what t5tpu/t5x save each checkpoint_N (float32 parameters +
  the Adafactor state, whose factored second moments are small).
  """
  import jax
  import numpy as np
  from t5tpu import layout, model_shapes, models, network, optimizers, partitioning
  configs = model_shapes.named_configs()
  rows = []
  for name in names or [n for n in configs if not n.endswith('tiny')]:
    cfg = configs[name]
    model = models.EncoderDecoderModel(module=network.Transformer(cfg),
                                       optimizer_def=optimizers.Adafactor())
    params = layout.ParamLayout.for_model(
        model, partitioning.PjitPartitioner(devices=jax.devices()[:1])).abstract
    tx = model.optimizer_def.make(1e-3)
    opt = jax.eval_shape(tx.init, params)
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    opt_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                    for a in jax.tree.leaves(opt))
    rows.append({'model': name, 'params': count, 'params_fp32': 4 * count,
                 'params_bf16': 2 * count, 'train_checkpoint': 4 * count + opt_bytes})
  return sorted(rows, key=lambda r: (r['model'].split('/')[0], r['params']))


def _size(n: float) -> str:
  for unit, div in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if n >= div:
      return f'{n / div:.2f} {unit}'
  return f'{int(n)} B'


def needs_table(rows: List[dict]) -> str:
  lines = ['| model | parameters | params fp32 | params bf16 | training checkpoint | '
           'checkpoints in 5 GB |', '|---|---|---|---|---|---|']
  for r in rows:
    fit = math.floor(FREE_TIER_BYTES / r['train_checkpoint'])
    lines.append(f"| {r['model']} | {r['params'] / 1e6:,.0f}M | {_size(r['params_fp32'])} | "
                 f"{_size(r['params_bf16'])} | {_size(r['train_checkpoint'])} | "
                 f"{fit if fit else 'none'} |")
  return '\n'.join(lines)


def du(url: str, models: Optional[Sequence[str]] = None, out=sys.stdout) -> int:
  sizes = usage(url)
  total = sum(sizes.values())
  for name, n in sizes.items():
    print(f'{_size(n):>12}  {url.rstrip("/")}/{name}', file=out)
  share = total / FREE_TIER_BYTES
  print(f'{_size(total):>12}  total: {share:.1%} of the 5 GB free tier'
        f'{" (OVER: billed)" if total > FREE_TIER_BYTES else ""}', file=out)
  print('\nWhat each model size needs in the bucket (one checkpoint each):', file=out)
  print(needs_table(model_storage_needs(models)), file=out)
  print('\nKeep fewer checkpoints with CHECKPOINTS_TO_KEEP, save bfloat16 parameters with '
        "checkpoints.SaveCheckpointConfig.dtype = 'bfloat16' (no longer exact for resuming), "
        'or keep only the final one.', file=out)
  return total


def cp(src: str, dst: str, out=sys.stdout) -> int:
  """Copies a checkpoint, dataset or file (recursive); commit markers are copied last."""
  if not (storage.is_remote(src) or storage.exists(src)):
    raise FileNotFoundError(src)
  count = [0]

  def progress(rel, n):
    count[0] += 1
    if count[0] % 50 == 0:
      print(f'  {count[0]} files...', file=out, flush=True)

  total = storage.copy(src, dst, progress=progress)
  print(f'copied {count[0]} file(s), {_size(total)}: {src} -> {dst}', file=out)
  if storage.is_remote(dst):
    bucket, _ = storage.split_gs(dst)
    used = sum(usage(f'gs://{bucket}').values())
    print(f'gs://{bucket} now holds {_size(used)} ({used / FREE_TIER_BYTES:.1%} of the '
          '5 GB free tier)', file=out)
  return total


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  p = argparse.ArgumentParser(prog='t5tpu gcs', description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  p_init = sub.add_parser('init', help='create or check a bucket and its layout')
  p_init.add_argument('bucket', help='gs://BUCKET')
  p_init.add_argument('--project', default=None)
  p_init.add_argument('--location', default='us-central1',
                      help='new buckets only; us-central1/us-east1/us-west1 are free-tier')
  p_cp = sub.add_parser('cp', help='copy a file or directory (local <-> gs://)')
  p_cp.add_argument('src')
  p_cp.add_argument('dst')
  p_du = sub.add_parser('du', help='bucket size vs the free tier; what each model needs')
  p_du.add_argument('bucket', help='gs://BUCKET[/prefix]')
  p_du.add_argument('--model', action='append', default=None,
                    help='limit the table to these models (e.g. t5_1_1/base)')
  args = p.parse_args(list(argv))
  if args.command == 'init':
    init(args.bucket, args.project, args.location)
  elif args.command == 'cp':
    cp(args.src, args.dst)
  else:
    du(args.bucket, args.model)


if __name__ == '__main__':
  main(sys.argv[1:])

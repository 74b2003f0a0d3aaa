"""The Colab notebook runs end to end on CPU (tiny model, built-in task) against a GCS server."""
import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), '..', '..', 'notebooks',
                        'cbqa_colab_tpu.ipynb')


@pytest.mark.timeout(900)
def test_notebook_runs_end_to_end(fake_gcs, tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
  params.source += (f"\nBUCKET = '{fake_gcs.bucket}'\nCI_TINY = True\n"
                    "FINETUNE_STEPS = 60\nMORE_STEPS = 10\n")
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                      for o in c.get('outputs', []) if o.get('output_type') == 'stream')
  assert 'trained to step 60' in outputs
  # Every checkpoint evaluated, EM rising; answers to "your own questions" on the bucket.
  from t5tpu import storage
  model_dir = f'{fake_gcs.bucket}/models/cbqa_tiny'
  rows = [json.loads(l) for l in storage.read_text(
      f'{model_dir}/eval_all/inference_eval/knowledge_qa-metrics.jsonl').splitlines()]
  assert [r['step'] for r in rows] == [12, 24, 36, 48, 60, 70]
  assert rows[-1]['em'] > 50 and rows[-1]['em'] > rows[0]['em']
  answers = storage.read_text(f'{model_dir}/my_answers.jsonl').splitlines()
  assert len(answers) == 3 and '->' in outputs

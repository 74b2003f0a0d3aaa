"""PEFT interop, against peft itself: import an adapter peft saved, export one peft loads."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from t5tpu import delta
from t5tpu.delta import base as delta_base
from t5tpu.formats import convert, hf, peft as peft_format, unflatten
from tests.formats import common as fcommon
from tests.formats.test_hf import hf_logits, hf_model, max_diff

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
TOL = 1e-4


def peft_model(base, r=4, alpha=8, targets=('q', 'v', 'wo')):
  """peft's own LoRA on a transformers T5, with B moved off zero (else it is the base)."""
  config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                           lora_dropout=0.0, task_type='SEQ_2_SEQ_LM')
  model = peft.get_peft_model(base, config)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_B' in name:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def t5tpu_logits(cfg, params, enc, dec_in, targets):
  return fcommon.logits(cfg, params, enc, dec_in, targets)


def test_adapter_saved_by_peft_imports_with_its_logits(tmp_path):
  base = hf_model(v11=True)
  base.save_pretrained(tmp_path / 'base')
  model = peft_model(base)
  model.save_pretrained(tmp_path / 'adapter')
  enc, dec_in, targets = fcommon.padded_batch(100)
  want = hf_logits(model, enc, dec_in)
  state, cfg = hf.read_with_config(str(tmp_path / 'base'), dtype='float32')
  lora, weights = peft_format.read(str(tmp_path / 'adapter'), cfg)
  assert (lora.rank, lora.scale) == (4, 2.0)
  # Unmerged: the t5tpu network with LoRA on exactly those projections.
  delta_cfg = delta.DeltaConfig(lora=lora)
  params = delta.merge(unflatten(weights), state['target'])
  got = t5tpu_logits(dataclasses.replace(cfg, delta=delta_cfg), params, enc, dec_in, targets)
  diff = max_diff(got, want, targets)
  print(f'PEFT adapter imported: max |logit difference| vs PeftModel {diff:.2e}')
  assert diff < TOL
  # Merged by `t5tpu convert --from=<adapter> --base=<HF dir> --to_format=hf`.
  convert.main([f'--from={tmp_path / "adapter"}', f'--base={tmp_path / "base"}',
                f'--to={tmp_path / "merged"}', '--to_format=hf'])
  merged = __import__('transformers').T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'merged').eval()
  diff = max_diff(hf_logits(merged, enc, dec_in), want, targets)
  print(f'merged by t5tpu convert: max |logit difference| vs PeftModel {diff:.2e}')
  assert diff < TOL


def test_t5tpu_lora_exports_to_peft_and_merges(tmp_path):
  # A delta "run" on disk: a base (orbax) and a LoRA checkpoint with its record.
  cfg = fcommon.small_config(v11=True)
  base_params = fcommon.random_params(cfg, seed=3)
  lora = delta.LoRA(rank=4, alpha=16, targets=('q', 'k', 'wi_1'))
  delta_cfg = delta.DeltaConfig(lora=lora)
  full = fcommon.random_params(dataclasses.replace(cfg, delta=delta_cfg), seed=5)
  trainable, _ = delta.split(delta_cfg, full)
  trainable = jax.tree.map(lambda x: x + 0.2 * np.random.RandomState(0).randn(*x.shape)
                           .astype(np.float32), trainable)  # B off zero
  from t5tpu.formats import t5x_orbax
  base_dir = str(tmp_path / 'base' / 'checkpoint_0')
  t5x_orbax.write(base_dir, {'target': base_params, 'state': {'step': 0}})
  run = tmp_path / 'run'
  t5x_orbax.write(str(run / 'checkpoint_10'), {'target': trainable, 'state': {'step': 10}})
  frozen = delta.split(delta_cfg, base_params)[1]
  delta_base.write_record(str(run), delta_base.record_for(delta_cfg, base_dir, frozen))
  enc, dec_in, targets = fcommon.padded_batch(100)
  ours = t5tpu_logits(dataclasses.replace(cfg, delta=delta_cfg),
                      delta.merge(trainable, base_params), enc, dec_in, targets)
  # Base as HF, LoRA as a PEFT adapter: peft loads it onto that base.
  convert.main([f'--from={base_dir}', f'--to={tmp_path / "base_hf"}', '--to_format=hf'])
  convert.main([f'--from={run}', f'--to={tmp_path / "adapter"}', '--to_format=peft'])
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert config['r'] == 4 and config['lora_alpha'] == 16
  base = __import__('transformers').T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'base_hf').eval()
  loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / 'adapter')).eval()
  # float32 on both sides: the tolerance is relative to the logits' size.
  tol = TOL * max(1.0, float(np.abs(ours).max()))
  diff = max_diff(hf_logits(loaded, enc, dec_in), ours, targets)
  print(f't5tpu LoRA exported to PEFT: max |logit difference| {diff:.2e} '
        f'(|logits| up to {np.abs(ours).max():.1f})')
  assert diff < tol
  # Merged into one HF model: the same logits as unmerged.
  convert.main([f'--from={run}', f'--to={tmp_path / "merged"}', '--to_format=hf'])
  merged = __import__('transformers').T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'merged').eval()
  diff = max_diff(hf_logits(merged, enc, dec_in), ours, targets)
  print(f'merged export vs unmerged t5tpu: max |logit difference| {diff:.2e}')
  assert diff < tol


def test_prefix_delta_cannot_merge(tmp_path):
  cfg = delta.DeltaConfig(prefix=delta.Prefix(length=2))
  with pytest.raises(delta.DeltaError, match='cannot be merged'):
    delta_base.merge_into_base(cfg, {}, {})


def test_peft_adapter_starts_a_t5tpu_lora_run(tmp_path):
  from t5tpu import models, partitioning, trainer as trainer_lib
  base = hf_model(v11=True)
  base.save_pretrained(tmp_path / 'base')
  model = peft_model(base, targets=('q', 'v'))
  model.save_pretrained(tmp_path / 'adapter')
  enc, dec_in, targets = fcommon.padded_batch(100)
  want = hf_logits(model, enc, dec_in)
  state, cfg = hf.read_with_config(str(tmp_path / 'base'), dtype='float32')
  lora = delta.LoRA(rank=4, alpha=8, targets=('q', 'v'), init_from=str(tmp_path / 'adapter'))
  t5 = models.EncoderDecoderModel(
      module=__import__('t5tpu.network', fromlist=['x']).Transformer(
          dataclasses.replace(cfg, delta=delta.DeltaConfig(lora=lora))),
      optimizer_def=__import__('t5tpu.optimizers', fromlist=['x']).Adafactor())
  tr = trainer_lib.Trainer(t5, partitioning.PjitPartitioner(), lambda s: 1e-3)
  trainable, frozen = delta_base.start_from_base(tr, state['target'], jax.random.PRNGKey(0))
  tr.set_frozen(frozen)
  got = t5tpu_logits(t5.config, jax.device_get(tr.full_params(trainable)), enc, dec_in,
                     targets)
  assert max_diff(got, want, targets) < TOL
  # Another rank than the adapter's is refused with the values to set.
  bad = dataclasses.replace(lora, rank=8)
  t5_bad = dataclasses.replace(t5, module=t5.module.clone(config=dataclasses.replace(
      cfg, delta=delta.DeltaConfig(lora=bad))))
  with pytest.raises(delta.DeltaError, match='LORA_RANK = 4'):
    delta_base.start_from_base(trainer_lib.Trainer(t5_bad, partitioning.PjitPartitioner(),
                                                   lambda s: 1e-3),
                               state['target'], jax.random.PRNGKey(0))

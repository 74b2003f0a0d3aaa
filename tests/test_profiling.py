"""Profiling: the op table of a real jax profiler trace, and PROFILE_STEPS in a training run."""
import os

import jax
import jax.numpy as jnp
import pytest

from t5tpu import errors, profiling
from tests import test_train


def _matmul_then_elementwise(a, b):
  return jnp.tanh(a @ b).sum(axis=0) * 3.0


def test_op_kinds_of_a_compiled_program():
  a = jnp.ones((256, 256))
  text = jax.jit(_matmul_then_elementwise).lower(a, a).compile().as_text()
  kinds = profiling.op_kinds(text)
  assert 'matmul' in {k for k, _ in kinds.values()}
  assert {k for k, _ in kinds.values()} - {'matmul'}, kinds  # the tanh/sum work is not a matmul
  sources = [s for _, s in kinds.values() if s]
  assert any('dot_general' in s for s in sources), sources


def test_op_kinds_reads_nested_fusions_and_custom_calls():
  text = '\n'.join([
      'HloModule m',
      '%inner (p: f32[4,4]) -> f32[4,4] {',
      '  %p = f32[4,4]{1,0} parameter(0)',
      '  ROOT %d = f32[4,4]{1,0} dot(%p, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
      '}',
      '%outer (q: f32[4,4]) -> f32[4,4] {',
      '  %q = f32[4,4]{1,0} parameter(0)',
      '  ROOT %f = f32[4,4]{1,0} fusion(%q), kind=kOutput, calls=%inner',
      '}',
      '%add (x: f32[], y: f32[]) -> f32[] {',
      '  %x = f32[] parameter(0)',
      '  %y = f32[] parameter(1)',
      '  ROOT %s = f32[] add(%x, %y)',
      '}',
      'ENTRY %main (a: f32[4,4]) -> (f32[4,4], f32[4,4]) {',
      '  %a = f32[4,4]{1,0} parameter(0)',
      '  %fusion.1 = f32[4,4]{1,0} fusion(%a), kind=kCustom, calls=%outer, '
      'metadata={op_name="jit(f)/dot_general"}',
      '  %gemm.2 = (f32[4,4]{1,0}, s8[16]{0}) custom-call(%a, %a), '
      'custom_call_target="__cublas$gemm"',
      '  %all-reduce.3 = f32[4,4]{1,0} all-reduce(%a), to_apply=%add',
      '  %copy.4 = f32[4,4]{0,1} copy(%a)',
      '  ROOT %t = (f32[4,4], f32[4,4]) tuple(%fusion.1, %copy.4)',
      '}'])
  kinds = profiling.op_kinds(text)
  assert kinds['fusion.1'] == ('matmul', 'jit(f)/dot_general')
  assert kinds['gemm.2'][0] == 'matmul'
  assert kinds['all-reduce.3'][0] == 'collective'
  assert kinds['copy.4'][0] == 'copy/transpose'
  assert kinds['s'][0] == 'other'


def test_op_times_of_a_real_trace(tmp_path):
  a = jnp.ones((512, 512))
  f = jax.jit(_matmul_then_elementwise)
  f(a, a).block_until_ready()
  g = jax.jit(lambda x: x + 1.0)  # another program, to be filtered out by module name
  g(a).block_until_ready()
  jax.profiler.start_trace(str(tmp_path))
  for _ in range(3):
    f(a, a)
    g(a)
  jax.block_until_ready((f(a, a), g(a)))
  jax.profiler.stop_trace()
  trace = profiling.latest_trace(str(tmp_path))
  text = f.lower(a, a).compile().as_text()
  ops = profiling.op_times(trace, text, module='matmul_then_elementwise')
  assert ops and all(o.seconds > 0 for o in ops)
  assert [o.seconds for o in ops] == sorted((o.seconds for o in ops), reverse=True)
  assert ops[0].kind == 'matmul'  # a 512^3 matmul outweighs the elementwise rest
  assert all(o.count == 4 for o in ops), ops  # each operation once per call, 4 calls
  every = profiling.op_times(trace)  # both programs
  assert sum(o.count for o in every) > sum(o.count for o in ops)
  table = profiling.format_table(ops, steps=4)
  assert '| matmul |' in table and ops[0].name in table


def test_latest_trace_says_where_it_looked(tmp_path):
  with pytest.raises(FileNotFoundError, match='no profiler trace'):
    profiling.latest_trace(str(tmp_path))


def test_profile_steps_trace_a_window_of_training(tmp_path, copy_task):
  model_dir = tmp_path / 'run'
  test_train.run(model_dir, 5, profile_steps=2)
  train_dir = model_dir / 'train'
  table = (train_dir / 'profile_steps_3_4.txt').read_text()  # steps 1-2 compile and warm up
  assert '| matmul |' in table and '| fusion |' in table, table
  assert profiling.latest_trace(str(train_dir)).endswith('.xplane.pb')


def test_profile_window_shrinks_to_a_short_run(tmp_path, copy_task):
  test_train.run(tmp_path / 'run', 1, profile_steps=3)
  assert os.path.exists(tmp_path / 'run' / 'train' / 'profile_steps_1_1.txt')


def test_profile_steps_must_be_a_count(tmp_path):
  with pytest.raises(errors.UserError, match='PROFILE_STEPS=-1'):
    test_train.run(tmp_path / 'run', 2, profile_steps=-1)
  assert not (tmp_path / 'run').exists()  # refused before anything is written


def test_part_of_groups_a_stack_of_layers_and_the_two_passes():
  fwd = 'jit(_train_step_fn)/jvp(Transformer)/Transformer.encode/encoder/layers_3/mlp/wi_0/dot_general'
  bwd = ('jit(_train_step_fn)/transpose(jvp(Transformer))/Transformer.decode/decoder/layers_0/'
         'mlp/(wi_1/dot_general:wi_0/dot_general)')
  assert profiling.part_of(fwd) == 'encoder/mlp (forward)'
  assert profiling.part_of(bwd) == 'decoder/mlp (backward)'
  assert profiling.part_of(fwd.replace('layers_3', 'layers_5')) == 'encoder/mlp (forward)'
  assert profiling.part_of('jit(_train_step_fn)/jvp()/reduce') == 'loss (forward)'
  assert profiling.part_of('jit(_train_step_fn)/sqrt') == 'outside the network'
  assert profiling.part_of('') == 'unattributed'

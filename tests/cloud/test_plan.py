"""`t5tpu plan`: the real train step compiled for Cloud TPU topologies by libtpu, on CPU.

Small shapes only (each TPU compile of the tiny model takes seconds here); docs/tpu-memory.md
has the real model sizes.
"""
import io
import contextlib

import pytest

from t5tpu import plan
from tests import tiny

pytest.importorskip('libtpu')
LENGTHS = {'inputs': 16, 'targets': 8}


def _model(**kw):
  return tiny.tiny_model(num_encoder_layers=1, num_decoder_layers=1, **kw)


@pytest.mark.timeout(300)
def test_tiny_model_fits_v2_8_with_model_parallelism():
  p = plan.memory_report(_model(), 'v2-8', 8, LENGTHS, num_partitions=2)
  assert p.fits, p.error
  assert p.mesh == {'data': 4, 'model': 2}
  assert p.hbm == int(7.48 * 2 ** 30)
  assert 0 < p.peak <= p.hbm
  assert p.arguments >= p.params + p.opt_state > 0
  text = p.summary()
  assert 'v2-8 (data 4 x model 2), batch 8: FITS' in text and 'peak' in text


@pytest.mark.timeout(300)
def test_too_big_does_not_fit():
  # 2 x 16M x 32 float32 vocabulary matrices and their Adafactor state (unfactored: 32 <
  # 128): 8 GiB per v2 core before any activation.
  p = plan.memory_report(_model(vocab_size=1 << 24), 'v2-8', 8, LENGTHS)
  assert not p.fits
  assert 4 * 2 ** 30 <= p.params < 4.01 * 2 ** 30 and 4 * 2 ** 30 <= p.opt_state < 4.01 * 2 ** 30
  assert p.required > p.hbm
  assert 'DOES NOT FIT' in p.summary() and 'RESOURCE_EXHAUSTED' in p.error


@pytest.mark.timeout(300)
def test_bisection_finds_the_largest_batch_on_tpu():
  # Logits dominate: [batch/8, 64, 4M] float32 per core, about 1 GiB per example per core,
  # on top of 2 GiB of parameters and optimizer state.
  setup = plan.make_setup(_model(vocab_size=1 << 22), 'v2-8', 8,
                          {'inputs': 16, 'targets': 64})
  assert setup.unit == 8
  search = plan.find_max_batch(setup, start=32)
  assert search.best.fits and search.best.batch_size % 8 == 0
  assert not search.smallest_failure.fits
  assert search.smallest_failure.batch_size == search.best.batch_size + setup.unit
  assert search.best.peak <= search.best.hbm


class _FakeSetup:
  """A Setup whose "compile" fits while base + per_example x batch^power <= hbm."""

  def __init__(self, unit, per_example, base=1.0, hbm=10.0, batch_size=8, power=1):
    self.unit, self.per_example, self.base, self.hbm = unit, per_example, base, hbm
    self.power = power
    self.batch_size = batch_size
    self.compiled = []

  def compile(self, b):
    assert b % self.unit == 0 and b > 0
    self.compiled.append(b)
    peak = self.base + self.per_example * b ** self.power
    return plan.Plan('v2-8', b, {}, self.hbm, peak <= self.hbm, peak=peak)


@pytest.mark.parametrize('unit,per_example,start,expect,power', [
    (8, 0.01, 8, 896, 1),  # up from the start, then bisection
    (8, 0.1, 512, 88, 1),  # start too big: halving, then bisection
    (1, 0.5, 32, 18, 1),
    (4, 100.0, 16, None, 1),  # nothing fits
    (8, 1e-4, 8, 296, 2),  # memory not linear in the batch: the line misleads, still exact
    (2, 1e-5, 64, 948, 2),
])
def test_bisection_logic(unit, per_example, start, expect, power):
  setup = _FakeSetup(unit, per_example, power=power)
  search = plan.find_max_batch(setup, start=start)
  if expect is None:
    assert search.best is None and search.smallest_failure.batch_size == unit
    return
  assert search.best.batch_size == expect
  assert search.smallest_failure.batch_size == expect + unit
  assert len(setup.compiled) == len(set(setup.compiled))  # nothing compiled twice
  # Linear memory: the line through two fitting batches lands on the answer, so only a few
  # of the (expensive) compiles that fit are needed.
  fitting = [b for b in setup.compiled if b <= expect]
  assert power > 1 or len(fitting) <= 3, setup.compiled
  coarse = plan.find_max_batch(_FakeSetup(unit, per_example, power=power), start=start,
                               relative_resolution=0.25)
  assert coarse.best.batch_size <= expect < coarse.smallest_failure.batch_size
  assert coarse.smallest_failure.batch_size - coarse.best.batch_size <= max(
      unit, 0.25 * coarse.best.batch_size)


def test_bisection_drops_a_line_that_a_failure_refuted():
  """Peak memory flat, then steep (as when the compiler starts rematerialising): the line
  through two flat points predicts a huge batch; once that batch fails, bisect instead of
  probing just below it (seen on t5_1_1/base, v4-8: 4096 failed, then 4094 was compiled)."""

  class Kinked(_FakeSetup):
    def compile(self, b):
      self.compiled.append(b)
      peak = 1 + 0.001 * b + (0.02 * (b - 1000) if b > 1000 else 0)
      return plan.Plan('v4-8', b, {}, self.hbm, peak <= self.hbm, peak=peak)

  setup = Kinked(unit=2, per_example=0.0, batch_size=32)
  search = plan.find_max_batch(setup, start=32, limit=4096)
  assert (search.best.batch_size, search.smallest_failure.batch_size) == (1380, 1382)
  assert setup.compiled[:3] == [32, 64, 4096] and 4094 not in setup.compiled
  assert len(setup.compiled) <= 9, setup.compiled


def test_flat_peaks_double_instead_of_following_the_line():
  """The compiler rematerialises to fit: the peak stays flat over a range of batches (large on
  a v5e-1: 13.17 GiB at 64, 13.18 at 81), and a line through two flat points reaches HBM at an
  absurd batch. The search doubles there instead, so no probe jumps far past what fitted."""

  peak = lambda b: 1 + 0.1 * min(b, 64) + 1e-5 * max(b - 64, 0) + 0.5 * max(b - 200, 0)

  class Plateau(_FakeSetup):
    def compile(self, b):
      self.compiled.append(b)
      return plan.Plan('v5e-1', b, {}, self.hbm, peak(b) <= self.hbm, peak=peak(b))

  setup = Plateau(unit=1, per_example=0.0, hbm=10.0, batch_size=64)
  search = plan.find_max_batch(setup, start=64, limit=4096)
  assert (search.best.batch_size, search.smallest_failure.batch_size) == (205, 206)
  fitted = 0
  for b in setup.compiled:  # no probe is more than double the largest batch that fitted
    assert fitted == 0 or b <= 2 * fitted, setup.compiled
    if peak(b) <= 10.0:
      fitted = max(fitted, b)


def test_the_limit_is_tried_and_bounds_a_resumed_search():
  """Doubling past `limit` tries `limit` itself (it used to stop below it, untried), so a
  search resumed with a batch known to fit and one known not to bisects between the two."""

  peak = lambda b: 1 + 0.1 * min(b, 64) + 1e-5 * max(b - 64, 0) + 0.5 * max(b - 200, 0)

  class Plateau(_FakeSetup):  # flat peaks: the search doubles
    def compile(self, b):
      self.compiled.append(b)
      return plan.Plan('v5e-1', b, {}, self.hbm, peak(b) <= self.hbm, peak=peak(b))

  below = Plateau(unit=1, per_example=0.0, hbm=10.0)
  search = plan.find_max_batch(below, start=64, limit=150)
  assert (search.best.batch_size, search.smallest_failure) == (150, None)
  assert below.compiled == [64, 128, 150]
  resumed = Plateau(unit=1, per_example=0.0, hbm=10.0)
  search = plan.find_max_batch(resumed, start=128, limit=220)
  assert (search.best.batch_size, search.smallest_failure.batch_size) == (205, 206)
  assert resumed.compiled[:2] == [128, 220] and max(resumed.compiled) == 220
  capped = Plateau(unit=1, per_example=0.0, hbm=10.0)  # a start above the limit starts there
  assert plan.find_max_batch(capped, start=300, limit=150).best.batch_size == 150
  assert capped.compiled == [150]
  with pytest.raises(SystemExit, match='--limit bounds a search'):
    plan.main(['--model=t5_1_1/tiny', '--limit=4'])


@pytest.mark.timeout(300)
def test_cli_from_gin(tmp_path):
  """The run's gin decides model, partitioning and batch; the topology's devices are used."""
  import gin
  gin_file = tmp_path / 'run.gin'
  gin_file.write_text("include 'models/t5_1_1/tiny.gin'\ninclude 'runs/finetune.gin'\n"
                      'network.T5Config.vocab_size = 264\n'
                      'network.T5Config.num_encoder_layers = 1\n'
                      'network.T5Config.num_decoder_layers = 1\n')
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      plan.main([f'--gin_file={gin_file}', '--topology=v5e-4', '--gin.NUM_PARTITIONS=2',
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}",
                 '--gin.BATCH_SIZE=4', '--remat=full', '--param_dtype=bfloat16',
                 '--find_max_batch', '--limit=4'])
    # The flags hold without --table too (they were once read by --table alone).
    assert gin.query_parameter('%PARAM_DTYPE') == 'bfloat16'
    assert gin.query_parameter('network.T5Config.remat_policy') == 'full'
  finally:
    gin.clear_config()
  text = out.getvalue()
  assert "v5e-4: 4 chips of 16 GiB; mesh {'data': 2, 'model': 2}" in text
  assert 'batch 4: FITS' in text and 'of 15.75 GiB HBM' in text
  # --limit bounds --find_max_batch too: the gin's batch is the limit, so one compile.
  assert text.count('FITS') == 1
  assert 'largest batch that fits v5e-4: 4; larger batches were not tried (--limit)' in text


@pytest.mark.timeout(300)
@pytest.mark.parametrize('topology, hbm', [('v5e-1', '15.75'), ('v6e-1', '31.25')])
def test_colab_single_chip_tpus(tmp_path, topology, hbm):
  """Today's Colab TPUs are one chip: no model parallelism, the whole batch on one device."""
  import gin
  gin_file = tmp_path / 'run.gin'
  gin_file.write_text("include 'models/t5_1_1/tiny.gin'\ninclude 'runs/finetune.gin'\n"
                      'network.T5Config.vocab_size = 264\n')
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      plan.main([f'--gin_file={gin_file}', f'--topology={topology}',
                 "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", '--gin.BATCH_SIZE=4'])
  finally:
    gin.clear_config()
  text = out.getvalue()
  assert "mesh {'data': 1, 'model': 1}" in text
  assert 'batch 4: FITS' in text and f'of {hbm} GiB HBM' in text


@pytest.mark.timeout(300)
def test_delta_step_plans_with_a_frozen_bfloat16_base():
  """`t5tpu plan ... --gin_file=delta/lora.gin`: the base counts once, in bfloat16, with no
  optimizer state; the delta's state is all there is to optimize."""
  from t5tpu import delta
  full = plan.memory_report(_model(), 'v5e-1', 8, LENGTHS)
  lora = plan.memory_report(_model(delta=delta.DeltaConfig(
      lora=delta.LoRA(rank=4), base_dtype='bfloat16')), 'v5e-1', 8, LENGTHS)
  assert full.fits and lora.fits
  assert lora.params < 0.6 * full.params  # bfloat16 base + a small float32 delta
  assert lora.opt_state < 0.2 * full.opt_state


def test_tpu_programs_trace_projections_as_batched_einsums():
  """The partitioner's mesh names the platform: a TPU step traced on this CPU host gets the
  einsum form, which takes the TPU compiler less memory (docs/tpu-memory.md)."""
  import jax
  from t5tpu import matmul, partitioning
  tpu = partitioning.PjitPartitioner(devices=plan.topology_devices('v5e-1'))
  cpu = partitioning.PjitPartitioner()
  seen = {}
  for name, part in (('tpu', tpu), ('cpu', cpu)):
    with part.context():
      jax.make_jaxpr(lambda: seen.setdefault(name, matmul.flattens()))()
  assert seen == {'tpu': False, 'cpu': True}


def test_topologies_build():
  counts = {name: len(plan.topology_devices(name)) for name in plan.TOPOLOGIES}
  assert counts == {'v5e-1': 1, 'v6e-1': 1, 'v2-8': 8, 'v3-8': 8, 'v4-8': 4, 'v4-8-cores': 8,
                    'v5e-4': 4, 'v5e-8': 8, 'v5e-16': 16, 'v6e-4': 4, 'v6e-8': 8, 'v5p-8': 4}
  with pytest.raises(ValueError, match='unknown topology'):
    plan.topology_devices('v9-8')


@pytest.mark.timeout(300)
def test_step_time_estimate_only_without_a_loop():
  """libtpu's optimal_seconds is given for an unrolled step (with the MFU it implies) and
  withheld for microbatches, whose scan body the cost analysis would count once."""
  p = plan.memory_report(_model(), 'v5e-1', 8, LENGTHS)
  assert p.estimated_seconds is not None and p.estimated_seconds > 0
  assert p.peak_flops == 197e12 and p.model_flops > 0
  assert 0 < p.estimated_mfu < 1
  assert "estimated (not measured)" in p.summary()
  assert "the TPU compiler's estimate" in p.summary()
  micro = plan.memory_report(_model(), 'v5e-1', 8, LENGTHS, num_microbatches=2)
  assert micro.fits and micro.estimated_seconds is None and micro.estimated_mfu is None
  assert 'counts a loop body once' in micro.summary()


@pytest.mark.timeout(600)
def test_tpu_flash_attention_compiles_for_tpu():
  """attention_kernel='tpu_flash' (with dropout on): the Pallas kernel lowers and compiles for
  one v5e chip and, mapped over the mesh, for a v5e-4 split 2 x 2; the step-time estimate says
  what the kernels leave out of it."""
  lengths = {'inputs': 128, 'targets': 32}
  flash = lambda: _model(attention_kernel='tpu_flash', dropout_rate=0.1)
  one = plan.memory_report(flash(), 'v5e-1', 8, lengths)
  assert one.fits, one.error
  assert 'Pallas kernels' in one.estimate_note
  four = plan.memory_report(flash(), 'v5e-4', 8, lengths, num_partitions=2)
  assert four.fits, four.error
  assert four.mesh == {'data': 2, 'model': 2}
  einsum = plan.memory_report(_model(dropout_rate=0.1), 'v5e-1', 8, lengths)
  assert einsum.fits and 'Pallas' not in einsum.estimate_note


def test_negative_optimal_seconds_gives_a_roofline_instead():
  """What libtpu gave for T5.1.1-small on v5e-1: a negative optimal_seconds beside sound
  counts. The estimate is then the roofline of those counts, and says so."""
  small = {'optimal_seconds': -109.99, 'flops': 2.09e11, 'bytes accessed': 7.53e9}
  v5e = plan.TOPOLOGIES['v5e-1']
  seconds, what = plan.step_estimate(small, False, 197e12, v5e.hbm_bytes_per_second)
  assert seconds == pytest.approx(7.53e9 / 819e9)  # memory-bound by the counts
  assert what.startswith('a roofline') and '-110' in what
  seconds, what = plan.step_estimate({**small, 'bytes accessed': 1e6}, False, 197e12, 819e9)
  assert seconds == pytest.approx(2.09e11 / 197e12)  # compute-bound
  assert plan.step_estimate({'optimal_seconds': 0.01}, False, 197e12, 819e9) == (
      0.01, "the TPU compiler's estimate")
  assert plan.step_estimate({'optimal_seconds': -1.0}, False, None, None)[0] is None
  assert plan.step_estimate(small, True, 197e12, 819e9)[0] is None
  counts_only = {'flops': 2.09e11, 'bytes accessed': 7.53e9}  # no optimal_seconds at all
  seconds, what = plan.step_estimate(counts_only, False, 197e12, 819e9)
  assert seconds == pytest.approx(7.53e9 / 819e9) and 'optimal_seconds is absent' in what


@pytest.mark.timeout(300)
def test_bfloat16_parameters_halve_parameters_and_gradients():
  """PARAM_DTYPE='bfloat16': the state's parameters take half the bytes; Adafactor's factored
  state stays float32; the step's peak drops by about the parameters and gradients saved."""
  f32 = plan.memory_report(_model(), 'v5e-1', 8, LENGTHS)
  bf16 = plan.memory_report(_model(), 'v5e-1', 8, LENGTHS, param_dtype='bfloat16')
  assert bf16.fits
  assert bf16.params * 2 == f32.params
  assert bf16.opt_state == f32.opt_state
  assert bf16.peak < f32.peak

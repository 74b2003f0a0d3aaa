"""`t5tpu plan`: will this run fit a Cloud TPU? Compile it for the TPU, here, and see.

The real train step (same gin, same model, same partitioning rules, same donation) is lowered
for a Cloud TPU topology with libtpu's compiler, on any machine: jax's
`topologies.get_topology_desc` gives compile-only TPU devices, the partitioner builds its mesh
over them, and `compiled.memory_analysis()` reports what each TPU core would hold. The TPU
compiler enforces HBM itself, so a program that compiles fits and one that does not fails with
RESOURCE_EXHAUSTED. Nothing runs and no TPU is needed (`pip install libtpu`).

  t5tpu plan --gin_file=runs/finetune.gin --gin_file=models/t5_1_1/xl.gin --topology=v2-8 \\
      --gin.NUM_PARTITIONS=8 --batch_size=32 --find_max_batch
  t5tpu plan --model=t5_1_1/base --topology=v4-8 --gin.network.T5Config.remat_policy="'full'"
  t5tpu plan --table --topology=v2-8 --topology=v4-8     (docs/tpu-memory.md)
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from t5tpu import errors

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # what users call it: 'v2-8'
  topology_name: str  # what libtpu calls it: 'v2:2x2'
  hbm_gib: float  # usable HBM per jax device, as the TPU compiler enforces it
  note: str
  hbm_gbps: float  # HBM bandwidth per jax device, GB/s (Cloud TPU's published per-chip figure)
  kwargs: tuple = ()  # extra get_topology_desc arguments, as (key, value) pairs

  @property
  def hbm_bytes(self) -> int:
    return int(self.hbm_gib * GiB)

  @property
  def hbm_bytes_per_second(self) -> float:
    return self.hbm_gbps * 1e9


# HBM per device as the compiler reports it in its out-of-memory errors (libtpu 0.0.42.1);
# measured by compiling for each topology. A v2/v3 device is one TensorCore (half a chip),
# and gets half the chip's HBM bandwidth.
TOPOLOGIES: Dict[str, Topology] = {t.name: t for t in [
    Topology('v5e-1', 'v5e:1x1', 15.75, "Colab's free TPU since 2025: one chip of 16 GiB", 819,
             (('chips_per_host_bounds', (1, 1, 1)),)),
    Topology('v6e-1', 'v6e:1x1', 31.25, "Colab's paid-tier TPU: one chip of 32 GiB", 1640,
             (('chips_per_host_bounds', (1, 1, 1)),)),
    Topology('v2-8', 'v2:2x2', 7.48, "Colab's TPU until 2025: 4 chips, 8 cores of 8 GiB", 350),
    Topology('v3-8', 'v3:2x2', 15.48, '4 chips, 8 cores of 16 GiB', 450),
    Topology('v4-8', 'v4:2x2x1', 30.75, '4 chips in megacore mode: 4 devices of 32 GiB '
             '(what jax sees on a v4-8 TPU VM)', 1200, (('chip_config_name', 'megacore'),)),
    Topology('v4-8-cores', 'v4:2x2x1', 15.25, '4 chips as 8 separate cores of 16 GiB', 600),
    Topology('v5e-4', 'v5e:2x2', 15.75, '4 chips of 16 GiB', 819),
    Topology('v5e-8', 'v5e:2x4', 15.75, "8 chips of 16 GiB (one host; Kaggle's TPU)", 819),
    Topology('v5e-16', 'v5e:4x4', 15.75, '16 chips of 16 GiB (4 hosts)', 819),
    Topology('v6e-4', 'v6e:2x2', 31.25, '4 chips of 32 GiB', 1640),
    Topology('v6e-8', 'v6e:2x4', 31.25, '8 chips of 32 GiB (one host)', 1640),
    Topology('v5p-8', 'v5p:2x2x1', 95.74, '4 chips of 95 GiB (v5p-8 counts TensorCores)', 2765),
]}


def _quiet_libtpu():
  """Environment for loading libtpu as a compiler only (before it loads).

  libtpu looks for a TPU VM's metadata at load; the first three values only silence that
  search. It also takes /tmp/libtpu_lockfile so that one process owns the TPU; compiling
  needs no TPU, so several plans (or a plan beside a training run) may load it at once.
  """
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-4')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def topology_devices(name: str):
  """Compile-only TPU devices of a named topology ('v2-8', ... or a libtpu name)."""
  _quiet_libtpu()
  from jax.experimental import topologies
  topo = TOPOLOGIES.get(name)
  if topo is None:
    raise ValueError(f'unknown topology {name!r}; choose one of {", ".join(TOPOLOGIES)}')
  try:
    desc = topologies.get_topology_desc(topology_name=topo.topology_name, platform='tpu',
                                        **dict(topo.kwargs))
  except Exception as e:  # libtpu missing or too old
    raise RuntimeError(f'cannot build the {name} topology ({e}); `t5tpu plan` needs the '
                       'TPU compiler: pip install libtpu==0.0.42.1') from e
  return desc.devices


# ----------------------------------------------------------------------------- one compile

@dataclasses.dataclass
class Plan:
  """Per-device memory of one compiled train step (bytes), or why it does not fit."""
  topology: str
  batch_size: int
  mesh: Dict[str, int]
  hbm: int
  fits: bool
  params: int = 0  # this device's shard of the parameters
  opt_state: int = 0  # ... and of the optimizer state
  arguments: int = 0  # all inputs: state + batch
  temporaries: int = 0  # activations, gradients and other temporaries
  peak: int = 0  # what the device must hold at once
  required: Optional[int] = None  # from the compiler's error, when it does not fit
  error: str = ''
  compile_seconds: float = 0.0
  # The step time from the TPU compiler's cost analysis (step_estimate: not a measurement);
  # `estimate_note` says which kind, or why there is none.
  estimated_seconds: Optional[float] = None
  estimate_note: str = ''
  model_flops: float = 0.0  # per step, all devices (trainer.train_flops_per_example)
  peak_flops: Optional[float] = None  # per device, bf16

  @property
  def estimated_mfu(self) -> Optional[float]:
    if not (self.estimated_seconds and self.peak_flops):
      return None
    devices = 1
    for n in self.mesh.values():
      devices *= n
    return self.model_flops / (self.estimated_seconds * self.peak_flops * devices)

  def summary(self) -> str:
    verdict = 'FITS' if self.fits else 'DOES NOT FIT'
    mesh = ' x '.join(f'{k} {v}' for k, v in self.mesh.items())
    lines = [f'{self.topology} ({mesh}), batch {self.batch_size}: {verdict}']
    lines.append(f'  per core: parameters {_gib(self.params)}, optimizer state '
                 f'{_gib(self.opt_state)}')
    if self.fits:
      lines.append(f'  activations/temporaries {_gib(self.temporaries)}, arguments '
                   f'{_gib(self.arguments)}, peak {_gib(self.peak)} of {_gib(self.hbm)} HBM '
                   f'({self.peak / self.hbm:.0%})')
      lines.append('  ' + self.estimate_summary())
    else:
      need = f'needs {_gib(self.required)}, ' if self.required else ''
      lines.append(f'  {need}HBM {_gib(self.hbm)}: {self.error}')
    lines.append(f'  (compiled in {self.compile_seconds:.0f} s)')
    return '\n'.join(lines)


  def estimate_summary(self) -> str:
    if self.estimated_seconds is None:
      return f'no step-time estimate: {self.estimate_note}'
    mfu = self.estimated_mfu
    return (f'step time estimated (not measured): {self.estimated_seconds * 1e3:.1f} ms'
            + (f', MFU {mfu:.0%} if it held' if mfu is not None else '')
            + f'; {self.estimate_note}')


def _gib(n: Optional[int]) -> str:
  return '?' if n is None else f'{n / GiB:.2f} GiB'


def batch_features(batch_size: int, lengths, pack: bool = True):
  """ShapeDtypeStructs of the features EncDecFeatureConverter gives the train step."""
  import jax
  import jax.numpy as jnp
  ti, to = lengths['inputs'], lengths['targets']
  names = {'encoder_input_tokens': ti, 'decoder_input_tokens': to,
           'decoder_target_tokens': to, 'decoder_loss_weights': to}
  if pack:
    names.update(encoder_segment_ids=ti, encoder_positions=ti, decoder_segment_ids=to,
                 decoder_positions=to)
  return {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32) for k, n in names.items()}


def _shard_bytes(abstract_tree, sharding_tree) -> int:
  import jax
  import numpy as np
  sizes = jax.tree.map(
      lambda a, s: int(np.prod(s.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize,
      abstract_tree, sharding_tree)
  return int(sum(jax.tree.leaves(sizes)))


_REQUIRED = re.compile(r'required[^(]*\(([\d.]+)([KMGT])\)')
_UNITS = {'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def compile_train_step(trainer, batch_size: int, lengths, topology: str, hbm: int,
                       pack: bool = True) -> Plan:
  """Lowers and compiles trainer's train step for a batch; never runs it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec

  from t5tpu import layout as layout_lib
  part = trainer.partitioner
  layout = trainer.layout
  plan = Plan(topology=topology, batch_size=batch_size, mesh=dict(part.mesh.shape), hbm=hbm,
              fits=False,
              params=_shard_bytes(layout.abstract.params, layout.shardings.params) +
              _shard_bytes(trainer.frozen_layout.abstract, trainer.frozen_layout.shardings),
              opt_state=_shard_bytes(layout.abstract.opt_state, layout.shardings.opt_state))
  spec = batch_features(batch_size, lengths, pack)
  shardings = trainer.batch_shardings(spec)
  batch = layout_lib.with_shardings(spec, shardings)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=part.sharding(PartitionSpec()))
  step = trainer.compile_train_step(spec)
  t0 = time.perf_counter()
  try:
    with part.context():
      compiled = step.lower(layout.abstract_with_shardings(),
                            trainer.frozen_layout.abstract_with_shardings(), batch, rng).compile()
  except Exception as e:  # the compiler's verdict on HBM comes as an exception
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text and 'Ran out of memory' not in text:
      raise
    plan.compile_seconds = time.perf_counter() - t0
    m = _REQUIRED.search(text)
    if m:
      plan.required = int(float(m.group(1)) * _UNITS[m.group(2)])
    first = next((l for l in text.splitlines() if 'memory' in l.lower()), text)
    plan.error = first.strip()[:300]
    return plan
  plan.compile_seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  plan.fits = True
  plan.arguments = int(mem.argument_size_in_bytes)
  plan.temporaries = int(mem.temp_size_in_bytes)
  plan.peak = int(mem.peak_memory_in_bytes)
  _add_estimate(plan, compiled, trainer, lengths)
  return plan


_LOOP = re.compile(r'\bwhile\(')
_PALLAS_KERNEL = 'tpu_custom_call'  # how a Pallas TPU kernel appears in the compiled HLO


def step_estimate(cost: Optional[dict], has_loop: bool, peak_flops: Optional[float],
                  hbm_bytes_per_second: Optional[float]) -> Tuple[Optional[float], str]:
  """(seconds, what they are) from the compiled step's cost analysis, or (None, why not).

  libtpu's `optimal_seconds` is taken when positive; for T5.1.1-small and larger, libtpu
  0.0.42.1 returns a negative value (about -110 s for small at batch 8), so those get a
  roofline from the same analysis' counts instead: max(flops / peak FLOP/s, bytes accessed /
  HBM bandwidth). XLA's cost analysis counts a loop body once whatever its trip count, so a
  step with a loop (microbatches' scan) gets neither. t5tpu's layers are unrolled, and the
  recomputation remat adds is in the counts.
  """
  cost = cost or {}
  if has_loop:
    return None, ('the compiled step has a loop (microbatches), and the cost analysis counts '
                  'a loop body once')
  seconds = cost.get('optimal_seconds')
  if seconds is not None and seconds > 0:
    return float(seconds), "the TPU compiler's estimate"
  flops, moved = cost.get('flops'), cost.get('bytes accessed')
  if not (flops and moved and peak_flops and hbm_bytes_per_second):
    return None, ("libtpu's cost analysis gives no usable optimal_seconds "
                  f'({seconds!r}) and no flop and byte counts to bound it')
  bound = max(flops / peak_flops, moved / hbm_bytes_per_second)
  own = f'{seconds:.3g}' if seconds is not None else 'absent'
  return bound, (f"a roofline from the TPU compiler's counts ({flops:.3g} flops, "
                 f'{moved / GiB:.2f} GiB accessed; its own optimal_seconds is {own})')


def _add_estimate(plan: Plan, compiled, trainer, lengths) -> None:
  from t5tpu import trainer as trainer_lib
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  plan.model_flops = plan.batch_size * trainer_lib.train_flops_per_example(
      trainer.model.config, lengths['inputs'], lengths['targets'])
  device = trainer.partitioner.mesh.devices.flat[0]
  plan.peak_flops = trainer_lib.peak_flops_per_device(device.device_kind, device.platform)
  topo = TOPOLOGIES.get(plan.topology)
  text = compiled.as_text()
  seconds, what = step_estimate(cost, bool(_LOOP.search(text)), plan.peak_flops,
                                topo.hbm_bytes_per_second if topo else None)
  if seconds is not None and _PALLAS_KERNEL in text:
    what += ('; it leaves out work in Pallas kernels that declare none (the flash-attention '
             "backward of attention_kernel='tpu_flash'), so it is low by their share")
  plan.estimated_seconds = seconds
  plan.estimate_note = what


# ----------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class Setup:
  """What the plan compiles: the run's model, partitioning and data shapes."""
  trainer: object
  topology: str
  batch_size: int
  lengths: Dict[str, int]
  pack: bool = True

  @property
  def unit(self) -> int:
    """Batch sizes must be multiples of this (data-parallel size x microbatches)."""
    return self.trainer.partitioner.data_size * self.trainer.num_microbatches

  def compile(self, batch_size: Optional[int] = None) -> Plan:
    return compile_train_step(self.trainer, batch_size or self.batch_size, self.lengths,
                              self.topology, TOPOLOGIES[self.topology].hbm_bytes, self.pack)


def make_setup(model, topology: str, batch_size: int, lengths, num_partitions: int = 1,
               model_parallel_submesh=None, logical_axis_rules=None, learning_rate_fn=None,
               num_microbatches: Optional[int] = None, pack: bool = True,
               partitioner_fn: Optional[Callable] = None,
               param_dtype: Optional[str] = None) -> Setup:
  """A Trainer for `model` on the TPU topology's devices (the Python API behind the CLI)."""
  from t5tpu import optimizers, partitioning, trainer as trainer_lib
  devices = topology_devices(topology)
  if partitioner_fn is not None:
    part = partitioner_fn(devices=devices)
  else:
    part = partitioning.PjitPartitioner(num_partitions=num_partitions,
                                        model_parallel_submesh=model_parallel_submesh,
                                        logical_axis_rules=logical_axis_rules, devices=devices)
  lr = learning_rate_fn or optimizers.create_learning_rate_scheduler()
  from t5tpu import layout
  trainer = trainer_lib.Trainer(model, part, lr, num_microbatches,
                                layout.input_shapes(batch_size, lengths),
                                param_dtype=param_dtype)
  return Setup(trainer, topology, batch_size, dict(lengths), pack)


def memory_report(model, topology: str, batch_size: int, lengths, **kw) -> Plan:
  """Compiles one train step of `model` for `topology` and returns its per-device memory."""
  return make_setup(model, topology, batch_size, lengths, **kw).compile()


def setup_from_gin(topology: str, batch_size: Optional[int] = None,
                   lengths: Optional[Dict[str, int]] = None) -> Setup:
  """The Setup of the gin-configured `train` (already parsed), on the topology's devices.

  The model, optimizer, learning rate, partitioner (rules, num_partitions, submesh),
  microbatches, batch size and feature lengths all come from the run's gin bindings; the
  partitioner is built with the TPU topology's devices instead of this machine's.
  """
  import gin
  from t5tpu import train as train_lib
  raw = gin.get_bindings(train_lib.train, resolve_references=False)

  def resolve(key, default=None):
    return copy.deepcopy(raw[key]) if key in raw else default

  missing = [k for k in ('model', 'partitioner') if k not in raw]
  if missing:
    raise ValueError(f'the gin config binds no {missing} for train(); include a model gin '
                     '(models/...) and a run gin (runs/finetune.gin)')
  model = resolve('model')
  data_cfg = resolve('train_dataset_cfg')
  if lengths is None:
    lengths = dict(data_cfg.task_feature_lengths) if data_cfg and isinstance(
        data_cfg.task_feature_lengths, dict) else None
  if lengths is None:
    raise ValueError('no TASK_FEATURE_LENGTHS in the gin config: give --inputs_length and '
                     '--targets_length')
  if batch_size is None:
    batch_size = data_cfg.batch_size if data_cfg else 128
  part_ref = raw['partitioner']
  # Built here with the TPU's devices passed explicitly (they cannot be gin-bound: gin
  # deep-copies bound values); everything else of the partitioner comes from its bindings.
  partitioner_fn = lambda devices: part_ref.scoped_configurable_fn(devices=devices)
  return make_setup(model, topology, batch_size, lengths,
                     learning_rate_fn=resolve('learning_rate_fn'),
                     num_microbatches=resolve('num_microbatches'),
                     pack=data_cfg.pack if data_cfg else True, partitioner_fn=partitioner_fn,
                     param_dtype=resolve('param_dtype'))


# ----------------------------------------------------------------------------- bisection

@dataclasses.dataclass
class Search:
  best: Optional[Plan]  # the largest batch that compiled (None: not even the smallest)
  smallest_failure: Optional[Plan]  # the smallest batch that did not
  tried: List[Plan]


def find_max_batch(setup: Setup, start: Optional[int] = None, resolution: Optional[int] = None,
                   relative_resolution: float = 0.0, limit: int = 1 << 16,
                   log: Optional[Callable[[Plan], None]] = None) -> Search:
  """The largest batch whose train step fits: bracket it, then bisect.

  Batches are multiples of `setup.unit`; the search stops when the bracket is at most
  `resolution` wide (default: one unit, i.e. exact), or `relative_resolution` x the largest
  batch that fits (a compile of a 3B model takes minutes: 1/8 is close enough there).
  Bracketing goes up from `start` (up to `limit`, which is tried itself), or, when `start`
  does not fit, tries the smallest batch (if that does not fit either, nothing does).

  A compile that fits costs more than one the compiler rejects for HBM (that one stops at
  memory assignment: half the time for a 3B model here, a tenth for a tiny one), and peak
  memory grows roughly linearly with the batch. So after each batch that fits, the next probe
  is where a straight line through the peaks of the two largest fitting batches reaches HBM;
  after a batch that does not, plain bisection. Every answer is a real compile either way:
  the line only chooses where to look.
  """
  unit = setup.unit
  step = max(unit, (resolution or unit) // unit * unit)
  tried: Dict[int, Plan] = {}
  floor = lambda x: int(x) // unit * unit

  def fits(b):
    if b not in tried:
      tried[b] = setup.compile(b)
      if log:
        log(tried[b])
    return tried[b].fits

  def predicted() -> Optional[float]:
    ok = sorted(b for b, p in tried.items() if p.fits and p.peak)
    if len(ok) < 2:
      return None
    (b1, b2), (p1, p2) = ok[-2:], (tried[ok[-2]].peak, tried[ok[-1]].peak)
    # Flat peaks (under 1% apart) mean the compiler is rematerialising to fit, and a line
    # through them overshoots: large on a v5e-1 peaked at 13.17 and 13.18 GiB for batches 64
    # and 81, and the line said 3981 (a 471 s compile). Doubling instead.
    if p2 <= p1 * 1.01:
      return None
    return b2 + (tried[b2].hbm - p2) * (b2 - b1) / (p2 - p1)

  b = max(unit, floor(min(start or setup.batch_size, limit)))
  lo = hi = None
  if fits(b):
    lo = b
    while hi is None:
      guess = predicted()
      # Never past `limit`, but `limit` itself is tried: a search resumed between a batch
      # known to fit (`start`) and one known not to (`limit`) bisects between them.
      cand = min(2 * lo if guess is None else max(floor(guess), lo + step), floor(limit))
      if cand <= lo:
        break
      if fits(cand):
        lo = cand
      else:
        hi = cand
  else:  # does the smallest batch fit at all? Then bisect between it and `start`.
    hi = b
    if b > unit and fits(unit):
      lo = unit
    elif b > unit:
      hi = unit
  last_fit = True
  if lo is not None and hi is not None:
    while hi - lo > max(step, relative_resolution * lo):
      cand = floor((lo + hi) // 2)
      guess = predicted() if last_fit else None
      # A line that reaches HBM at or beyond `hi` is refuted by `hi` itself (memory is not
      # linear there, e.g. the compiler started rematerialising): bisect instead.
      if guess is not None and floor(guess) < hi:
        cand = min(max(floor(guess), lo + step), hi - step)
      if not lo < cand < hi:
        break
      last_fit = fits(cand)
      if last_fit:
        lo = cand
      else:
        hi = cand
  plans = [tried[k] for k in sorted(tried)]
  return Search(best=tried.get(lo) if lo else None,
                smallest_failure=tried.get(hi) if hi else None, tried=plans)


# ----------------------------------------------------------------------------- table

# Model parallelism per size for the docs table, after the t5 library's Colab (v2-8):
# small 1, base 2, large 8, 3B 8 (11B "too large"). On 4-device topologies at most 4.
TABLE_MODELS = ['t5_1_0/small', 't5_1_0/base', 't5_1_0/large', 't5_1_0/3B', 't5_1_0/11B',
                't5_1_1/small', 't5_1_1/base', 't5_1_1/large', 't5_1_1/xl', 't5_1_1/xxl']
_COLAB_PARTITIONS = {'small': 1, 'base': 2, 'large': 8, '3B': 8, 'xl': 8, '11B': 8, 'xxl': 8}


def table_partitions(model_name: str, num_devices: int) -> int:
  return min(_COLAB_PARTITIONS.get(model_name.split('/')[-1], 1), num_devices)


def gin_setup(model_name: str, topology: str, batch_size: int, lengths, num_partitions: int,
              remat: str = 'none', extra_bindings: Sequence[str] = ()) -> Setup:
  """The Setup of `models/<model_name>.gin` + `runs/finetune.gin` with a few overrides."""
  import gin
  from t5tpu import gin_utils
  gin.clear_config()
  bindings = [f'NUM_PARTITIONS = {num_partitions}', f'BATCH_SIZE = {batch_size}',
              f'TASK_FEATURE_LENGTHS = {dict(lengths)!r}',
              f"network.T5Config.remat_policy = '{remat}'", *extra_bindings]
  gin_utils.parse_gin([f'models/{model_name}.gin', 'runs/finetune.gin'], bindings,
                      finalize=False)
  return setup_from_gin(topology)


def table_rows(models: Sequence[str], topologies: Sequence[str], lengths, start: int = 32,
               remat: str = 'none', resolution_fraction: float = 0.125, limit: int = 4096,
               header: bool = True, out=sys.stdout,
               param_dtype: str = 'float32') -> List[dict]:
  """docs/tpu-memory.md: each model's largest fitting batch on each topology."""
  rows = []
  if header:
    print('| model | params | topology | model parallel | remat | parameter dtype | '
          'params+opt / core | largest batch that fits | peak at that batch | '
          'next batch tried | seconds |', file=out)
    print('|---|---|---|---|---|---|---|---|---|---|---|', file=out)
  for name in models:
    for topo in topologies:
      n = len(topology_devices(topo))
      mp = table_partitions(name, n)
      t0 = time.perf_counter()
      setup = gin_setup(name, topo, start, lengths, mp, remat,
                        extra_bindings=[f'PARAM_DTYPE = {param_dtype!r}'])
      unit = setup.unit
      search = find_max_batch(
          setup, start=start, relative_resolution=resolution_fraction, limit=limit,
          log=lambda p: print(f'{name} ' + p.summary().replace('\n', ' |'), file=sys.stderr,
                              flush=True))
      best, fail = search.best, search.smallest_failure
      probe = best or search.tried[0]
      n_params = setup.trainer.params_layout.num_values()
      row = dict(model=name, params=n_params, topology=topo, model_parallel=mp, remat=remat,
                 param_dtype=param_dtype,
                 state=probe.params + probe.opt_state,
                 max_batch=best.batch_size if best else 0,
                 peak=best.peak if best else None,
                 next_tried=fail.batch_size if fail else None,
                 seconds=time.perf_counter() - t0)
      rows.append(row)
      print(f"| {name} | {n_params / 1e9:.2f}B | {topo} | {mp} | {remat} | {param_dtype} | "
            f"{row['state'] / GiB:.2f} GiB | "
            f"{row['max_batch'] if best else 'DOES NOT FIT (batch ' + str(unit) + ')'} | "
            f"{_gib(row['peak']) if best else '-'} | "
            f"{('no (' + str(row['next_tried']) + ')') if fail else '-'} | "
            f"{row['seconds']:.0f} |", file=out, flush=True)
  return rows


# ----------------------------------------------------------------------------- CLI

def _parser():
  from t5tpu import gin_utils
  p = gin_utils.build_parser(
      'Compile the train step for a Cloud TPU topology and report per-core memory.')
  p.add_argument('--topology', action='append', default=[],
                 help=f'one of {", ".join(TOPOLOGIES)} (repeatable)')
  p.add_argument('--model', action='append', default=[],
                 help='a model gin name such as t5_1_1/xl: uses models/<name>.gin with '
                      'runs/finetune.gin when no --gin_file is given (with --table: '
                      'repeatable, default all sizes)')
  p.add_argument('--batch_size', type=int, default=None, help='default: the gin BATCH_SIZE')
  p.add_argument('--inputs_length', type=int, default=None)
  p.add_argument('--targets_length', type=int, default=None)
  p.add_argument('--find_max_batch', action='store_true',
                 help='bisect for the largest batch that fits')
  p.add_argument('--resolution', type=int, default=None,
                 help='stop bisecting when the bracket is this narrow (default: exact)')
  p.add_argument('--table', action='store_true',
                 help='the docs table: every model size on each --topology')
  p.add_argument('--remat', default=None, help="T5Config.remat_policy (default: the gin's; "
                 "with --table: 'none')")
  p.add_argument('--param_dtype', default=None, choices=('float32', 'bfloat16'),
                 help="PARAM_DTYPE, the trained parameters' dtype (default: the gin's; with "
                      '--table: float32)')
  p.add_argument('--limit', type=int, default=None,
                 help='the largest batch tried (default: 4096 with --table); with '
                      '--find_max_batch, the search bisects between --batch_size (or the '
                      "gin's BATCH_SIZE) and it, e.g. to resume one that stopped")
  p.add_argument('--no_header', action='store_true', help='--table only')
  return p


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only: no TPU is used or needed
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  _quiet_libtpu()
  import logging
  logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
  from t5tpu import gin_utils
  bindings, rest = gin_utils.split_gin_flags(list(argv))
  args = _parser().parse_args(rest)
  args.gin_bindings = list(args.gin_bindings) + bindings
  topologies = args.topology or ['v2-8']
  for t in topologies:
    if t not in TOPOLOGIES:
      raise SystemExit(f'unknown --topology {t!r}; choose from {", ".join(TOPOLOGIES)}')
  lengths = None
  if args.inputs_length or args.targets_length:
    lengths = {'inputs': args.inputs_length or 128, 'targets': args.targets_length or 32}
  if args.limit is not None and not (args.table or args.find_max_batch):
    raise SystemExit('--limit bounds a search: give it with --find_max_batch or --table')
  if args.table:
    table_rows(args.model or TABLE_MODELS, topologies,
               lengths or {'inputs': 128, 'targets': 32}, start=args.batch_size or 32,
               remat=args.remat or 'none', limit=4096 if args.limit is None else args.limit,
               header=not args.no_header,
               param_dtype=args.param_dtype or 'float32')
    return
  gin_files = list(args.gin_file)
  if not gin_files:
    if not args.model:
      raise SystemExit('give --gin_file=... (a run gin and a model gin) or --model=NAME')
    gin_files = [f'models/{args.model[0]}.gin', 'runs/finetune.gin']
  flag_bindings = ([f'PARAM_DTYPE = {args.param_dtype!r}'] if args.param_dtype else []) + (
      [f'network.T5Config.remat_policy = {args.remat!r}'] if args.remat else [])
  gin_utils.parse_gin(gin_files, args.gin_bindings + flag_bindings,
                      args.gin_search_paths.split(','), finalize=False)
  for topo in topologies:
    setup = setup_from_gin(topo, args.batch_size, lengths)
    print(f'{topo}: {TOPOLOGIES[topo].note}; mesh {dict(setup.trainer.partitioner.mesh.shape)}'
          f', lengths {setup.lengths}', flush=True)
    if args.find_max_batch:
      search = find_max_batch(setup, resolution=args.resolution,
                              limit=1 << 16 if args.limit is None else args.limit,
                              log=lambda p: print(p.summary(), flush=True))
      if search.best:
        above = (f'; {search.smallest_failure.batch_size} does not'
                 if search.smallest_failure else '; larger batches were not tried (--limit)')
        print(f'largest batch that fits {topo}: {search.best.batch_size}{above}')
      else:
        print(f'DOES NOT FIT {topo} at any batch (the smallest, {setup.unit}, needs more HBM)')
    else:
      print(setup.compile().summary(), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

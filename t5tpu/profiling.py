"""Where a compiled step's time goes: a jax profiler trace of a few steps, read back as a table.

`StepProfiler` traces a window of train steps (PROFILE_STEPS in runs/finetune.gin) into
MODEL_DIR/train/plugins/profile/<time>/, where TensorBoard's profile tab finds it
(`tensorboard --logdir MODEL_DIR`); `trace_calls` does the same for any function (the
benchmarks' --profile). `op_times` reads a trace back: the time of each XLA operation of one
compiled program, summed over the traced steps, with its kind (matmul, fusion, copy,
collective, ...) and the jax operation it came from, taken from the program's optimized HLO
text. `format_table` prints the time per kind, per part of the model (`part_of`) and of the
costliest operations.

Which events count: on a GPU or TPU, the operations on the device planes (kernels are summed
per HLO operation); on a CPU, XLA's per-operation events on the host threads. Loops and calls
(`while`, `conditional`, `call`) are left out: the operations inside them are recorded too.
On a CPU, independent operations may run at the same time on different threads, so the op
time of a step can exceed its wall time.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional

import jax

from t5tpu import distributed
from t5tpu import storage

log = logging.getLogger('t5tpu.profiling')

# Operations whose events enclose other recorded operations: counting them would count twice.
_CONTAINERS = {'while', 'conditional', 'call', 'async-start', 'async-done'}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'collective-broadcast', 'send', 'recv')
_MATMUL_TARGETS = re.compile(r'gemm|matmul|cublas|cudnn\$conv|onednn|dot', re.IGNORECASE)


@dataclasses.dataclass
class OpTime:
  """One XLA operation's time over the traced steps."""
  name: str  # the HLO instruction (e.g. fusion.12)
  kind: str  # matmul, fusion, copy/transpose, collective, other (see op_kinds)
  seconds: float
  count: int  # events recorded: executions (GPU: kernels)
  source: str = ''  # the jax operation it came from (HLO metadata op_name), when known


# ----------------------------------------------------------------------------- HLO text

@dataclasses.dataclass
class _Instruction:
  opcode: str
  calls: List[str]
  target: str
  source: str


_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<rest>.+)$')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')


def _after_shape(rest: str) -> str:
  """`rest` of an instruction line without its leading shape (a tuple shape has spaces)."""
  if rest.startswith('('):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        return rest[i + 1:]
  return rest.split(' ', 1)[1] if ' ' in rest else ''


def _parse_hlo(hlo_text: str):
  """{computation: {instruction: _Instruction}} of an HLO module's text."""
  computations: Dict[str, Dict[str, _Instruction]] = {}
  current: Optional[Dict[str, _Instruction]] = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and ' = ' not in line.split('(', 1)[0]:
      current = computations.setdefault(head.group('name'), {})
      continue
    m = _LINE.match(line)
    if current is None or m is None:
      continue
    op = re.match(r'\s*([\w\-]+)\(', _after_shape(m.group('rest')))
    if op is None:
      continue
    rest = m.group('rest')
    calls = re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)', rest)
    branches = re.findall(r'branch_computations=\{([^}]*)\}', rest)
    calls += [c.strip().lstrip('%') for group in branches for c in group.split(',')]
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    source = re.search(r'op_name="([^"]*)"', rest)
    current[m.group('name')] = _Instruction(op.group(1), calls, target.group(1) if target else '',
                                            source.group(1) if source else '')
  return computations


def _is_matmul(inst: _Instruction, computations, seen=frozenset()) -> bool:
  if inst.opcode in ('dot', 'convolution', 'ragged-dot'):
    return True
  if inst.opcode == 'custom-call' and _MATMUL_TARGETS.search(inst.target):
    return True
  if inst.opcode == 'fusion':
    for called in inst.calls:
      if called not in seen and any(
          _is_matmul(i, computations, seen | {called})
          for i in computations.get(called, {}).values()):
        return True
  return False


def _kind(inst: _Instruction, computations) -> str:
  op = inst.opcode
  if op in _CONTAINERS:
    return 'loop/call'
  if _is_matmul(inst, computations):
    return 'matmul'
  if any(op.startswith(c) for c in _COLLECTIVES):
    return 'collective'
  if op in ('copy', 'copy-start', 'copy-done', 'transpose'):
    return 'copy/transpose'
  if op == 'fusion':
    return 'fusion'
  return 'other'


def op_kinds(hlo_text: str) -> Dict[str, tuple]:
  """{instruction name: (kind, jax source op)} for every instruction of an HLO module's text
  (`jitted.lower(...).compile().as_text()`). Kinds: 'matmul' (dots, convolutions, GEMM
  custom calls and fusions that contain one), 'fusion' (other fusions: elementwise work and
  reductions), 'copy/transpose', 'collective', 'loop/call', 'other'."""
  computations = _parse_hlo(hlo_text)
  return {name: (_kind(inst, computations), inst.source)
          for insts in computations.values() for name, inst in insts.items()}


# ----------------------------------------------------------------------------- traces

def latest_trace(log_dir: str) -> str:
  """The newest .xplane.pb under log_dir/plugins/profile/ (jax.profiler's layout)."""
  found = glob.glob(os.path.join(log_dir, 'plugins', 'profile', '*', '*.xplane.pb'))
  if not found:
    raise FileNotFoundError(f'no profiler trace (*.xplane.pb) under {log_dir}/plugins/profile')
  return max(found, key=os.path.getmtime)


def _op_events(trace_file: str):
  """(device, op name, module name or None, seconds) of every per-operation event."""
  data = jax.profiler.ProfileData.from_file(trace_file)
  device, host = [], []
  for plane in data.planes:
    is_device = plane.name.startswith('/device:') and 'CUSTOM' not in plane.name
    if not (is_device or plane.name.startswith('/host:CPU')):
      continue
    lines = list(plane.lines)
    # A TPU's device plane has a line of XLA operations (beside one of whole programs), named
    # by operation; a GPU's kernels and a CPU's operations carry the operation as a stat.
    by_name = is_device and any(line.name == 'XLA Ops' for line in lines)
    if by_name:
      lines = [line for line in lines if line.name == 'XLA Ops']
    for line in lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get('hlo_op')
        if op is None and not by_name:
          continue  # host bookkeeping (and GPU events that name no HLO operation)
        # A CPU's devices share the host plane; its events say which device ran them.
        where = (plane.name, stats.get('device_ordinal'))
        row = (where, str(op or event.name), stats.get('hlo_module'), event.duration_ns * 1e-9)
        (device if is_device else host).append(row)
  return device or host


def op_times(trace_file: str, hlo_text: Optional[str] = None,
             module: Optional[str] = None) -> List[OpTime]:
  """Each XLA operation's time in the trace, summed over its executions and averaged over the
  devices traced, costliest first. `module`: only the program whose HLO module name contains
  this (e.g. 'train_step'); `hlo_text`: that program's optimized HLO, for kinds and sources."""
  kinds = op_kinds(hlo_text) if hlo_text else {}
  seconds: Dict[str, float] = collections.defaultdict(float)
  counts: Dict[str, int] = collections.Counter()
  devices = set()
  for device, op, mod, secs in _op_events(trace_file):
    if module is not None and mod is not None and module not in str(mod):
      continue
    devices.add(device)
    seconds[op] += secs
    counts[op] += 1
  n = max(len(devices), 1)
  rows = []
  for op, secs in seconds.items():
    kind, source = kinds.get(op, (_kind_by_name(op), ''))
    if kind == 'loop/call':
      continue
    rows.append(OpTime(op, kind, secs / n, round(counts[op] / n), source))
  return sorted(rows, key=lambda r: -r.seconds)


def _kind_by_name(op: str) -> str:
  """A kind from the operation's name alone, for operations the HLO text does not name."""
  if re.search(r'gemm|matmul|dot|conv', op, re.IGNORECASE):
    return 'matmul'
  if 'fusion' in op:
    return 'fusion'
  return _kind(_Instruction(op.split('.')[0], [], '', ''), {})


_NETWORK_PATH = re.compile(r'Transformer\.(?:encode|decode)/([^:()]*)')


def part_of(source: str) -> str:
  """The part of the model a jax operation belongs to, from its HLO op_name: the network's
  module path with the layer index dropped (all layers of a stack together), e.g.
  'encoder/mlp (backward)' or 'decoder/logits_dense (forward)'; the loss, and the rest
  outside the network (a train step's optimizer update and metrics, decoding's search)."""
  if not source:
    return 'unattributed'
  direction = 'backward' if 'transpose(' in source else 'forward'
  m = _NETWORK_PATH.search(source)
  if m is None:
    return f'loss ({direction})' if 'jvp(' in source else 'outside the network'
  path = [p for p in m.group(1).split('/') if p and not re.fullmatch(r'layers_\d+', p)]
  return f"{'/'.join(path[:2]) or 'network'} ({direction})"


def _rows(times: Dict[str, float], total: float, steps: int, top: int) -> List[str]:
  return [f'| {key} | {1e3 * secs / steps:.3f} | {secs / total:.1%} |'
          for key, secs in sorted(times.items(), key=lambda kv: -kv[1])[:top]]


def format_table(ops: List[OpTime], steps: int, top: int = 15, unit: str = 'step') -> str:
  """Time per kind of operation, per part of the model (when the HLO text gave sources), and
  the `top` costliest operations; per `unit` (ms; `steps` of them traced) and as a share of
  the op time."""
  total = sum(o.seconds for o in ops) or 1.0
  by_kind: Dict[str, float] = collections.defaultdict(float)
  by_part: Dict[str, float] = collections.defaultdict(float)
  for o in ops:
    by_kind[o.kind] += o.seconds
    by_part[part_of(o.source)] += o.seconds
  out = [f'op time per {unit}: {1e3 * total / steps:.2f} ms over {len(ops)} operations '
         f'({steps} {unit}(s) traced)', '', f'| kind | ms / {unit} | share |', '|---|---|---|']
  out += _rows(by_kind, total, steps, len(by_kind))
  if any(o.source for o in ops):
    out += ['', f'| part of the model | ms / {unit} | share |', '|---|---|---|']
    out += _rows(by_part, total, steps, top)
  out += ['', f'| operation | kind | ms / {unit} | share | from |', '|---|---|---|---|---|']
  for o in ops[:top]:
    source = o.source if len(o.source) <= 90 else '...' + o.source[-87:]
    out.append(f'| {o.name} | {o.kind} | {1e3 * o.seconds / steps:.3f} | '
               f'{o.seconds / total:.1%} | {source} |')
  return '\n'.join(out)


def trace_calls(run: Callable[[], Any], log_dir: str, calls: int,
                hlo_text: Optional[str] = None, module: Optional[str] = None,
                unit: str = 'call') -> str:
  """Traces `calls` calls of `run` (which waits for its results) into log_dir and returns
  format_table's table of them, per `unit` (a call)."""
  jax.profiler.start_trace(log_dir)
  try:
    for _ in range(calls):
      run()
  finally:
    jax.profiler.stop_trace()
  return format_table(op_times(latest_trace(log_dir), hlo_text, module), calls, unit=unit)


# ----------------------------------------------------------------------------- the train loop

class StepProfiler:
  """Traces train steps `first_step` to `first_step + num_steps - 1`.

  Call `before(step)` with the number of the step about to run (its state's step + 1) and
  `after(step, outputs, hlo_text_fn)` once it was dispatched; the trace is stopped (after
  waiting for `outputs`) when the window ends, copied to `log_dir` (which may be gs://), and
  its table logged and written beside it. Tracing costs little; the table needs the
  program's HLO text, which `hlo_text_fn()` gives (the compiled program is cached)."""

  def __init__(self, log_dir: str, first_step: int, num_steps: int):
    self.log_dir = log_dir
    self.first, self.last = first_step, first_step + num_steps - 1
    self._local: Optional[str] = None
    self.table: Optional[str] = None

  @property
  def active(self) -> bool:
    return self._local is not None

  def before(self, step: int) -> None:
    if step == self.first:
      self._local = (self.log_dir if not storage.is_remote(self.log_dir)
                     else tempfile.mkdtemp(prefix='t5tpu-profile-'))
      jax.profiler.start_trace(self._local)
      log.info('profiling steps %d to %d', self.first, self.last)

  def after(self, step: int, outputs: Any, hlo_text_fn) -> None:
    if not self.active or step != self.last:
      return
    jax.block_until_ready(outputs)
    jax.profiler.stop_trace()
    self.table = format_table(op_times(latest_trace(self._local), hlo_text_fn(),
                                       module='train_step'), self.last - self.first + 1)
    if storage.is_remote(self.log_dir):  # every host's trace (each names its file by host)
      storage.copy(os.path.join(self._local, 'plugins'), storage.join(self.log_dir, 'plugins'))
    self._drop_local()
    if distributed.is_primary():  # the table of this host's devices
      name = f'profile_steps_{self.first}_{self.last}.txt'
      storage.write_text(storage.join(self.log_dir, name), self.table + '\n')
      log.info('where steps %d to %d spent their time (trace: %s; table: %s):\n%s',
               self.first, self.last, storage.join(self.log_dir, 'plugins', 'profile'), name,
               self.table)

  def close(self) -> None:
    """Stops a trace the loop left running (an error, or fewer steps than the window)."""
    if self.active:
      jax.profiler.stop_trace()
      self._drop_local()

  def _drop_local(self) -> None:
    """Forgets the trace folder; a temporary one (for a gs:// log_dir) is deleted."""
    if storage.is_remote(self.log_dir):
      shutil.rmtree(self._local, ignore_errors=True)
    self._local = None

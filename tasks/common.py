"""Registration helpers shared by the task modules.

Importing a task module registers its tasks; importing it again (or reloading it, or importing
it from two gin files) must not fail, so registrations skip names that already exist.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping, Optional, Sequence

import seqio

log = logging.getLogger(__name__)


def text_to_text_preprocessors(*text_preprocessors: Callable) -> list:
  """The t5 library's pipeline: text preprocessing, tokenize, [cache here], trim + EOS."""
  return [*text_preprocessors, seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]


def add_task(name: str, source: seqio.DataSource, output_features: Mapping[str, seqio.Feature],
             preprocessors: Sequence[Callable], metric_fns: Sequence[Callable] = (),
             postprocess_fn: Optional[Callable] = None, replace: bool = False, **kwargs):
  """seqio.TaskRegistry.add, but a name that is already registered is kept (or replaced)."""
  if name in seqio.TaskRegistry.names():
    if not replace:
      return seqio.TaskRegistry.get(name)
    seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, source=source, output_features=output_features,
                                preprocessors=list(preprocessors), metric_fns=list(metric_fns),
                                postprocess_fn=postprocess_fn, **kwargs)


def add_mixture(name: str, tasks: Sequence, default_rate=None, replace: bool = False):
  if name in seqio.MixtureRegistry.names():
    if not replace:
      return seqio.MixtureRegistry.get(name)
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)


def rate_num_examples(known_sizes: Mapping[str, int], split: str = 'train') -> Callable:
  """A mixing rate proportional to each task's number of `split` examples.

  Like seqio.mixing_rate_num_examples, which asks TFDS for the size of the (sliced) split;
  when that is unknown (data not prepared yet, mocked data in tests) the published size in
  `known_sizes` is used instead, so a mixture can be built and inspected offline.
  """
  def rate(task: seqio.Task) -> float:
    try:
      n = task.num_input_examples(split)
    except Exception:  # pylint: disable=broad-except  # TFDS raises many kinds here
      n = None
    if not n:
      if task.name not in known_sizes:
        raise ValueError(f'size of {task.name}/{split} is unknown; prepare its data first')
      n = known_sizes[task.name]
    return float(n)
  return rate

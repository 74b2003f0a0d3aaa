"""Postprocessors: what seqio.Evaluator hands to the metric functions.

seqio calls `postprocess_fn(text, example=<the task's example>, is_target=...)` for every
target and every decoded prediction.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def qa_answers(output: str, example: Optional[Mapping[str, Any]] = None,
               is_target: bool = False):
  """Targets -> the list of all gold answers (`example['answers']`); predictions unchanged.

  Training uses one answer per question, but QA is scored against every acceptable answer
  (all TriviaQA aliases, all NQ/WQ answers), so the target side is replaced by that list.
  """
  if not is_target:
    return output
  if example is None or 'answers' not in example:
    return [_text(output)]
  answers = [_text(a) for a in list(example['answers'])]
  return answers or [_text(output)]


def lower_text(output: str, **unused_kwargs) -> str:
  """Lowercases targets and predictions (the t5 trivia Colab's exact-match setup)."""
  return _text(output).lower()


def strip_text(output: str, **unused_kwargs) -> str:
  return _text(output).strip()

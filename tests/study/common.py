"""Helpers for the study tests: the numbers of a markdown report's tables."""
import re

_NUMBER = re.compile(r'^-?\d+(\.\d+)?$')


def table_numbers(markdown: str) -> list:
  """Each table of the report as rows of its numeric cells ('–' is None; labels dropped)."""
  tables, current = [], None
  for line in markdown.splitlines():
    if line.startswith('|') and not line.startswith('|---'):
      cells = [c.strip() for c in line.strip('|').split('|')]
      if current is None:  # the header row
        current = []
        tables.append(current)
        continue
      row = [float(c) if _NUMBER.match(c) else None for c in cells[1:]]
      current.append([int(v) if v is not None and v.is_integer() and '.' not in c else v
                      for v, c in zip(row, cells[1:])])
    elif not line.startswith('|'):
      current = None
  return tables

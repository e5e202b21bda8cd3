"""Text corpora: `load_texts` turns a source name (the shipped prompts, local text / JSON /
Parquet files, program sources, or a hub dataset) into a list of documents, in corpus
order. `dtm.data` tokenizes them and cuts windows; it re-exports these names.
"""

from __future__ import annotations

import glob
import importlib.resources
import itertools
import os
from pathlib import Path
from typing import Any, Sequence

from dtm.errors import DtmError

# Short names for hub datasets: name -> (hub path, config name).
HUB_ALIASES = {
  'wikitext-2-raw-v1': ('wikitext', 'wikitext-2-raw-v1'),
  'wikitext-103-raw-v1': ('wikitext', 'wikitext-103-raw-v1'),
  'c4': ('allenai/c4', 'en'),
}
# Hub datasets too large to download whole; they are streamed and cut at max_docs.
STREAMED_HUB_PATHS = ('allenai/c4',)
LOCAL_BUILDERS = ('text', 'json', 'parquet')
# 'text-files': the text builder with one document per *file* (program text, where a
# line is no document); 'python-stdlib': that, over the running interpreter's own
# standard-library sources (code-domain prompts that need no download).
DOCUMENT_SOURCES = ('text-files', 'python-stdlib')
SUFFIX_BUILDERS = {
  '.txt': 'text', '.raw': 'text', '.tokens': 'text',
  '.jsonl': 'json', '.json': 'json', '.parquet': 'parquet',
}
COMPRESSION_SUFFIXES = ('.gz', '.bz2', '.xz', '.zst')
DEFAULT_PROMPTS = 'assets/prompts.txt'  # inside the dtm package
LOCAL_HINT = (
  'To use local files instead, pass e.g. --config.data.source=text '
  '--config.data.data_files=/path/to/wiki.test.raw (source may also be json, '
  'parquet or auto), or --config.data.source=default for the prompts shipped with dtm.')


# --------------------------------------------------------------------------- texts


def load_texts(source: str, *, split: str = 'test',
               data_files: str | Sequence[str] | None = None,
               text_field: str = 'text', max_docs: int | None = None) -> list[str]:
  """Loads a list of documents (strings), in corpus order.

  source:
    * 'default': the offline prompt set shipped in `dtm/assets/prompts.txt`, one
      document per line.
    * 'text' | 'json' | 'parquet' with `data_files` (a path, glob or list of them):
      `datasets.load_dataset(source, data_files=..., split='train')`; `split` is
      ignored (local files form one split). 'auto' picks the builder from the file
      suffix (.txt/.raw/.tokens -> text, .json/.jsonl -> json, .parquet -> parquet).
      The text builder yields one document per line, empty lines included (so the
      count equals the file's line count); it opens files with universal newlines,
      so CRLF files (the WikiText raw files) come back without '\\r' - and a lone
      '\\r' also ends a line. Any remaining trailing '\\r' is stripped.
    * 'text-files' with `data_files`: the text builder with sample_by='document', one
      document per file (files in sorted path order), e.g. program sources.
    * 'python-stdlib': 'text-files' over `python_stdlib_files()` (the top-level *.py
      modules of this interpreter's standard library, sorted by name) unless
      `data_files` names other files: program text available on every machine.
    * a hub dataset: an alias in HUB_ALIASES ('wikitext-2-raw-v1', 'c4', ...) or
      'owner/name[:config]'. 'c4' (allenai/c4 'en') is streamed and needs max_docs.
  max_docs: keep only the first max_docs documents (None: all).

  Raises DtmError when the hub cannot be reached (offline, no cache), a local
  file is missing or unreadable, or `text_field` is not a column.
  """
  if max_docs is not None and max_docs < 1:
    raise DtmError(f'data.max_docs must be >= 1 or None, got {max_docs}.')
  if source == 'default':
    return _first(_default_prompts(), max_docs)
  if source == 'python-stdlib':
    return _load_local('text-files', data_files or python_stdlib_files(), text_field, max_docs)
  if source == 'auto' or source in LOCAL_BUILDERS or source == 'text-files':
    return _load_local(source, data_files, text_field, max_docs)
  if data_files is not None:
    raise DtmError(
      f'data.data_files is set but data.source={source!r} is a hub dataset; use '
      f"data.source in {('auto',) + LOCAL_BUILDERS} for local files.")
  return _load_hub(source, split, text_field, max_docs)


def python_stdlib_files() -> list[str]:
  """The top-level *.py files of this interpreter's standard library, sorted (absolute
  paths); raises DtmError when there are none (an embedded Python without sources)."""
  import sysconfig
  root = sysconfig.get_paths()['stdlib']
  files = sorted(glob.glob(os.path.join(root, '*.py')))
  if not files:
    raise DtmError(f'data.source=python-stdlib: no *.py files under {root}; this Python has '
                   'no standard-library sources; point data.source=text-files at program '
                   'files instead.')
  return files


def _first(texts: list[str], max_docs: int | None) -> list[str]:
  return texts if max_docs is None else texts[:max_docs]


def _default_prompts() -> list[str]:
  """Non-empty lines of the shipped prompt file."""
  text = importlib.resources.files('dtm').joinpath(DEFAULT_PROMPTS).read_text('utf-8')
  return [line.strip() for line in text.splitlines() if line.strip()]


def _as_file_list(data_files: str | Sequence[str] | None) -> list[str]:
  if data_files is None or (not isinstance(data_files, str) and not data_files):
    raise DtmError('data.source is a local-file builder but data.data_files is empty; '
                   'set --config.data.data_files=/path/to/file.')
  return [data_files] if isinstance(data_files, str) else list(data_files)


def _resolve_files(data_files: str | Sequence[str] | None) -> list[str]:
  """Expands '~' and globs; every entry must name at least one existing file."""
  resolved = []
  for pattern in _as_file_list(data_files):
    path = os.path.expanduser(str(pattern))
    matches = sorted(glob.glob(path)) if any(c in path for c in '*?[') else [path]
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise DtmError(f'data file not found: {path} (from data.data_files); check the path.')
    resolved.extend(os.path.abspath(m) for m in matches)
  return resolved


def infer_builder(path: str) -> str:
  """'text' | 'json' | 'parquet' from a file name's suffix (ignoring .gz etc.)."""
  name = path.lower()
  for compression in COMPRESSION_SUFFIXES:
    name = name.removesuffix(compression)
  builder = SUFFIX_BUILDERS.get(Path(name).suffix)
  if builder is None:
    raise DtmError(
      f'cannot infer the file format of {path} from its suffix (known: '
      f'{sorted(SUFFIX_BUILDERS)}); set data.source to text, json or parquet.')
  return builder


def _load_local(source: str, data_files: Any, text_field: str,
                max_docs: int | None) -> list[str]:
  import datasets  # Deferred: importing datasets takes ~1 s.

  files = _resolve_files(data_files)
  if all(os.path.getsize(f) == 0 for f in files):
    raise DtmError(f'no data: data.data_files {files} {"is" if len(files) == 1 else "are"} '
                   'empty (0 bytes); point it at a file with text.')
  if source == 'auto':
    builders = {infer_builder(f) for f in files}
    if len(builders) != 1:
      raise DtmError(f'data.data_files mixes formats {sorted(builders)}; use one format.')
    source = builders.pop()
  kwargs = {}
  if source == 'text-files':
    source, kwargs = 'text', {'sample_by': 'document'}
  try:
    ds = datasets.load_dataset(source, data_files=files, split='train', **kwargs)
  except Exception as e:  # datasets raises many types; all mean "unreadable file".
    raise DtmError(f'could not read {files} with the datasets {source!r} builder '
                   f'({type(e).__name__}: {_first_line(e)}); check the file format.') from e
  _check_field(ds.column_names, text_field, files)
  if max_docs is not None:
    ds = ds.select(range(min(max_docs, len(ds))))
  texts = list(ds[text_field])
  if source == 'text':
    texts = [t.rstrip('\r') for t in texts]
  return texts


def parse_hub_source(source: str) -> tuple[str, str | None]:
  """'owner/name[:config]' or an alias -> (hub path, config name or None)."""
  if source in HUB_ALIASES:
    return HUB_ALIASES[source]
  path, _, name = source.partition(':')
  if not path:
    raise DtmError(f'bad data.source {source!r}; expected a hub id like owner/name[:config].')
  return path, name or None


def _load_hub(source: str, split: str, text_field: str, max_docs: int | None) -> list[str]:
  import datasets  # Deferred: importing datasets takes ~1 s.

  path, name = parse_hub_source(source)
  streaming = path in STREAMED_HUB_PATHS
  if streaming and max_docs is None:
    raise DtmError(f'{path} is streamed and has no end in practice; set data.max_docs.')
  if path == 'allenai/c4' and split not in ('train', 'validation'):
    raise DtmError(f"allenai/c4 has splits 'train' and 'validation', not {split!r}; "
                   'set --config.data.split=validation.')
  where = f'{path}' + (f' ({name})' if name else '') + f' split {split!r}'
  try:
    ds = datasets.load_dataset(path, name, split=split, streaming=streaming)
    if streaming:
      rows = list(itertools.islice(iter(ds), max_docs))
      columns = list(rows[0]) if rows else [text_field]
    else:
      columns = ds.column_names
  except Exception as e:  # Offline, unknown id, HTTP errors: one user-facing message.
    raise DtmError(f'could not load dataset {where} from the Hugging Face hub '
                   f'({type(e).__name__}: {_first_line(e)}). {LOCAL_HINT}') from e
  _check_field(columns, text_field, where)
  if streaming:
    return [row[text_field] for row in rows]
  if max_docs is not None:
    ds = ds.select(range(min(max_docs, len(ds))))
  return list(ds[text_field])


def _check_field(columns: Sequence[str] | None, text_field: str, where: Any) -> None:
  if columns is not None and text_field not in columns:
    raise DtmError(f'{where} has no column {text_field!r} (columns: {list(columns)}); '
                   'set data.text_field.')


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else ''

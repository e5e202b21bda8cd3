"""The one exception type that `main.py` turns into a one-line message and exit code 2."""


class DtmError(Exception):
  """A user-facing error: bad config, missing/corrupt checkpoint, bad data.

  The message must name the problem and, where possible, what to do instead.
  `main.py` prints `error: <message>` (no traceback) and exits with status 2.
  """

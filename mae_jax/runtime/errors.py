"""The project's error types.

Each `UserError` is a problem with what the user gave (a config, a data folder, a
workdir, a checkpoint) or a run that diverged: `main.py` prints its message as one
line, `error: ...`, without a traceback. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
  """A problem the user can fix; the message says what and how."""


class ConfigError(UserError, ValueError):
  """One or more config problems; the message lists them all."""


class LayoutError(UserError, ValueError):
  """A folder does not follow the DeepLense layout."""


class BadDataError(UserError, ValueError):
  """The source folder holds files that cannot be used (and skipping is off)."""


class SimulationMismatchError(UserError, ValueError):
  """A simulated folder was made with other settings than those asked for now."""


class WorkdirBusyError(UserError, RuntimeError):
  """Another run holds the workdir's lock; the message names it."""


class NonFiniteError(UserError, FloatingPointError):
  """A loss, gradient or param became NaN/inf; nothing of it is saved."""


class ResumeMismatchError(UserError, ValueError):
  """The workdir's checkpoint was made with settings that would change the batch order."""


class MissingCheckpointError(UserError, FileNotFoundError):
  """The stage to start from has no checkpoint; says which command makes one."""


class IncompatibleCheckpointError(UserError, ValueError):
  """A checkpoint of another architecture; names the first mismatched param."""


class ConversionError(UserError, ValueError):
  """A weights file that cannot be loaded into the target params."""


class InsufficientDataError(UserError, ValueError):
  """A split holds fewer examples than the config asks for."""


class DamagedCheckpointError(UserError, OSError):
  """No checkpoint of a folder restores (truncated or missing files); names each step and
  what is wrong with it."""


class CheckpointSaveError(UserError, OSError):
  """A checkpoint could not be written (a full disk, a lost mount); the older ones stand."""

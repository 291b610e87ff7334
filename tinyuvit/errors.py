"""The project's own expected errors: bad input, missing data or devices, refused resumes.

Everything a user can get wrong raises a subclass of `TinyUViTError`. The command line prints
those as one line ("Error: ...", exit status 1) and lets every other exception, which means a
bug (in tinyuvit, or in a layer a learner has just changed), show its full traceback.
`TINYUVIT_DEBUG=1` or `tinyuvit --debug ...` shows the traceback of expected errors too.

The classes that describe a bad value also subclass ValueError, so code that catches ValueError
keeps working.
"""


class TinyUViTError(Exception):
    """Base class of every error that is the user's input, files or machine, not a bug."""


class ConfigError(TinyUViTError, ValueError):
    """An invalid option, setting or configuration value (the message names it)."""


class BackendError(TinyUViTError, RuntimeError):
    """The requested device cannot be used (no CuPy, no GPU, unknown name)."""


class DataError(TinyUViTError, ValueError):
    """A data file is missing, truncated, corrupt or not the file it should be."""


class DownloadError(DataError):
    """No mirror delivered a good copy of a file."""


class CheckpointError(TinyUViTError, ValueError):
    """A checkpoint is missing, unreadable, incomplete, or from another configuration."""


class TrainingError(TinyUViTError, RuntimeError):
    """Training cannot go on (a NaN loss or weights, a locked run folder); says what to do."""


class DivergedError(TrainingError):
    """Training diverged: the loss, a gradient or the weights stopped being finite."""

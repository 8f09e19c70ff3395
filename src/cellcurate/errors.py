"""One exception family for cellcurate.

Every error also inherits the matching builtin, so callers can catch either
``CellcurateError`` or e.g. ``ValueError`` / ``FileNotFoundError``. The CLI turns
any ``CellcurateError`` into one line on stderr and a non-zero exit.

Messages name the file (when there is one) and say what was expected and what came::

    raise InputFormatError(path, f"masks.npy has {c} channels, expected 6")
    # -> "Fold 1/masks/fold1/masks.npy: masks.npy has 5 channels, expected 6"
"""

from __future__ import annotations

from os import PathLike


class CellcurateError(Exception):
    """Base class of every error cellcurate raises on purpose."""

    def __init__(self, *args: object, path: str | PathLike[str] | None = None) -> None:
        super().__init__(*args)
        self.path = None if path is None else str(path)

    def __reduce__(self) -> tuple[object, ...]:
        # pickle (errors raised in ingest worker processes travel back to the parent): rebuild
        # without calling the subclass __init__, whose signature differs from ``args``
        return (_rebuild, (type(self), self.args, self.__dict__))

    def __str__(self) -> str:
        msg = super().__str__()
        if self.path and not msg.startswith(self.path):
            return f"{self.path}: {msg}"
        return msg


def _rebuild(cls: type[CellcurateError], args: tuple[object, ...], state: dict[str, object]) -> CellcurateError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class InputFormatError(CellcurateError, ValueError):
    """An input file exists but is malformed (truncated npy, bad XML, wrong shape, ...)."""

    def __init__(self, path: str | PathLike[str] | None, message: str) -> None:
        super().__init__(message, path=path)


class InputNotFoundError(CellcurateError, FileNotFoundError):
    """An input file or folder that should exist does not."""

    def __init__(self, path: str | PathLike[str] | None, message: str) -> None:
        super().__init__(message, path=path)


class StoreError(CellcurateError, RuntimeError):
    """The store is missing, locked, inconsistent or not writable."""

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        super().__init__(message, path=path)


class ConfigError(CellcurateError, ValueError):
    """A user option or configuration value is invalid."""


class StateError(CellcurateError, RuntimeError):
    """The operation is not allowed in the current state (e.g. round N-1 missing, version exists)."""


class ModelError(CellcurateError, ValueError):
    """Model weights or checkpoints are missing, mismatched or unsafe."""

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        super().__init__(message, path=path)

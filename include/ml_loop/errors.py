"""Exceptions raised by the stages, each with a message that names the value and the fix."""


class MlLoopError(Exception):
    """Base class for every error a stage raises on purpose."""


class SpecError(MlLoopError, ValueError):
    """A pipeline spec or a run param is invalid."""


class PartitionNotFoundError(MlLoopError, FileNotFoundError):
    """The landing partition of a run's date does not exist."""


class DataValidationError(MlLoopError):
    """A batch failed a batch-level expectation or a file was rejected as a whole."""


class TrainingError(MlLoopError):
    """Training stopped on purpose, for example on a non-finite loss."""


class DeployError(MlLoopError):
    """The model server did not serve the new champion correctly; the alias was rolled back."""


class InvalidReferenceError(MlLoopError, ValueError):
    """A dict passed between stages lacks keys of the reference it stands for."""

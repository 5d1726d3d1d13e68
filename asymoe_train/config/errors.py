"""The errors a user fixes, each reported as one line naming the key or path and the fix (no traceback unless
``HYDRA_FULL_ERROR=1`` or ``--debug``; see asymoe_train.cli). Defined here, in the bottom layer, so every layer can
raise them."""


class ConfigError(ValueError):
    """A configuration mistake, reported as one line naming the key and the fix."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason outside the code: its data, its numbers, its disk or its checkpoints."""


class DataBudgetError(RunError):
    """More samples were skipped (unreadable, malformed, too long) than ``data.max_bad_fraction`` allows."""


class DivergenceError(RunError):
    """Training diverged: ``training.max_skipped_steps`` optimizer steps in a row had a non-finite loss or gradient
    norm, or the weights about to be saved are not finite."""


class CheckpointError(RunError):
    """A checkpoint or export that is missing, incomplete, or fails verification against its manifest."""


class SaveError(RunError):
    """A checkpoint could not be written (e.g. the disk is full); its temporary directory has been removed."""

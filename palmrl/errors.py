"""User-facing errors: one line naming the culprit, exit code 2, no traceback.

Raise `UserError` for any mistake a user can fix (bad config key, missing file, malformed data
line, wrong checkpoint); the CLI prints `palmrl: error: <message>` and exits 2.
"""


class UserError(Exception):
    """A mistake in the user's input; the message names the key, file or line at fault."""

    exit_code = 2


class TrainingDiverged(UserError):
    """Training hit NaN/Inf or a KL blow-up; the last good checkpoint is kept (exit code 3)."""

    exit_code = 3


class Preempted(UserError):
    """SIGTERM/SIGINT stopped training after a checkpoint was written: not a failure (exit code 0)."""

    exit_code = 0

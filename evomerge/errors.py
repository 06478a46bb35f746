"""The one exception type for mistakes a user can make.

Anything raised as `UserError` reaches the terminal as a single sentence and exit code 2
(see `evomerge.cli`). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: bad recipe, missing model, wrong task name, ..."""

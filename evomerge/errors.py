"""The exception types everything else may raise: a user's mistake, and a candidate that
cannot be scored.

Anything raised as `UserError` reaches the terminal as a single sentence and exit code 2
(see `evomerge.cli`). A `CandidateError` fails one trial and the search goes on. Everything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: bad recipe, missing model, wrong task name, ..."""


class CandidateError(Exception):
    """A candidate that cannot be scored (non-finite weights, ...): the trial fails, the
    search goes on. Raised by the spaces' candidates and by a backend that merges as it loads
    (the vLLM engine), so it lives at the bottom layer."""

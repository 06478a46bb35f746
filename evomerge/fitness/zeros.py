"""Silent zeros: a task on which every model a command scored got exactly 0.

A correct model that scores 0.0000 is almost always a format mismatch, not a bad model: the
target differs from what the model writes, lm-eval's `target_delimiter` (0.4.13 ignores it on
loglikelihood tasks, so the default " " stays in front of the target), or an instruct model
scored outside its chat template. `evaluate`, the start of a search (its baselines) and the
report say so in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def all_zero_tasks(
    scores: Iterable[Mapping[str, float]], maximize: Mapping[str, bool]
) -> list[str]:
    """The tasks (larger-is-better metrics only) on which every one of `scores` (one mapping of
    task -> value per model) is exactly 0; none when nothing was scored."""
    rows = [row for row in scores if row]
    if not rows:
        return []
    names = [name for name in rows[0] if maximize.get(name, True)]
    return [name for name in names if all(row.get(name) == 0 for row in rows)]


def zero_warning(tasks: list[str], *, who: str = "every model scored") -> str:
    """One line naming the tasks and the likely causes."""
    return (
        f"{', '.join(tasks)}: {who} exactly 0; check the target format (the answer as the "
        "model writes it), the delimiter (lm-eval ignores target_delimiter on loglikelihood "
        "tasks: put any space in doc_to_target) and the chat template (instruct models need "
        "fitness.apply_chat_template: true)."
    )

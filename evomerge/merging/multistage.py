"""Multi-stage recipes: mergekit-multi's YAML of named merges, run one stage after another.

A multi-stage recipe is a YAML file of several documents, each an ordinary recipe plus a
`name`. A model reference equal to an earlier stage's name means that stage's output, so
"merge A and B, then merge the result with C" is

    name: ab
    merge_method: slerp
    base_model: A
    models: [{model: A}, {model: B}]
    parameters: {t: 0.5}
    ---
    merge_method: slerp
    base_model: ab
    models: [{model: ab}, {model: C}]
    parameters: {t: 0.3}

The document without a name is the final merge (at most one may lack a name; if all are
named, the last document is the final one). As in mergekit-multi, each intermediate is
written as a model folder (its recipe's dtype and out_dtype) and read back by the stages that
use it, so every stage equals mergekit's; the folders live in a scratch folder beside the
output, removed afterwards. Stages the final merge does not use are skipped.
"""

from __future__ import annotations

import logging
import reprlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import UserError
from evomerge.merging.recipe import Recipe, check_file_size, load_recipe, validate_model

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the final merge
    recipe: Recipe  # model references may name earlier stages

    def inputs(self) -> list[str]:
        """Every model reference: the inputs, and the tokenizer's source."""
        models = self.recipe.model_paths()
        return models + [m for m in self.recipe.tokenizer_models() if m not in models]


# --- reading -----------------------------------------------------------------------------
def load_stages(path: Path) -> list[Stage]:
    """The stages of a recipe file: one unnamed stage for an ordinary recipe."""
    path = Path(path)
    documents = _documents(path)
    if documents is None:  # one document (or an unreadable file): the ordinary reader
        return [Stage(None, load_recipe(path))]
    stages = []
    for number, data in enumerate(documents, start=1):
        where = f"{path} (document {number})"
        if not isinstance(data, dict):
            raise UserError(
                f"{where}: expected a mapping of recipe keys, got {type(data).__name__}"
            )
        data = dict(data)
        name = data.pop("name", None)
        if name is not None and not _is_plain_name(name):
            raise UserError(
                f"{where}: name {reprlib.repr(name)} must be a plain word of at most "
                f"{_MAX_NAME} printable characters (it names a folder: no '/', not '.' or '..')"
            )
        stages.append(Stage(name, validate_model(Recipe, data, where)))
    _check_names(stages, path)
    return stages


def _documents(path: Path) -> list[Any] | None:
    """The file's YAML documents if they are stages (two or more, or one with a name)."""
    check_file_size(path, "recipe")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None  # load_recipe says why in one sentence
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:  # worded as load_recipe words it, but for any document
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path}: {problem or 'malformed YAML'}{where}") from None
    named = len(documents) == 1 and isinstance(documents[0], dict) and "name" in documents[0]
    return documents if len(documents) > 1 or named else None


_MAX_NAME = 100  # a stage name is a folder name: file systems allow 255 bytes, less a prefix


def _is_plain_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\")
        and len(name.encode()) <= _MAX_NAME
        and name.isprintable()  # no NUL, newline or other control characters
    )


def _check_names(stages: list[Stage], path: Path) -> None:
    names = [s.name for s in stages if s.name is not None]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{path}: two stages are named {repeated[0]!r}; stage names must differ")
    if len(stages) - len(names) > 1:
        raise UserError(
            f"{path}: more than one document has no name; only the final merge may lack one"
        )
    _in_order(stages, final_stage(stages), str(path))  # refuses cycles before anything runs


def final_stage(stages: list[Stage]) -> Stage:
    """The unnamed stage, else the last one."""
    return next((s for s in stages if s.name is None), stages[-1])


def _in_order(stages: list[Stage], final: Stage, where: str) -> list[Stage]:
    """The stages `final` needs, each after the stages it reads (depth first)."""
    by_name = {s.name: s for s in stages if s.name is not None}
    order: list[Stage] = []
    visiting: list[str] = []

    def visit(stage: Stage) -> None:
        if stage in order:
            return
        if stage.name in visiting:
            cycle = " -> ".join(visiting[visiting.index(stage.name) :] + [stage.name])
            raise UserError(f"{where}: the stages refer to each other in a cycle ({cycle})")
        visiting.append(stage.name)
        for ref in stage.inputs():
            if ref in by_name:
                visit(by_name[ref])
        visiting.pop()
        order.append(stage)

    visit(final)
    return order


# --- running -----------------------------------------------------------------------------
def run_stages(
    stages: list[Stage],
    out_dir: Path,
    *,
    out_dtype: str | None = None,
    intermediate_dir: Path | None = None,
    **options,
):
    """Merge every stage the final one needs, in order, and the final one into `out_dir`.

    `options` are run_merge's (seed, device, shard_bytes, force, ...); `out_dtype` applies to
    the final merge only. Intermediates go to `intermediate_dir/NAME` (kept) if given, else to
    a scratch folder beside `out_dir` (removed). Returns the final merge's summary, with the
    tensors, bytes and seconds of all stages.
    """
    from evomerge.io.output import check_output_folder, remove_stale_staging, scratch_folder
    from evomerge.merging.executor import MergeSummary, run_merge

    if len(stages) == 1:
        return run_merge(stages[0].recipe, out_dir, out_dtype=out_dtype, **options)
    final = final_stage(stages)
    order = _in_order(stages, final, "the recipe")
    for stage in stages:
        if stage not in order:
            LOG.warning("stage %r is not used by the final merge; skipped", stage.name)
    # the final folder is checked before the stages' work, not after it
    check_output_folder(Path(out_dir), force=options.get("force", False))
    scratch = None
    if intermediate_dir is None:
        beside = _existing_parent(out_dir) / Path(out_dir).name
        remove_stale_staging(beside)  # the scratch folders of killed multi-stage merges
        scratch = scratch_folder(beside, "stages")
    root = Path(intermediate_dir or scratch)
    folders: dict[str, str] = {}  # stage name -> its output folder
    summaries = []
    try:
        for stage in order:
            recipe = _with_stage_folders(stage.recipe, folders)
            try:
                if stage is final:
                    # the caller's files (export's model card) and the stages' recipe.yaml
                    files = {**(options.get("extra_files") or {}), **_recipe_file(order)}
                    summary = run_merge(
                        recipe, out_dir, out_dtype=out_dtype, **{**options, "extra_files": files}
                    )
                else:
                    folder = root / stage.name
                    summary = run_merge(
                        recipe, folder, **{**options, "force": True, "extra_files": None}
                    )
                    folders[stage.name] = str(folder)
            except UserError as exc:
                label = "the final merge" if stage is final else f"stage {stage.name!r}"
                raise UserError(f"{label}: {exc}") from None
            summaries.append(summary)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    last = summaries[-1]
    return MergeSummary(
        tensors=sum(s.tensors for s in summaries),
        bytes_written=sum(s.bytes_written for s in summaries),
        bytes_read=sum(s.bytes_read for s in summaries),
        seconds=sum(s.seconds for s in summaries),
        out_dir=last.out_dir,
    )


def _existing_parent(out_dir: Path) -> Path:
    """The innermost existing folder above `out_dir` (the scratch folder's home)."""
    parent = Path(out_dir).absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _with_stage_folders(recipe: Recipe, folders: dict[str, str]) -> Recipe:
    """`recipe` with each reference to an earlier stage replaced by that stage's folder."""
    data = recipe.model_dump(exclude_none=True)

    def swap(ref: str) -> str:
        return folders.get(ref, ref)

    for model in data.get("models", []):
        model["model"] = swap(model["model"])
    for slice_ in data.get("slices", []):
        for source in slice_["sources"]:
            source["model"] = swap(source["model"])
        if "base_model" in slice_:
            slice_["base_model"] = swap(slice_["base_model"])
    for key in ("base_model", "tokenizer_source"):
        if key in data and data[key] not in ("union", "base"):
            data[key] = swap(data[key])
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, dict):
        if tokenizer.get("source") not in (None, "union", "base"):
            tokenizer["source"] = swap(tokenizer["source"])
        for entry in (tokenizer.get("tokens") or {}).values():
            donor = entry.get("source") if isinstance(entry, dict) else None
            if isinstance(donor, str):
                entry["source"] = swap(donor)
            elif isinstance(donor, dict) and "model" in donor:
                donor["model"] = swap(donor["model"])
    return Recipe.model_validate(data)


def _recipe_file(order: list[Stage]) -> dict[str, str]:
    """recipe.yaml for the output: the stages it was made from, as mergekit-multi reads them
    (written after run_merge's own one-stage recipe.yaml, so it replaces it)."""
    documents = [
        (f"name: {yaml.safe_dump(s.name).splitlines()[0]}\n" if s.name else "") + s.recipe.to_yaml()
        for s in order
    ]
    return {"recipe.yaml": "---\n".join(documents)}

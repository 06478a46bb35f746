"""Merge recipes: mergekit-compatible YAML in and out.

A recipe names a merge method, its input models (either `models:` or layer `slices:`), and
parameter settings at three levels (per source > per slice > global). A setting is a scalar, a
gradient (a list of numbers interpolated over the layers of a slice), or a list of
`{filter, value}` entries of which the first whose filter occurs in the tensor name wins.
`resolve_setting` turns a setting into a concrete value for one tensor.

Parsing checks the method and every parameter name against the registry, at every level, so a
typo (`densty`) is refused with the closest valid name instead of silently merging at the
default. The names are the ones mergekit 0.1.5 declares for the same method.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import UserError
from evomerge.io.dtypes import MERGE_DTYPES

Scalar = bool | int | float | str


class ConditionalSetting(BaseModel):
    """`{filter: "self_attn", value: 0.5}`: applies where `filter` occurs in the tensor name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Scalar | list[Scalar]


Setting = Scalar | list[Scalar] | list[ConditionalSetting]
Parameters = dict[str, Setting]


LOG = logging.getLogger(__name__)


def _registered_method(name: str):
    """The registered method called `name` (a `UserError` naming the closest one)."""
    from evomerge.methods import get_method  # the methods import torch: only once a recipe is read

    return get_method(name)


@contextmanager
def registry_errors_as_validation_errors(where: str = "") -> Iterator[None]:
    """Inside a pydantic validator: turn the registry's `UserError` (unknown method or parameter)
    into a validation error, which `validate_model` reports with the file name; `where` is the
    path to the field when pydantic cannot know it (a model validator)."""
    try:
        yield
    except UserError as exc:
        raise ValueError(f"{where}: {exc}" if where else str(exc)) from None


def _ignored(method, name: str) -> bool:
    """True when `method` does not take `name` but another registered method does: a name
    no method declares is a typo, refused with the closest valid name."""
    from evomerge.methods.registry import registered_methods

    if any(param.name == name for param in method.params):
        return False
    return any(param.name == name for m in registered_methods() for param in m.params)


def _known_method(name: str) -> str:
    with registry_errors_as_validation_errors():
        _registered_method(name)
    return name


MethodName = Annotated[str, AfterValidator(_known_method)]
"""The name of a registered merge method (recipes' `merge_method`, spaces' `method`)."""


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must satisfy 0 <= start < end")
        return value


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return self


class ModelTokenSource(BaseModel):
    """`{kind: model_token, model: M, token: "<x>"}` (or `token_id: 5`): a token's embedding
    taken from another token's row of model M."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        return self


class ZeroSource(BaseModel):
    """`{kind: zero}`: a token's embedding is all zeros."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


TokenSource = Annotated[ModelTokenSource | ZeroSource, Field(discriminator="kind")]


class TokenEmbedding(BaseModel):
    """How one token of the output vocabulary gets its embedding (mergekit's `tokens:` entry);
    `force` uses the source even for models that have the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: TokenSource | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer:` block: the output vocabulary (`union`, `base` or a model), the
    embeddings of chosen tokens, and padding of the vocabulary to a multiple."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


class Recipe(BaseModel):
    """A merge recipe, field for field as mergekit 0.1.5 reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    merge_method: MethodName
    models: list[InputModel] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    statistics: dict[str, str] | None = None
    """Model reference -> its input statistics file, for a method that reads them (RegMean;
    an evomerge extension, not in mergekit)."""

    @model_validator(mode="after")
    def _models_xor_slices(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty; give at least one slice")
        for field in ("dtype", "out_dtype"):
            value = getattr(self, field)
            if value is not None and value not in MERGE_DTYPES:
                raise ValueError(f"{field} {value!r} is not one of {', '.join(MERGE_DTYPES)}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @model_validator(mode="after")
    def _statistics_where_read(self) -> Recipe:
        with registry_errors_as_validation_errors("merge_method"):
            method = _registered_method(self.merge_method)
        if method.statistics and not self.statistics:
            raise ValueError(
                f"merge method {method.name!r} needs each model's input statistics: give "
                "'statistics' (model -> .safetensors file; `evomerge search` writes them)"
            )
        if self.statistics and not method.statistics:
            raise ValueError(f"merge method {method.name!r} reads no 'statistics'; remove them")
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        from evomerge.merging.chat_templates import check_chat_template

        return check_chat_template(value)

    @model_validator(mode="after")
    def _known_parameters(self) -> Recipe:
        method = _registered_method(self.merge_method)
        for where, parameters in self._parameter_scopes():
            for name in parameters or {}:
                if _ignored(method, name):
                    # mergekit ignores a parameter another method takes (a `weight` left in a
                    # recipe switched to slerp): so does evomerge, but it says so
                    LOG.warning(
                        "%s.%s: merge method %r takes no %r parameter; it is ignored",
                        where,
                        name,
                        method.name,
                        name,
                    )
                    continue
                with registry_errors_as_validation_errors(f"{where}.{name}"):
                    method.param(name)
        return self

    def _parameter_scopes(self) -> Iterator[tuple[str, Parameters | None]]:
        """(path in the recipe, parameters) of every level that may set parameters."""
        yield "parameters", self.parameters
        for i, model in enumerate(self.models or ()):
            yield f"models[{i}].parameters", model.parameters
        for i, slice_ in enumerate(self.slices or ()):
            yield f"slices[{i}].parameters", slice_.parameters
            for j, source in enumerate(slice_.sources):
                yield f"slices[{i}].sources[{j}].parameters", source.parameters

    # --- views used by the planner -------------------------------------------------------
    def model_paths(self) -> list[str]:
        """Every model the recipe reads, base included, in first-mention order."""
        seen: dict[str, None] = {}
        if self.models is not None:
            seen.update((m.model, None) for m in self.models)
        for slice_ in self.slices or ():
            seen.update((s.model, None) for s in slice_.sources)
            if slice_.base_model:
                seen[slice_.base_model] = None
        if self.base_model:
            seen[self.base_model] = None
        return list(seen)

    def vocabulary_source(self) -> str | None:
        """`union`, `base` or a model: where the output vocabulary comes from when the inputs'
        vocabularies are aligned token by token; None when they must share one vocabulary."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def tokenizer_models(self) -> list[str]:
        """Model references the tokenizer settings name (a source model, token donors)."""
        refs = []
        source = self.vocabulary_source()
        if source not in (None, "union", "base"):
            refs.append(source)
        for entry in ((self.tokenizer and self.tokenizer.tokens) or {}).values():
            donor = entry.source
            ref = donor.model if isinstance(donor, ModelTokenSource) else donor
            if isinstance(ref, str) and ref not in refs:
                refs.append(ref)
        return refs

    def to_yaml(self) -> str:
        """YAML that both `evomerge merge` and `mergekit-yaml` 0.1.5 accept."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """The concrete value of a setting for one tensor at gradient position `t` in [0, 1].

    Returns None when a conditional list has no matching filter, so that the next, lower
    precedence level of settings is consulted (as mergekit does).
    """
    if isinstance(setting, ConditionalSetting):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(item, ConditionalSetting) for item in setting):
        return _gradient(setting, t)
    for cond in setting:
        if cond.filter in (None, "*") or cond.filter in tensor_name:
            return resolve_setting(cond.value, tensor_name, t)
    return None


def _gradient(values: list[Scalar], t: float) -> Scalar:
    """Linear interpolation over a list of numbers; non-numbers are picked, not blended."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    lo = int(scaled)
    hi = min(len(values) - 1, lo + 1)
    frac = scaled - lo
    return (1 - frac) * values[lo] + frac * values[hi]


# --- reading -----------------------------------------------------------------------------
def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; every mistake becomes one `UserError` sentence."""
    path = Path(path)
    check_file_size(path, "recipe")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"recipe file {str(path)!r} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe file {str(path)!r}: {exc}") from None
    return parse_recipe(text, source=str(path))


MAX_CONFIG_BYTES = 1 << 20
"""Largest recipe or config file read: real ones are a few KB, and YAML parsing and
validation of a 100 MB one would take over ten minutes and gigabytes."""


def check_file_size(path: Path, what: str) -> None:
    """Refuse a recipe or config file larger than MAX_CONFIG_BYTES, before parsing it."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        return  # missing or unreadable: the reader says which, in its own words
    if size > MAX_CONFIG_BYTES:
        raise UserError(
            f"{what} file {str(path)!r} is {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte "
            f"limit; a {what} is a few KB, so this is not one"
        )


def parse_recipe(text: str, source: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise UserError(f"{source}: {problem}{where}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of recipe keys, got {type(data).__name__}")
    return validate_model(Recipe, data, source)


def validate_model(model_cls: type[BaseModel], data: Any, source: str):
    """Validate `data` into `model_cls`, turning the first error into one clear sentence."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe_validation_error(exc, model_cls, data)}") from None


def describe_validation_error(exc: ValidationError, model_cls: type[BaseModel], data: Any) -> str:
    """One sentence for the first validation problem: where, what, and the closest valid key."""
    error = _most_relevant(exc.errors())
    loc = error["loc"]
    where = _format_loc(loc)
    if error["type"] == "extra_forbidden":
        valid = _valid_keys_at(model_cls, data, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(valid)}"
        return f"unknown key {where!r}{suggestion}"
    if error["type"] == "missing":
        return f"missing required key {where!r}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _most_relevant(errors: list[dict]) -> dict:
    # Union types report one error per branch; an unknown or missing key is the real cause.
    for kind in ("extra_forbidden", "missing"):
        for error in errors:
            if error["type"] == kind:
                return error
    return errors[0]


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _is_union_branch(part):
            text += f".{part}" if text else str(part)
    return text


def _is_union_branch(part: str) -> bool:
    branches = {"bool", "int", "float", "str", "ConditionalSetting", "model_token", "zero"}
    return part in branches or part.startswith(("list[", "tagged-union["))


def _valid_keys_at(model_cls: type[BaseModel], data: Any, loc: tuple) -> list[str]:
    """The field names of the pydantic model that sits at `loc` inside `model_cls`."""
    current: Any = model_cls
    dict_key_next = False
    for part in loc:
        if isinstance(part, int) or _is_union_branch(part):
            continue
        if dict_key_next:  # a key of a mapping field (a parameter name), not a field itself
            dict_key_next = False
            continue
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            return []
        dict_key_next = _is_mapping(field.annotation)
        current = _inner_model(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) else []


def _is_mapping(annotation: Any) -> bool:
    if getattr(annotation, "__origin__", None) is dict:
        return True
    return any(_is_mapping(arg) for arg in getattr(annotation, "__args__", ()))


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None

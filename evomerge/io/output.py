"""Writing a merged model: sharded safetensors, index, config, tokenizer, recipe.

Everything is written into a hidden temporary folder next to the destination and renamed into
place at the end, so an interrupted or failed write never leaves a half-written model where
the user expects one.
"""

from __future__ import annotations

import glob
import json
import math
import os
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from evomerge.errors import UserError
from evomerge.io.checkpoint import LAYER_COUNT_KEYS, inside, read_json_object
from evomerge.io.dtypes import CODES, name_of

if TYPE_CHECKING:
    import torch


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2G', '1000000' -> bytes."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if clean and clean[-1] in units:
            size = float(clean[:-1]) * units[clean[-1]]
        else:
            size = int(clean)
    except ValueError:
        raise UserError(f"cannot read size {text!r}; write it like 5GB or 500MB") from None
    if not math.isfinite(size) or size < 1:  # `infGB` and `0` parse but name no size
        raise UserError(f"size {text!r} is not a positive size; write it like 5GB or 500MB")
    return int(size)


@contextmanager
def staged_output(out_dir: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out_dir` in one rename.

    The temporary folder is `.NAME.partial-HOST.PID-XXXX` beside `out_dir`. On an error it is
    removed, with any parent folders this call created, and an `OSError` (full disk, quota,
    read-only file system) becomes one `UserError` sentence. A process killed outright
    (SIGKILL, power loss) cannot clean up: the next write to the same destination from the
    same host removes the partial folders whose process is gone.
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force=force)
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{_owner()}-", dir=out_dir.parent)
        )
        # mkdtemp makes the folder 0700; the model it becomes follows the umask, as mkdir would
        staging.chmod(0o777 & ~_umask())
        yield staging
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise UserError(
                f"writing {str(out_dir)!r} failed ({reason}); nothing was written there"
            ) from None
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('.partial-', 1)[-1]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def check_output_folder(out_dir: Path, *, force: bool) -> None:
    """Refuse, before any work, a model folder `staged_output` could not put in place: one
    that exists (without `force`), a mount point (a container volume: the final rename fails
    with EBUSY), or a place that cannot be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(
            f"output {str(out_dir)!r} exists and is not empty; pass --force to replace it"
        )
    if out_dir.is_dir() and os.path.ismount(out_dir):
        raise UserError(
            f"output {str(out_dir)!r} is a mount point, which cannot be replaced in one rename; "
            "write into a new folder inside it instead"
        )
    check_writable(out_dir, "output")


def check_writable(path: Path, what: str) -> None:
    """Refuse, before any work, an output place that cannot be written: under a file, or in a
    folder that is read-only or another user's. Writes nothing."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    folder = existing if existing.is_dir() else existing.parent
    if existing != path and not existing.is_dir():
        why = f"{existing} is a file, not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK) or not os.access(existing, os.W_OK):
        why = f"{existing} is not writable (read-only, or another user's)"
    else:
        return
    raise UserError(f"cannot write {what} {str(path)!r}: {why}; choose another place")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a kill or a full disk mid-write leaves the previous
    file (or none), never a truncated one that later readers choke on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(text)
        os.chmod(handle.name, 0o666 & ~_umask())  # made 0600; a plain write follows the umask
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def scratch_folder(out_dir: Path, kind: str) -> Path:
    """A new `.NAME.KIND-HOST.PID-XXXX` folder beside `out_dir`: named like staging folders,
    so `remove_stale_staging` removes it once its process is gone."""
    out_dir = Path(out_dir)
    folder = tempfile.mkdtemp(prefix=f".{out_dir.name}.{kind}-{_owner()}-", dir=out_dir.parent)
    os.chmod(folder, 0o777 & ~_umask())
    return Path(folder)


def follow_umask(path: Path) -> None:
    """Give a file made private by `tempfile` the mode a plain write would (0666 less the
    umask), so that what evomerge writes is shared as the user's other files are."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask (read by setting it, the only way POSIX offers, and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _owner() -> str:
    """`HOST.PID` of this process, as it appears in staging folder names."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    return f"{host}.{os.getpid()}"


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Remove the `.NAME.partial-*` folders of `out_dir` left by dead processes of this host.

    A `.NAME.old-*` folder (the previous model, moved aside by `--force`) is removed only once
    `out_dir` exists again: if a kill fell between the two renames of `staged_output`, it and
    its finished `.NAME.partial-*` twin (same suffix) are kept for the user to pick from."""
    removed = []
    host = _owner().rsplit(".", 1)[0]
    for kind in ("partial", "old", "stages"):  # stages: scratch_folder's, of multi-stage merges
        prefix = f".{out_dir.name}.{kind}-"
        for folder in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            suffix = folder.name[len(prefix) :]
            owner_host, _, pid = suffix.rpartition("-")[0].rpartition(".")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            if not out_dir.exists() and (
                kind == "old" or out_dir.with_name(f".{out_dir.name}.old-{suffix}").exists()
            ):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor as the plan predicts it, before it exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardedWriter:
    """Streams tensors into safetensors shards of at most `max_shard_bytes`, in the order of
    `layout`, as the merge produces them.

    The plan knows every output tensor's name, shape and dtype up front, so each shard's header
    is written first and the tensor bytes follow one by one from a background thread: the merge
    never holds more than a few finished tensors, and disk writes overlap the merge arithmetic.

    `destination()` lends a buffer for the next tensor, one the writer has finished with when
    it can (layers repeat their shapes): methods that write in place then reuse memory that is
    already mapped, instead of faulting in fresh pages for every output tensor.
    """

    SPARE_BUFFERS = 2  # kept per shape and dtype for reuse

    def __init__(self, folder: Path, layout: list[TensorSpec], max_shard_bytes: int):
        self.folder = Path(folder)
        self.layout = layout
        self.shards = _assign_shards(layout, max_shard_bytes)
        self.total_bytes = sum(spec.nbytes for spec in layout)
        self._next = 0
        self._queue: queue.Queue = queue.Queue(maxsize=4)  # bounds the finished tensors in memory
        self._error: BaseException | None = None
        self._offered: torch.Tensor | None = None  # destination() for the next tensor
        self._in_flight: dict[int, torch.Tensor] = {}  # data_ptr -> a lent buffer in the queue
        self._spare: dict[tuple, list] = {}  # (shape, dtype) -> buffers free for reuse
        self._spare_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._write_shards, name="evomerge-writer", daemon=True
        )
        self._thread.start()

    def destination(self) -> torch.Tensor:
        """A buffer for the next planned tensor, to merge into (see the class notes)."""
        import torch

        spec = self.layout[self._next]
        with self._spare_lock:
            spare = self._spare.get((spec.shape, spec.dtype))
            buffer = spare.pop() if spare else None
        if buffer is None:
            buffer = torch.empty(spec.shape, dtype=spec.dtype)
        self._offered = buffer
        return buffer

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.layout[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (spec.name, spec.shape, spec.dtype):
            raise RuntimeError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} "
                f"does not match the planned {spec}"
            )
        self._next += 1
        offered, self._offered = self._offered, None
        if offered is not None and offered.data_ptr() == tensor.data_ptr():
            self._in_flight[offered.data_ptr()] = offered  # free again once written
        elif offered is not None:  # the result went elsewhere: the buffer was never used
            self._recycle(offered)
        self._put(tensor.detach().to("cpu").contiguous())

    def _recycle(self, buffer: torch.Tensor) -> None:
        with self._spare_lock:
            spare = self._spare.setdefault((tuple(buffer.shape), buffer.dtype), [])
            if len(spare) < self.SPARE_BUFFERS:
                spare.append(buffer)

    def finish(self) -> list[str]:
        """Wait for the writes; name the shards `model-0000i-of-0000n.safetensors`; index."""
        if self._next != len(self.layout):
            raise RuntimeError(
                f"{len(self.layout) - self._next} planned tensors were never written"
            )
        self._put(None)
        self._thread.join()
        self._raise_if_failed()
        count = len(self.shards)
        names, weight_map = [], {}
        for i, specs in enumerate(self.shards):
            name = (
                "model.safetensors"
                if count == 1
                else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            )
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
            names.append(name)
            weight_map.update((spec.name, name) for spec in specs)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names

    def _put(self, item) -> None:
        while True:  # never block forever on a writer thread that died
            self._raise_if_failed()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_shards(self) -> None:
        try:
            for i, specs in enumerate(self.shards):
                with open(self.folder / f"shard-{i}.tmp", "wb") as handle:
                    handle.write(_header(specs))
                    for _ in specs:
                        tensor = self._queue.get()
                        write_bytes(handle, tensor)
                        lent = self._in_flight.pop(tensor.data_ptr(), None)
                        if lent is not None:  # written: a buffer of ours, free again
                            self._recycle(lent)
            self._queue.get()  # the end marker
        except BaseException as exc:  # reported to the merging thread at its next add/finish
            self._error = exc
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break


def write_bytes(handle, tensor: torch.Tensor) -> None:
    """A tensor's raw little-endian bytes (one place, so tests can inject a full disk)."""
    import torch

    handle.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def _assign_shards(layout: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in layout:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(specs: list[TensorSpec]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded to 8 bytes."""
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        dtype = CODES[name_of(spec.dtype)]
        entries[spec.name] = {
            "dtype": dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


# Config entries with one item per layer (attention kind, RoPE on/off): a merge that changes
# the depth gives each output layer the entry of the source layer it was made from.
PER_LAYER_KEYS = ("layer_types", "attention_layers", "no_rope_layers")


def write_config(
    src: Path, dst: Path, *, layer_sources: list[int | None], dtype: str | None
) -> None:
    """config.json from the source model, with the merged depth and dtype.

    `layer_sources[i]` is the source layer output layer i was made from (None: not known). Every
    layer-count key the config has is set to the merged depth, and every per-layer list is
    re-laid out by `layer_sources`."""
    file = src / "config.json"
    if not file.exists():
        return
    config = read_json_object(inside(src, file.name))
    old_depth = next((config[k] for k in LAYER_COUNT_KEYS if k in config), None)
    for key in LAYER_COUNT_KEYS:
        if key in config:
            config[key] = len(layer_sources)
    for key in PER_LAYER_KEYS:
        entries = config.get(key)
        if isinstance(entries, list) and len(entries) == old_depth and entries:
            config[key] = [
                entries[s if s is not None and s < len(entries) else i % len(entries)]
                for i, s in enumerate(layer_sources)
            ]
    if "attention_types" in config and "attention_layers" in config:  # GPT-Neo's run-length form
        config["attention_types"] = [[[kind], 1] for kind in config["attention_layers"]]
    if dtype:
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = src / "generation_config.json"
    if generation.exists():
        shutil.copy2(inside(src, generation.name), dst / generation.name)

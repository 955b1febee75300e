"""The wheel: it ships the prebuilt sidebar and the server extension's config, so that a
`pip install` needs no node and JupyterLab lists the sidebar as enabled and OK."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_sidebar_and_jupyterlab_lists_it(tmp_path):
    from hatchling.builders.wheel import WheelBuilder

    [wheel] = WheelBuilder(str(ROOT)).build(directory=str(tmp_path / "dist"),
                                            versions=["standard"])
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        data = [name for name in names if ".data/data/" in name]
        # What pip puts under sys.prefix: here, under a prefix of our own.
        prefix = tmp_path / "prefix"
        for name in data:
            target = prefix / name.split(".data/data/", 1)[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    extension = prefix / "share/jupyter/labextensions/mlx-jupyter"
    assert (extension / "package.json").is_file() and (extension / "install.json").is_file()
    assert any(path.name.startswith("remoteEntry.") for path in (extension / "static").iterdir())
    assert (prefix / "etc/jupyter/jupyter_server_config.d/mlx_jupyter.json").is_file()
    assert not [name for name in names if "node_modules" in name or name.endswith(".ts")]

    listed = subprocess.run(
        [sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
        text=True, check=True, env={**os.environ, "JUPYTER_PATH": str(prefix / "share/jupyter")})
    output = (listed.stdout + listed.stderr).splitlines()
    section = output[output.index(str(prefix / "share/jupyter/labextensions")) + 1:]
    line = next(line for line in section if "mlx-jupyter" in line)
    assert "enabled" in line and "OK" in line and "(python, mlx-jupyter)" in line

"""mlx-jupyter: a shared local-model host on MLX for every notebook of a Jupyter server.

This module only holds entry points, and imports nothing heavy: kernels load it with
``%load_ext mlx_jupyter`` and the server with its extension list.
"""

from ._version import __version__


def _jupyter_server_extension_points() -> list[dict]:
    from .app import MlxApp

    return [{"module": "mlx_jupyter.app", "app": MlxApp}]


def _jupyter_labextension_paths() -> list[dict]:
    # The JupyterLab sidebar, prebuilt into mlx_jupyter/labextension.
    return [{"src": "labextension", "dest": "mlx-jupyter"}]


def load_ipython_extension(ipython) -> None:
    from .kernel.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from .kernel.magics import unload_ipython_extension as unload

    unload(ipython)


def __getattr__(name: str):
    # `from mlx_jupyter import Client` without importing httpx (or ipywidgets) for users of
    # the server side.
    if name == "Client":
        from .kernel.client import Client

        return Client
    if name == "AsyncClient":
        from .kernel.aclient import AsyncClient

        return AsyncClient
    if name == "panel":
        from .kernel.panel import panel

        return panel
    raise AttributeError(f"module 'mlx_jupyter' has no attribute {name!r}")


__all__ = ["AsyncClient", "Client", "__version__", "panel"]

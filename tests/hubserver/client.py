"""Point the real huggingface_hub / datasets clients at a test Hub server.

huggingface_hub reads ``HF_ENDPOINT``, its cache folders and ``HF_HUB_DISABLE_XET`` when it is
imported (``huggingface_hub/constants.py``), and so does datasets (``datasets/config.py``).
A child process gets the environment of :func:`client_env`; the current process, where the
libraries may already be imported, also gets the module constants patched by
:func:`patch_client`.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

TEST_TOKEN = "hf_hubserver_test_token"


def client_env(endpoint: str, home: Path) -> dict[str, str]:
    """Environment variables that send both clients to ``endpoint`` with caches under ``home``.

    Xet is disabled because uploads go to Xet whenever ``hf_xet`` is importable
    (``_commit_api._upload_files``) and this server speaks only LFS.
    """
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_TOKEN": TEST_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        # A proxy from the surroundings must not stand between the clients and 127.0.0.1.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def patch_client(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> dict[str, str]:
    """Set :func:`client_env` in ``os.environ`` and patch the already-read constants.

    Also switches off datasets' look-up of the Hub's Parquet export, which would go to a
    ``datasets-server.`` host derived from the endpoint (``datasets/utils/_dataset_viewer.py``).
    Returns the environment, for child processes.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import HfFileSystem, hf_api
    from huggingface_hub.utils import close_session

    env = client_env(endpoint, home)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    hub_values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": env["HF_HOME"],
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": env["HF_ASSETS_CACHE"],
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": os.path.join(env["HF_HOME"], "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(env["HF_HOME"], "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in hub_values.items():
        monkeypatch.setattr(hub_constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # `huggingface_hub.utils.tqdm` the attribute is the class; the module holds the flag.
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")
    monkeypatch.setattr(hub_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)

    datasets_values = {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": env["HF_HOME"],
        "HF_DATASETS_CACHE": Path(env["HF_DATASETS_CACHE"]),
        "HF_MODULES_CACHE": Path(env["HF_MODULES_CACHE"]),
        "DOWNLOADED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"]) / "downloads",
        "EXTRACTED_DATASETS_PATH": Path(env["HF_DATASETS_CACHE"]) / "downloads" / "extracted",
        "HF_HUB_OFFLINE": False,
        "USE_PARQUET_EXPORT": False,
    }
    for name, value in datasets_values.items():
        monkeypatch.setattr(datasets.config, name, value)

    # Instances and pooled connections made for an earlier endpoint must not be reused.
    HfFileSystem.clear_instance_cache()
    close_session()
    return env

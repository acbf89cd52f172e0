"""The test Hub server's bandwidth limits: downloads and uploads take as long as the link says,
and every byte on the wire is counted."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from hubserver import HubServer
from hubserver.throttle import BURST, Pipe
from huggingface_hub import HfApi, hf_hub_download

SIZE = 4_000_000
RATE = 8_000_000.0


def test_a_download_takes_as_long_as_the_download_rate_allows(
    hub_server: HubServer, tmp_path: Path
) -> None:
    payload = os.urandom(SIZE)
    hub_server.seed_repo("neox/big", {"blob.bin": payload})
    hub_server.link.limit(download=RATE)
    start = time.perf_counter()
    path = hf_hub_download("neox/big", "blob.bin", local_dir=tmp_path / "d")
    took = time.perf_counter() - start
    assert Path(path).read_bytes() == payload
    assert took >= SIZE / RATE - BURST
    assert hub_server.link.download.bytes >= SIZE
    assert hub_server.link.upload.bytes < 10_000


def test_an_upload_takes_as_long_as_the_upload_rate_allows(
    hub_server: HubServer, tmp_path: Path
) -> None:
    api = HfApi()
    api.create_repo("neox/up", repo_type="dataset")
    (tmp_path / "blob.safetensors").write_bytes(os.urandom(SIZE))
    hub_server.link.limit(upload=RATE)
    start = time.perf_counter()
    api.upload_file(path_or_fileobj=str(tmp_path / "blob.safetensors"),
                    path_in_repo="blob.safetensors", repo_id="neox/up", repo_type="dataset")
    took = time.perf_counter() - start
    assert took >= SIZE / RATE - BURST
    assert hub_server.link.upload.bytes >= SIZE


def test_parallel_senders_share_one_pipe() -> None:
    pipe = Pipe(10_000_000)
    start = time.perf_counter()
    senders = [threading.Thread(target=lambda: [pipe.pass_bytes(100_000) for _ in range(15)])
               for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    # 6 MB at 10 MB/s: 0.6 s whoever sends, not 0.15 s per sender.
    assert time.perf_counter() - start >= 0.6 - BURST
    assert pipe.bytes == 6_000_000

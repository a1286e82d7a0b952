"""The committed Pub/Sub API messages are what grpcio-tools generates from the committed proto (make pubsub-stubs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import integrand_salesforce.pubsub as pubsub

HERE = Path(pubsub.__file__).parent


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{HERE}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         str(HERE / "pubsub_api.proto")],
        check=True,
    )  # fmt: skip
    for name in ("pubsub_api_pb2.py", "pubsub_api_pb2.pyi"):
        assert (tmp_path / name).read_text() == (HERE / name).read_text(), f"{name} is stale: run make pubsub-stubs"


def test_the_proto_keeps_its_source_and_licence_header() -> None:
    head = (HERE / "pubsub_api.proto").read_text().splitlines()[:4]
    assert any("github.com/forcedotcom/pub-sub-api" in line for line in head)
    assert any("CC0" in line for line in head)

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_reference_models(tmp_path_factory) -> Path:
    """The reference models' training entry point run tiny (2 steps, 1 thread), once per session:
    a folder with the three checkpoints (moe, dense-active, dense-total)."""
    from moe_onnx.reference.train import main

    out = tmp_path_factory.mktemp("reference")
    main(["--tiny", "--steps", "2", "--out", str(out), "--threads", "1"])
    return out

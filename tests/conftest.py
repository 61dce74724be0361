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


@pytest.fixture(scope="session")
def reference_exports(tmp_path_factory) -> dict:
    """The shipped reference MoE exported as the CLI does by default, in fp32 and with int4 weights,
    once per session (the runtimes beside onnxruntime run these: test_portable, test_web)."""
    import moe_onnx
    from moe_onnx.reference import default_models_dir

    out = tmp_path_factory.mktemp("reference-exports")
    src = default_models_dir() / "moe"
    return {"fp32": moe_onnx.export(src, out / "fp32"),
            "int4": moe_onnx.export(src, out / "int4", weights="int4")}

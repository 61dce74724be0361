"""ONNX Runtime's own weight quantizer beside ours, on the shipped reference MoE.

    python -m studies.ort_quantizer [--work /tmp/ort-quantizer]

ORT's ``MatMulNBitsQuantizer`` (int4, block 32, symmetric) quantizes a finished fp32 export in
memory; ours quantizes while the export streams (``--weights int4``). Both are scored on the
held-out windows of the reference README, through the graph, with ONNX Runtime's defaults.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from collections import Counter
from pathlib import Path


def main(argv=None) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import moe_onnx
    from moe_onnx import manifest
    from moe_onnx.evaluation import onnx_quality
    from moe_onnx.reference.demo import default_models_dir
    from moe_onnx.reference.quant_quality import held_out_windows

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ort-quantizer")
    parser.add_argument("--windows", type=int, default=None, help="score the first N held-out windows (all)")
    args = parser.parse_args(argv)
    work, models = Path(args.work), default_models_dir()
    fp32 = moe_onnx.export(models / "moe", work / "fp32", force=True, progress=False)
    ours = moe_onnx.export(models / "moe", work / "ours-int4", weights="int4", force=True, progress=False)
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32 / "model.onnx")), bits=4, block_size=32,
                                     is_symmetric=True, quant_format=QuantFormat.QOperator)
    quantizer.process()
    theirs = work / "ort-int4"
    shutil.rmtree(theirs, ignore_errors=True)
    shutil.copytree(fp32, theirs)
    manifest.data_file(theirs).unlink()
    quantizer.model.save_model_to_file(str(theirs / "model.onnx"), use_external_data_format=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"ORT MatMulNBitsQuantizer: {seconds:.1f} s on a finished fp32 export held in memory "
          f"(process peak RSS {peak:.0f} MB)")
    exports = (("fp32", fp32), ("moe-onnx --weights int4", ours), ("ORT MatMulNBitsQuantizer int4", theirs))
    for name, out in exports:
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
        size = sum(f.stat().st_size for f in out.glob("model.onnx*")) / 1e6
        ppl = onnx_quality(out, held_out_windows(models, out)[: args.windows], threads=2).perplexity
        print(f"  {name:32s} perplexity {ppl:8.3f}  files {size:5.1f} MB  "
              f"MatMulNBits {ops['MatMulNBits']:3d}  DequantizeLinear {ops['DequantizeLinear']:3d}  "
              f"Gemm {ops['Gemm']}")


if __name__ == "__main__":
    main()

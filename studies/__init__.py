"""Studies: the measurement scripts behind BENCHMARKS.md, kept apart from the product.

Each module is runnable from a checkout of the repository (``python -m studies.edge_scale ...``)
and is smoke-tested on a tiny model (``tests/test_studies.py``); none is installed with
``moe_onnx``. The product's benchmark, ``moe-onnx bench``, lives in :mod:`moe_onnx.benchmarks`;
studies may import it and the rest of ``moe_onnx``, never the other way round.
"""

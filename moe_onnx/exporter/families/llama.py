from moe_onnx.exporter.config import dense_spec
from moe_onnx.exporter.family import Family

FAMILY = Family("llama", dense_spec)

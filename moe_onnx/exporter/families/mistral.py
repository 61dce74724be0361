from moe_onnx.exporter.config import dense_spec
from moe_onnx.exporter.family import Family

FAMILY = Family("mistral", dense_spec)  # sliding_window: read by attention_fields

"""Export compiled models for deployment: ONNX graphs for onnxruntime (:mod:`mqc.export.onnx`) and
GGUF files for llama.cpp (:mod:`mqc.export.gguf`)."""

from mqc.export.gguf import GgufExport, export_gguf
from mqc.export.onnx import OnnxLM, export_onnx, onnx_generate

__all__ = ["GgufExport", "OnnxLM", "export_gguf", "export_onnx", "onnx_generate"]

"""Export compiled models for deployment: ONNX graphs for onnxruntime (:mod:`mqc.export.onnx`)."""

from mqc.export.onnx import OnnxLM, export_onnx, onnx_generate

__all__ = ["OnnxLM", "export_onnx", "onnx_generate"]

"""Deploying a shrunk model outside gpconv's PyTorch classes: ONNX export that keeps the grouped
blocks grouped (:mod:`.onnx`), and ONNX Runtime inference and generation (:mod:`.runtime`)."""

from .onnx import EXPORT_FILE, FORMATS, MODEL_FILE, check_exportable, export, export_onnx
from .runtime import OnnxCausalLM, is_onnx_export

__all__ = ["EXPORT_FILE", "FORMATS", "MODEL_FILE", "OnnxCausalLM", "check_exportable", "export", "export_onnx",
           "is_onnx_export"]

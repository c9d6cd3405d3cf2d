"""Deployment formats: the ONNX graph and safetensors writers, the JSON that describes them, and
ONNX Runtime as a forward step (parity check and `embed --runtime onnx`)."""

"""reslab.deploy: export (ONNX, TorchScript), INT8 quantization and structured pruning of trained runs, and
running what they write (``load_artifact``).

``export_model`` and ``load_artifact`` are re-exported here; the other entry points are
``reslab.deploy.quantize.quantize`` and ``reslab.deploy.prune.prune`` (kept in their modules: a function named
like its submodule would be replaced by the module on first import).
"""
from reslab.deploy.artifact import load_artifact
from reslab.deploy.export import export_model

__all__ = ["export_model", "load_artifact"]

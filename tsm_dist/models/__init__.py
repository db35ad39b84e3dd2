"""Video models on one ResNet builder: TSN, TSM (temporal shift) and the two I3D baselines, and MobileNetV2-TSM.

Streaming them frame by frame (``OnlineTSM``) is :mod:`tsm_dist.streaming`'s."""
from tsm_dist.models.registry import build_model, describe_model, list_models, model_defaults, model_spec

__all__ = ["build_model", "describe_model", "list_models", "model_defaults", "model_spec"]

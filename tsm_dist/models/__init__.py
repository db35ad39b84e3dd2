"""Video models on one ResNet builder: TSN, TSM (temporal shift) and the two I3D baselines."""
from tsm_dist.models.online import OnlineTSM
from tsm_dist.models.registry import build_model, describe_model, list_models, model_defaults, model_spec

__all__ = ["OnlineTSM", "build_model", "describe_model", "list_models", "model_defaults", "model_spec"]

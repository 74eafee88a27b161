"""Model loading, architecture adapters and the component space."""
from cca_fast.models.adapters import KINDS, ModelAdapter, Site, WeightSlice, get_adapter, supported_model_types
from cca_fast.models.components import Component, ComponentSpace, RowSelection

__all__ = ["KINDS", "ModelAdapter", "Site", "WeightSlice", "get_adapter", "supported_model_types",
           "Component", "ComponentSpace", "RowSelection"]

"""Model loading, architecture adapters and the component space."""
from .adapters import KINDS, ModelAdapter, Site, WeightSlice, get_adapter, supported_model_types
from .components import Component, ComponentSpace, RowSelection

__all__ = ["KINDS", "ModelAdapter", "Site", "WeightSlice", "get_adapter", "supported_model_types",
           "Component", "ComponentSpace", "RowSelection"]

"""cca_fast: Constructive Circuit Amplification on Hugging Face causal LMs."""
from .errors import CCAError
from .models import Component, ComponentSpace, get_adapter, supported_model_types

__version__ = "0.1.0"
__all__ = ["CCAError", "Component", "ComponentSpace", "get_adapter", "supported_model_types", "__version__"]

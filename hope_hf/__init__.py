"""hope-hf: HOPE (Nested Learning, Behrouz et al., NeurIPS 2025) as a native Hugging Face Transformers model.

Importing the package registers the model type "nested_hope" with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(<saved HOPE folder>)` works without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_hope import HopeConfig, HopeConfigError
from .modeling_hope import HopeForCausalLM, HopeModel, HopePreTrainedModel


__version__ = "0.1.0"

__all__ = ["HopeConfig", "HopeConfigError", "HopeForCausalLM", "HopeModel", "HopePreTrainedModel", "__version__"]

AutoConfig.register(HopeConfig.model_type, HopeConfig, exist_ok=True)
AutoModel.register(HopeConfig, HopeModel, exist_ok=True)
AutoModelForCausalLM.register(HopeConfig, HopeForCausalLM, exist_ok=True)

# Saved folders carry the flat model files and an `auto_map`, so they also load with `trust_remote_code=True`
# where hope-hf is not installed (docs/design.md §1, §13).
HopeConfig.register_for_auto_class()
HopeModel.register_for_auto_class("AutoModel")
HopeForCausalLM.register_for_auto_class("AutoModelForCausalLM")

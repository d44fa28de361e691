"""Models: convert Hugging Face Llama-family models to BitNet; load and save transformers `bitnet`
checkpoints.

    convert(model, ...)                    Linear -> BitLinear, SubLN, activation (in place or a copy)
    save_bitnet(model, path, packed=True)  a transformers `bitnet` checkpoint (config + safetensors)
    load_bitnet(path | state_dict, ...)    a transformers BitNet model with our BitLinear layers
"""

from wrinklefree.models.convert import ACTIVATIONS, SUBLN_MODES, SUPPORTED_MODEL_TYPES, ConvertConfig, convert

__all__ = ["ACTIVATIONS", "SUBLN_MODES", "SUPPORTED_MODEL_TYPES", "ConvertConfig", "convert"]

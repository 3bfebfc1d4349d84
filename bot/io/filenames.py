"""File names of a PEFT adapter folder, apart from io.lora so torch-free modules (Hub digests, staleness) can
name them without importing torch."""

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"

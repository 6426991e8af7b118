"""Models: a Flax NNX decoder LM (GPT-2 and Llama families) with a KV cache."""
from jaxopd.models.transformer import KVCache, ModelConfig, Output, Transformer, rope

__all__ = ["KVCache", "ModelConfig", "Output", "Transformer", "rope"]

"""Pure loss functions on plain arrays (no trainer, no models)."""
from jaxopd.losses.common import masked_sum, response_mask, sft_loss, token_logprobs

__all__ = ["masked_sum", "response_mask", "sft_loss", "token_logprobs"]

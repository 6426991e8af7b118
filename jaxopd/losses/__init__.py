"""Pure loss functions on plain arrays (no trainer, no models)."""
from jaxopd.losses.common import masked_sum, response_mask, sft_loss, token_logprobs
from jaxopd.losses.divergences import (DIVERGENCES, divergence, forward_kl, jsd, reverse_kl,
                                       token_divergence_loss, tvd)
from jaxopd.losses.preference import (dpo_loss, forward_kl_per_token, ipo_loss, redi_loss, sequence_logps,
                                      simpo_loss, tdpo_loss)

__all__ = ["DIVERGENCES", "divergence", "dpo_loss", "ipo_loss", "forward_kl", "forward_kl_per_token", "jsd",
           "masked_sum", "redi_loss", "response_mask", "reverse_kl", "sequence_logps", "sft_loss", "simpo_loss",
           "tdpo_loss",
           "token_divergence_loss", "token_logprobs", "tvd"]

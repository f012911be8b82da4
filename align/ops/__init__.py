from align.ops.logprobs import token_logprobs

__all__ = ["token_logprobs"]

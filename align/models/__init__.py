from align.models.loading import load_model, load_tokenizer
from align.models.policy import Policy, TokenLogprobModel

__all__ = ["Policy", "TokenLogprobModel", "load_model", "load_tokenizer"]

"""Length shaping: penalties on the number of completion tokens (`len(completion_ids[i])`)."""

from __future__ import annotations

from align.errors import AlignError


def length_penalty(completion_ids: list[list[int]], target: int, scale: float = 1.0, **_) -> list[float]:
    """`-scale * max(0, length - target) / target`: 0 up to `target` tokens, then linear in the excess
    (-scale at twice the target). Use a small weight to prefer concise answers."""
    if target <= 0:
        raise AlignError(f"length_penalty: target must be a positive number of tokens, got {target}")
    return [-scale * (len(ids) - target) / target if len(ids) > target else 0.0 for ids in completion_ids]


def overlong_penalty(completion_ids: list[list[int]], max_length: int, buffer: int, penalty: float = 1.0,
                     **_) -> list[float]:
    """DAPO's soft overlong punishment, with L = length:

        0                                     if L <= max_length - buffer
        -penalty * (L - (max_length - buffer)) / buffer   if max_length - buffer < L <= max_length
        -penalty                              if L > max_length

    Set max_length to the sampler's max_new_tokens and buffer to the soft zone before it.
    """
    if not 0 < buffer <= max_length:
        raise AlignError(f"overlong_penalty: need 0 < buffer <= max_length, got buffer={buffer}, "
                         f"max_length={max_length}")
    start = max_length - buffer
    return [-penalty * min(1.0, (len(ids) - start) / buffer) if len(ids) > start else 0.0 for ids in completion_ids]

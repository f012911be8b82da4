from align.data.collate import pack, pad
from align.data.chat import render_chat
from align.data.formats import detect_format, sft_encoder, shift_labels, tokenize
from align.data.sources import load_rows

__all__ = ["detect_format", "load_rows", "pack", "pad", "render_chat", "sft_encoder", "shift_labels", "tokenize"]

//! CLIP BPE tokenizer (filled in by the tokenizer work).

"""The output tokenizer: merged vocabularies, the alignment of vocabulary-indexed tensors, tokenizer files and
chat templates."""

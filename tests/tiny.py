"""The tests' model factory is the package's own (mergebot.tinymodels), so the demo and the tests share it."""

from mergebot.tinymodels import llama_config, llama_tensors, load_tensors, make_family, save_model, write_tokenizer

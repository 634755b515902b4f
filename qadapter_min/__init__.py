"""qadapter-min: Q-Adapter (Li et al., ICLR 2025) for Llama 3.1, written to be read.

One file per concern:
    model.py      Llama 3.1 (ModelArgs, Transformer, KVCache)
    weights.py    loading Hugging Face checkpoints (load_model)
    tokenizer.py  the Llama 3 tokenizer and the Llama-3.1-Instruct chat format
"""


class UserError(Exception):
    """A problem the user can fix (a bad file, flag or model).

    The message is one sentence that names the file or flag and says what to do; the scripts print
    it without a traceback and exit with a non-zero status.
    """

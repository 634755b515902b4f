"""qadapter-min: Q-Adapter (Li et al., ICLR 2025) for Llama 3.1, written to be read.

One file per concern:
    model.py      Llama 3.1 (ModelArgs, Transformer, KVCache)
    weights.py    loading Hugging Face checkpoints (load_model), and writing their config.json
    tokenizer.py  the Llama 3 tokenizer and the Llama-3.1-Instruct chat format
    lora.py       LoRA, the adapter switched off (pi1), keyed dropout, adapters in PEFT's layout
    objective.py  the Q-Adapter and DPO objectives, the paper's equations beside the code
    step.py       one micro-batch of pairs through the model: what training, evaluation and bench share
    data.py       preference files (conversational, HH-RLHF, DSP), encoding, batching
    generate.py   decoding from the base model, the adapter, or the customised policy
    memory.py     the memory plan of one training rank
    common.py     what the scripts share: device, dtype, atomic writes, JSON, errors on the command line
"""


class UserError(Exception):
    """A problem the user can fix (a bad file, flag or model).

    The message is one sentence that names the file or flag and says what to do; the scripts print
    it without a traceback and exit with a non-zero status.
    """

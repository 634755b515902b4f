"""qadapter-min: Q-Adapter (Li et al., ICLR 2025) for Llama 3.1, written to be read.

The teaching path, read in this order (then train.py, beside the package):
    model.py      Llama 3.1 (ModelArgs, Transformer, KVCache)
    lora.py       LoRA, the adapter switched off (pi1), keyed dropout
    objective.py  Q-Adapter, DPO and SFT, the paper's equations beside the code; Objective

One file per concern beside it:
    step.py       one micro-batch through the model: what training, evaluation and bench share
    lean_head.py  the LM head and the objective without full logits
    weights.py    loading Hugging Face checkpoints (load_model)
    tokenizer.py  the Llama 3 tokenizer; the Llama-3.1-Instruct and ChatML chat formats
    data.py       preference files (conversational, TRL, HH-RLHF, DSP), encoding, batching
    prompts.py    prompts files to reply to (sample.py and evaluate.py --prompts)
    generate.py   decoding from the base model, the adapter, or the customised policy
    compiled.py   --compile: the decoding step and the training forward pass through torch.compile
    policy.py     the policy an adapter defines (read back from disk), and what measures one
    adapters.py   adapters written to disk: PEFT's layout, and qadapter_config.json
    flags.py      train.py's flags, and every check of them that needs no model
    run_dir.py    the run directory's contract: checkpoints, --resume, --overwrite, metrics
    model_card.py the README.md beside every adapter and export
    tracking.py   train.py --wandb_project: every metrics row to Weights & Biases (wandb imported there alone)
    sharding.py   FSDP2 for train.py --fsdp
    memory.py     the memory model of one training rank, its plan, the out-of-memory advice
    processes.py  the processes of a run: started by --nproc_per_node, by torchrun, or one alone
    launch.py     --nproc_per_node N: the N processes of a run started by the command itself
    harness.py    lm-evaluation-harness's model API over a policy (evaluate.py alone imports it)
    reward.py     train.py --objective rm: the score head, its loss, the checkpoint it writes
    merge.py      LoRA merged into the base weights, streamed: export.py's checkpoint and a reward model's
    judge.py      greedy replies judged by a reward model: rewards, win rates (evaluate.py --prompts)
    frontier.py   the learning-forgetting frontier: metrics, and the points no other beats
    plots.py      pictures of the frontier and of training curves (matplotlib, imported there alone)
    common.py     what the scripts share: device, dtype, atomic writes, JSON, errors on the command line
"""


class UserError(Exception):
    """A problem the user can fix (a bad file, flag or model).

    The message is one sentence that names the file or flag and says what to do; the scripts print
    it without a traceback and exit with a non-zero status.
    """

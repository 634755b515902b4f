"""lm-evaluation-harness's model API over qadapter-min's own model: any policy (policy.py) on lm-eval's tasks.

lm-eval asks a model three things, each for a list of requests:
    loglikelihood(context, continuation)  log pi(continuation | context) and whether greedy decoding
                                          would produce it (multiple-choice tasks: MMLU, ...)
    loglikelihood_rolling(text)           log pi(text), in windows of the context length (perplexity)
    generate_until(context, kwargs)       a reply, cut at the first of kwargs["until"] (GSM8K, IFEval, ...)
For a Q-Adapter adapter every number is of the customised policy pi~ = softmax((Q + alpha0 log pi1) / alpha)
(the adapter's logits alone would be a different model); for a DPO adapter, of the adapter-on model.

Tokens follow lm-eval's Hugging Face backend, so scores compare with it: a text gets a BOS unless it starts
with one (a chat-templated text does), an empty context is the BOS alone, and special-token spellings in a
text (those a chat template writes) are read as the tokens. lm-eval is an optional dependency
(requirements-eval.txt); only evaluate.py imports this module, which also holds how evaluate.py runs
lm-eval (`run_lm_eval`) and finds the data files of a task of your own (`tasks_with_their_data`).
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from lm_eval import simple_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.tasks._yaml_loader import load_yaml  # how lm-eval reads a task YAML
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window

from qadapter_min import UserError
from qadapter_min.common import Progress
from qadapter_min.generate import generate_batch
from qadapter_min.policy import Policy, log_probs
from qadapter_min.tokenizer import BEGIN_OF_TEXT, Tokenizer

MAX_GEN_TOKS = 256  # lm-eval's default reply length when a task sets none


@register_model("qadapter-min")
class PolicyLM(TemplateLM):
    """One policy of a loaded model, as an lm-eval model. Requests are split over torch.distributed's ranks
    by lm-eval itself; each rank scores its share with its own copy of the model."""

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        policy: Policy,
        name: str,
        batch_size: int = 8,
        max_length: int | None = None,
        compiled: bool = False,
    ):
        super().__init__()
        self.model, self.qtokenizer, self.policy, self.name = model, tokenizer, policy, name
        self.batch_size, self.compiled = batch_size, compiled
        self.max_length = max_length or model.args.max_position_embeddings
        self._device = next(model.parameters()).device
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ---- tokens, as lm-eval's Hugging Face backend makes them

    @property
    def eot_token_id(self) -> int:
        return self.qtokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:  # what precedes an empty context: the declared BOS, else the end of a turn
        declared = self.qtokenizer.declared_bos_id
        return self.qtokenizer.eot_id if declared is None else declared

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        ids = self.qtokenizer.encode_rendered(string)
        bos = self.qtokenizer.bos_id  # None for ChatML, whose tokenizers add nothing
        if bos is not None and (
            add_special_tokens or (add_special_tokens is None and not string.startswith(BEGIN_OF_TEXT))
        ):
            ids = [bos] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.qtokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str:
        # the format Tokenizer.chat_text writes; lm-eval records it with the results
        return self.qtokenizer.chat_format

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.qtokenizer.chat_text(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- the three requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids); a sequence longer than the
        context length loses tokens from the left, as lm-eval's Hugging Face backend does."""
        sequences = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in requests]
        progress = None if disable_tqdm else Progress(f"{self.name} log-likelihoods", len(requests), "requests")
        results = log_probs(
            self.model, self.policy, sequences, [len(c) for _, _, c in requests], self.batch_size, progress=progress
        )
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, request in enumerate(requests):
            ids = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Replies through generate_batch, batch_size prompts at a time (longest first, requests with equal
        generation settings together), each stopped at the model's stop tokens, max_gen_toks, or as soon as
        its text holds one of the `until` strings, and cut there."""
        replies = [None] * len(requests)
        progress = None if disable_tqdm else Progress(f"{self.name} replies", len(requests), "requests")
        groups = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        for key, indices in groups.items():
            # lm-eval's reading of them
            settings = normalize_gen_kwargs(json.loads(key), MAX_GEN_TOKS)
            until, max_new_tokens = [u for u in settings["until"] if u], settings["max_gen_toks"]
            temperature = float(settings["temperature"]) if settings["do_sample"] else 0.0
            top_p, top_k = float(settings.get("top_p") or 1.0), int(settings.get("top_k") or 0)
            prompts = {
                i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new_tokens)
                for i in indices
            }
            indices.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                generators = (
                    [torch.Generator(self._device).manual_seed(1234 + i) for i in batch] if temperature else None
                )
                ids = generate_batch(
                    self.model,
                    [prompts[i] for i in batch],
                    stop_ids=self.qtokenizer.stop_ids,
                    max_new_tokens=max_new_tokens,
                    policy_mode=self.policy.mode,
                    alpha=self.policy.alpha,
                    alpha0=self.policy.alpha0,
                    temperature=temperature,
                    top_p=top_p,
                    top_k=top_k,
                    generators=generators,
                    compiled=self.compiled,
                    finished=(lambda _, reply: any(stop in self.tok_decode(reply) for stop in until))
                    if until
                    else None,
                )
                for i, reply in zip(batch, ids):
                    replies[i] = cut_at_first(self.tok_decode(reply), until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, replies[i])
                if progress is not None:
                    progress.advance(len(batch))
        return replies

    # ---- over torch.distributed, for lm-eval's split of the requests

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def cut_at_first(text: str, stops: list[str]) -> str:
    """text up to the earliest occurrence of any of the stop strings."""
    ends = [text.index(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


def run_lm_eval(model, tokenizer, policy: Policy, manager, model_name: str, args) -> dict:
    """{"lm_eval": {task: {metric: value}}} (lm-eval's metric names, e.g. "acc,none"), and with --log_samples
    {"samples": {task: [lm-eval's record of each document]}}; on ranks other than 0, nothing."""
    lm = PolicyLM(
        model, tokenizer, policy, name=f"{model_name}+{policy.name}", batch_size=args.batch_size, compiled=args.compile
    )
    try:
        out = simple_evaluate(
            model=lm,
            tasks=tasks_with_their_data(args.tasks, args.include_path, manager),
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            task_manager=manager,
            apply_chat_template=args.apply_chat_template,
            fewshot_as_multiturn=args.fewshot_as_multiturn,
            log_samples=args.log_samples,
        )
    except ConnectionError as error:  # what the datasets library raises when the Hub is out of reach
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"--tasks {' '.join(args.tasks)}: lm-eval could not fetch a task's dataset ({reason}); "
            f"connect to the Hugging Face Hub, or run with the dataset in the cache and "
            f"HF_DATASETS_OFFLINE=1, or pass a task of your own with --include_path"
        ) from None
    # a task's data_files, neither beside its YAML nor in the working directory
    except FileNotFoundError as error:
        raise UserError(
            f"--tasks {' '.join(args.tasks)}: {str(error).splitlines()[0]}; a task YAML of --include_path "
            f"names its data files from its own directory (or from the working directory)"
        ) from None
    if out is None:
        return {}
    metrics = {
        task: {name: value for name, value in values.items() if "," in name}  # "metric,filter"; not "alias"
        for task, values in out["results"].items()
    }
    result = {"lm_eval": metrics}
    if args.log_samples:
        result["samples"] = json.loads(json.dumps(out["samples"], default=handle_non_serializable))
    return result


def tasks_with_their_data(tasks: list[str], include_path, manager) -> list:
    """--tasks as lm-eval is to load them. A task YAML of --include_path that names its data files by
    relative paths finds them beside itself, as lm-eval finds the files of its `include:` and
    `!function` (so it runs from any directory), or failing that from the working directory, as lm-eval
    itself looks: such a task goes to lm-eval as its whole config, with those paths made absolute."""

    def beside(files, here: Path):
        if isinstance(files, str):
            return str(here / files) if (here / files).exists() else files
        if isinstance(files, list):
            return [beside(f, here) for f in files]
        return {split: beside(f, here) for split, f in files.items()}

    loaded = []
    for name in tasks:
        entry = manager.task_index.get(name) if include_path is not None else None
        yaml_path = getattr(entry, "yaml_path", None) and Path(entry.yaml_path).resolve()
        if yaml_path is None or not yaml_path.is_relative_to(Path(include_path).resolve()):
            loaded.append(name)  # lm-eval's own task, or a group: by name
            continue
        config = load_yaml(yaml_path)
        files = config.get("dataset_kwargs", {}).get("data_files")
        if files is None or beside(files, yaml_path.parent) == files:
            loaded.append(name)
            continue
        config["dataset_kwargs"]["data_files"] = beside(files, yaml_path.parent)
        loaded.append(config)
    return loaded

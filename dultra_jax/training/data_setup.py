"""The trainer's data side: records -> task -> grain iterator, and completions -> rewards.

Config keys (`data`): `task` and `task_options`; records from `examples` (inline), `generator`
(`{"name", "split", "n"}`, a built-in generator) or `path` (+ `split`, `data_dir`, `limit`); `tokenizer` (a directory; default `model.path`; none for
token-id examples); `mode`; `prompts_per_step`; `shuffle_seed`.
Config keys (`rewards`): `weights` (default: the task's), `options` (per reward), and
`teacher_path` / `teacher_weight` / `teacher_dtype` for the distillation reward.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import jax
import numpy as np

from dultra_jax.config import ConfigError, DecodeConfig, ModelConfig
from dultra_jax.data import arithmetic, fill
from dultra_jax.data.pipeline import make_train_iterator
from dultra_jax.data.tasks import THINKING, get_task, load_task_records
from dultra_jax.data.tokenizer import decode_completion, load_tokenizer, stop_token_ids
from dultra_jax.decoding.rollout import Trajectory

log = logging.getLogger(__name__)

DATA_KEYS = {"task", "task_options", "examples", "generator", "path", "split", "data_dir", "limit", "tokenizer",
             "mode", "prompts_per_step", "shuffle_seed"}
REWARD_KEYS = {"weights", "options", "teacher_path", "teacher_weight", "teacher_dtype"}
# The reward part whose positive value means "correct", per task kind.
CORRECTNESS = {"math": "math_correct", "code": "code_correct", "exact": "exact_match",
               "arithmetic": "arithmetic_correct", "fill": "fill_correct"}
# Built-in record generators: `data.generator = {"name", "split", "n"}`.
GENERATORS = {"arithmetic": arithmetic.records, "fill": fill.records}


def generate_records(spec: Mapping[str, Any]) -> list[dict]:
    """Records from a built-in generator: `{"name": "arithmetic", "split": "train", "n": 20000}`."""
    spec = dict(spec)
    _check_keys(spec, {"name", "split", "n"}, "data.generator.")
    if spec.get("name") not in GENERATORS:
        raise ConfigError(f"data.generator.name={spec.get('name')!r} is unknown; known: {', '.join(GENERATORS)}")
    return GENERATORS[spec["name"]](spec.get("split", "train"), int(spec["n"]))


def _check_keys(section: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(section) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(known))}")


class TrainData:
    """Batches of prompts for the trainer and the rewards of their completions."""

    def __init__(self, data: Mapping[str, Any], rewards: Mapping[str, Any], model: ModelConfig,
                 decode: DecodeConfig, prompts_per_step: int, seed: int, model_path: str | None = None):
        from dultra_jax import rewards as reward_lib  # math-verify and the sandbox load only here

        _check_keys(data, DATA_KEYS, "data.")
        _check_keys(rewards, REWARD_KEYS, "rewards.")
        self.reward_lib = reward_lib
        task_options = dict(data.get("task_options") or {})
        if data.get("mode"):
            task_options["mode"] = data["mode"]
        try:
            self.task = get_task(data["task"], **task_options)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"data.task={data.get('task')!r}: {e}") from None
        self.weights = dict(rewards.get("weights") or self.task.reward_weights)
        if self.weights.get("think_format") and self.task.mode != THINKING:
            # The think-tag reward belongs to the thinking prompts, which ask for them
            raise ConfigError(f"rewards.weights.think_format={self.weights['think_format']} applies to "
                              f"data.mode='{THINKING}' only, but data.task={data['task']!r} prompts in "
                              f"{self.task.mode!r} mode; set rewards.weights.think_format=0")
        if data.get("examples"):
            records = [dict(r) for r in data["examples"]]
        elif data.get("generator"):
            records = generate_records(data["generator"])
        elif data.get("path"):
            records = load_task_records(self.task, data["path"], data.get("split"), data_dir=data.get("data_dir"),
                                        limit=data.get("limit"))
        else:
            raise ConfigError("data needs `path` (--config.data.path=FILE: a JSONL, JSON or Parquet file, a directory "
                              "of split files or tfds:NAME:SPLIT), `generator` or `examples`")
        tokenizer_dir = data.get("tokenizer") or model_path
        self.tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
        if self.tokenizer is None and not all("prompt_ids" in r for r in records):
            raise ConfigError("data: records without `prompt_ids` need a tokenizer (data.tokenizer or model.path)")
        self.stop_ids = stop_token_ids(self.tokenizer, extra=(model.eos_token_id,) + (
            (model.eot_token_id,) if model.eot_token_id is not None else ()))
        self.iterator = make_train_iterator(
            records, self.task, self.tokenizer, prompt_length=decode.prompt_length, batch_size=prompts_per_step,
            seed=int(data.get("shuffle_seed", seed)), process_index=jax.process_index(),
            process_count=jax.process_count(), pad_id=model.pad_token_id)

        self.options = {k: dict(v) for k, v in (rewards.get("options") or {}).items()}
        if rewards.get("teacher_path"):
            from dultra_jax.rewards.distill import Teacher
            teacher = Teacher.from_dir(rewards["teacher_path"], dtype=rewards.get("teacher_dtype", "bfloat16"))
            self.weights["distill"] = float(rewards.get("teacher_weight", 1.0))
            self.options.setdefault("distill", {})["teacher"] = teacher
        unknown = sorted(set(self.weights) - set(reward_lib.REWARDS))
        if unknown:
            raise ConfigError(f"rewards.weights: unknown reward(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(reward_lib.REWARDS))}")
        self.accuracy_part = CORRECTNESS.get(self.task.kind)

    def next_batch(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict | None) -> None:
        if state is not None:
            self.iterator.set_state(state)

    def completions(self, trajectory: Trajectory) -> list[str]:
        """Generated text of every row, cut at the first EOS / end-of-turn token."""
        return [decode_completion(self.tokenizer, row, self.stop_ids) for row in np.asarray(trajectory.tokens)]

    def rewards(self, batch: Mapping[str, np.ndarray], trajectory: Trajectory):
        """`(total [B], {part: [B]})` for the rows of `batch` (already repeated G times)."""
        fields = [k for k in batch if batch[k].dtype == object and k not in ("prompt_text", "prompt_messages")]
        examples = [{k: batch[k][i] for k in fields} for i in range(len(batch["index"]))]
        prompts = None
        if "prompt_messages" in batch:
            prompts = [_user_text(m) for m in batch["prompt_messages"]]
        inputs = self.reward_lib.RewardInputs(completions=self.completions(trajectory), examples=examples,
                                              num_steps=np.asarray(trajectory.num_steps), prompts=prompts)
        return self.reward_lib.compute_rewards(inputs, self.weights, self.options)


def _user_text(messages_json: str) -> str:
    """The prompt for a distillation teacher: the chat messages' text, or the plain prompt."""
    messages = json.loads(messages_json)
    if isinstance(messages, str):
        return messages
    return "\n\n".join(m["content"] for m in messages)

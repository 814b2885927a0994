"""GRPO's data side: records -> task -> grain iterator, and completions -> rewards, from the
`data` and `rewards` sections (`config.DataConfig`, `config.RewardsConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from dultra_jax import rewards as reward_lib
from dultra_jax.config import ConfigError, DataConfig, DecodeConfig, ModelConfig, RewardsConfig, from_config
from dultra_jax.data import arithmetic, fill
from dultra_jax.data.pipeline import CheckpointedBatches, make_train_iterator
from dultra_jax.data.tasks import THINKING, get_task, load_task_records
from dultra_jax.data.tokenizer import decode_completion, load_tokenizer, stop_token_ids
from dultra_jax.decoding.rollout import Trajectory
from dultra_jax.errors import DataError
from dultra_jax.rewards.distill import Teacher

log = logging.getLogger(__name__)

# Built-in record generators: `data.generator = {"name", "split", "n"}`.
GENERATORS = {"arithmetic": arithmetic.records, "fill": fill.records}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    """A built-in generator's records: `{"name": "fill", "split": "train", "n": 20000}`."""

    name: str
    n: int
    split: str = "train"

    def __post_init__(self):
        if self.name not in GENERATORS:
            raise ConfigError(f"data.generator.name={self.name!r} is unknown; known: {', '.join(GENERATORS)}")


def generate_records(spec: Mapping[str, Any], prefix: str = "data.generator.") -> list[dict]:
    """Records from a built-in generator section (`GeneratorConfig`)."""
    generator = from_config(GeneratorConfig, spec, prefix)
    return GENERATORS[generator.name](generator.split, int(generator.n))


class TrainData(CheckpointedBatches):
    """Batches of prompts for the trainer and the rewards of their completions.

    Construction reads the records and the tokenizer and checks the rewards (the teacher's
    config.json and tokenizer too) without reading a weight; `load_teacher` then reads the
    distillation teacher's weights, once the policy's are in place.
    """

    def __init__(self, data: DataConfig, rewards: RewardsConfig, model: ModelConfig, decode: DecodeConfig,
                 seed: int, model_path: str | None = None):
        task_options = dict(data.task_options or {})
        if data.mode:
            task_options["mode"] = data.mode
        try:
            self.task = get_task(data.task, **task_options)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"data.task={data.task!r}: {e}") from None
        self.weights = dict(rewards.weights or self.task.reward_weights)
        if self.weights.get("think_format") and self.task.mode != THINKING:
            # The think-tag reward belongs to the thinking prompts, which ask for them
            raise ConfigError(f"rewards.weights.think_format={self.weights['think_format']} applies to "
                              f"data.mode='{THINKING}' only, but data.task={data.task!r} prompts in "
                              f"{self.task.mode!r} mode; set rewards.weights.think_format=0")
        if data.examples:
            records = [dict(r) for r in data.examples]
        elif data.generator:
            records = generate_records(data.generator)
        elif data.path:
            try:
                records = load_task_records(self.task, data.path, data.split, data_dir=data.data_dir,
                                            limit=data.limit)
            except DataError as e:  # the message names the file (line, field); say which setting it is
                raise DataError(f"data.path: {e}") from None
        else:
            raise ConfigError("data needs `path` (--config.data.path=FILE: a JSONL, JSON or Parquet file, a directory "
                              "of split files or tfds:NAME:SPLIT), `generator` or `examples`")
        tokenizer_dir = data.tokenizer or model_path
        self.tokenizer = (load_tokenizer(tokenizer_dir, key="data.tokenizer" if data.tokenizer else "model.path")
                          if tokenizer_dir else None)
        if self.tokenizer is None and not all("prompt_ids" in r for r in records):
            raise ConfigError("data: records without `prompt_ids` need a tokenizer (data.tokenizer or model.path)")
        self.stop_ids = stop_token_ids(self.tokenizer, extra=(model.eos_token_id,) + (
            (model.eot_token_id,) if model.eot_token_id is not None else ()))
        self.iterator = make_train_iterator(
            records, self.task, self.tokenizer, prompt_length=decode.prompt_length, batch_size=data.prompts_per_step,
            seed=seed if data.shuffle_seed is None else data.shuffle_seed, process_index=jax.process_index(),
            process_count=jax.process_count(), pad_id=model.pad_token_id)

        self.options = {k: dict(v) for k, v in (rewards.options or {}).items()}
        self.teacher_dir = self.teacher_dtype = None
        self.teacher_offload = rewards.teacher_offload
        if rewards.uses_teacher:  # checked now (config.json, tokenizer); its weights load in `load_teacher`
            self.teacher_dir = Teacher.check_dir(rewards.teacher_path, dtype=rewards.teacher_dtype)
            self.teacher_dtype = rewards.teacher_dtype
            self.weights["distill"] = float(rewards.teacher_weight)
        unknown = sorted(set(self.weights) - set(reward_lib.REWARDS))
        if unknown:
            raise ConfigError(f"rewards.weights: unknown reward(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(reward_lib.REWARDS))}")
        self.accuracy_part = self.task.correctness_part

    def load_teacher(self, mesh: Mesh | None = None) -> None:
        """Reads the distillation teacher's weights (when the rewards use one): after the checks of
        `__init__` and the policy's weights, so a mistake in the data never waits for either.

        `mesh` (the run's) shards the teacher's parameters as the policy's and its rows over the
        batch axes; with `rewards.teacher_offload` the parameters stay in host memory between
        scorings (`Teacher.offload`)."""
        if self.teacher_dir is not None and "teacher" not in self.options.get("distill", {}):
            teacher = Teacher.from_dir(self.teacher_dir, dtype=self.teacher_dtype, mesh=mesh,
                                       offload=self.teacher_offload)
            log.info("distillation teacher %s loaded%s", self.teacher_dir,
                     " into host memory (rewards.teacher_offload: on the chips only while scoring)"
                     if self.teacher_offload else "")
            self.options.setdefault("distill", {})["teacher"] = teacher

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
        inputs = reward_lib.RewardInputs(completions=self.completions(trajectory), examples=examples,
                                              num_steps=np.asarray(trajectory.num_steps), prompts=prompts)
        return reward_lib.compute_rewards(inputs, self.weights, self.options)


def _user_text(messages_json: str) -> str:
    """The prompt for a distillation teacher: the chat messages' text, or the plain prompt."""
    messages = json.loads(messages_json)
    if isinstance(messages, str):
        return messages
    return "\n\n".join(m["content"] for m in messages)

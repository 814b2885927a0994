"""Fast-dLLM on LLaDA-8B-Instruct with the Fast-dLLM factor rule, as the paper's baseline row: block 128, gen 256,
greedy, no KV cache, the factor sweep {0.5, 0.8, 1.0, 1.2, 1.5}; 0-shot math, 3-shot MBPP.

    python launch/evaluate.py --config=configs/eval/fastdllm_llada.py:gsm8k \
        --config.model.path=GSAI-ML/LLaDA-8B-Instruct --config.evaluate.data=/path/to/gsm8k/test.jsonl

As the reference's `eval_math/run_fastdllm_eval.sh` and `eval_coding/eval_coding.sh` run it.
HumanEval is 0-shot here: the reference's 3-shot HumanEval draws its shots at random from the
test problems (lm-eval has no few-shot split for it), which this evaluation does not reproduce.
The factor rule is greedy, so one seed decodes each setting. See `configs/eval/base.py`.
"""

from configs.eval import base


def get_config(arg=None):
    task = base.check_task("fastdllm_llada", arg, base.MATH_TASKS + base.CODE_TASKS)
    return base.eval_config("fastdllm_llada", task, rules=("factor",), factors=base.PAPER_FACTORS, block_length=128,
                            shots=3 if task == "mbpp" else 0)

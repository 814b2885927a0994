"""The embedded demo: dUltra's GRPO on a task a CPU can learn, from the tiny model in assets/demo.

    python launch/train.py --config=configs/demo.py --workdir=runs/demo

`assets/demo` holds a tiny LLaDA pretrained on the arithmetic task (`dultra_jax.data.arithmetic`:
worked solutions such as `7+5=12;12-8=4;4+9=13;####13`, whose copied numbers and punctuation are
easy to decode in parallel and whose result digits are not) with a planner head initialised to
imitate the factor rule (assets/demo/README.md says how both were made). GRPO then trains the
planner with the full reward: correctness plus a step penalty. At the
end, 500 held-out problems are decoded with each baseline rule and with the planner before and
after RL: `results.json`, `pareto.png` and a table in the log.

The step-penalty weight is 1.0 here, not the reference's 0.1: with 32-token generations the
NFE range is 4..32, and at 0.1 the speed signal (at most 0.06) would drown in sampling noise
within a 15-minute CPU run.

Only the planner trains (`optim.train="planner"`); the reference trains the backbone too, at a
learning rate (~1e-6) far below what 200 CPU steps need. With `optim.train="all"` at 1e-4, the
same run cut NFE to 4.36 but held-out accuracy fell from 78.2% to 21.7%: this 0.86M-parameter
backbone's arithmetic does not survive Adam steps of that size.
"""

import ml_collections

from configs import common
from dultra_jax.data import arithmetic as A


def get_config(arg=None):
    del arg
    model = common.tiny_model()
    model.update(dict(path="assets/demo", dtype="float32", param_dtype="float32", remat=False))
    return ml_collections.ConfigDict(dict(
        model=model,
        decode=common.decode(prompt_length=A.PROMPT_LENGTH, gen_length=A.GEN_LENGTH, block_length=A.BLOCK_LENGTH,
                             temperature=0.1, eos_token_id=A.EOS_ID),
        rl=common.rl(group_size=8),
        optim=common.optim(learning_rate=1e-4, train="planner"),
        data=dict(task="arithmetic", generator=dict(name="arithmetic", split="train", n=20000), prompts_per_step=4,
                  shuffle_seed=0),
        rewards=dict(weights={"arithmetic_correct": 1.0, "step_penalty": 1.0}),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=50, keep=2),
        total_steps=200,
        seed=0,
        final_eval=dict(
            generator=dict(name="arithmetic", split="heldout", n=500), seeds=(0, 1, 2), batch_size=100,
            rows=dict(
                low_confidence=dict(params="initial", rule="low_confidence"),
                threshold=dict(params="initial", rule="threshold", threshold=0.9),
                factor=dict(params="initial", rule="factor", factor=1.0),
                planner_init=dict(params="initial", rule="planner_bernoulli", factor=1.0),
                planner_rl=dict(params="trained", rule="planner_bernoulli", factor=1.0),
            )),
    ))

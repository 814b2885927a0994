"""The embedded demo: dUltra's GRPO on a task a CPU can learn, from the tiny model in assets/demo.

    python launch/train.py --config=configs/demo.py --workdir=runs/demo

`assets/demo` holds a tiny LLaDA pretrained on the template-filling task (`dultra_jax.data.fill`:
copy the given letters, put any of a-d at `?`, two different letters of e-h at each `##` pair)
with a planner head initialised to imitate the factor rule (assets/demo/README.md says how both
were made). The free letters and the pair letters are equally uncertain to the model, but only
the pairs depend on each other: confidence rules must decode both one at a time, a learned
planner need not. GRPO trains the planner with the full reward, correctness plus a step penalty.
At the end, 500 held-out problems x 3 seeds are decoded with the baseline rules and their factor
and threshold sweeps, the planner before and after RL (and its factor sweep), and the baseline
sweeps on the backbone after RL: `results.json`, `pareto.png` and a table in the log.

Where this config departs from the reference's GRPO settings, and why (measured on the task's
earlier version with one linked `*` after a `?`; README "The embedded demo"):
- `decode.temperature=0.0`: rollouts decode tokens greedily, as the evaluation does. The two
  letters of a pair decoded in one step collide under greedy decoding (both take the model's
  favourite letter) but only about one time in four when sampled at 0.1, so sampled rollouts
  hide from the planner the failure the evaluation shows (sampled at 0.1: about 45% of the
  training rollouts correct after 50 steps, 5.5% of the held-out problems at 7.3 NFE).
- `rl.advantage_min_clip=-10.0`, i.e. no clipping: the reference zeroes negative advantages, so
  a failed rollout teaches nothing; the planner then learnt only from rollouts that happened to be
  correct and fast, and drifted to revealing everything (0-10% of the training rollouts correct
  from step 9 on, greedy tokens, rate 1e-4).
- `optim.train="planner"`: the backbone stays frozen. Training it too (`optim.train="all"`) with
  kept negative advantages pushes down every token of a failed rollout, the copied letters
  included: at a backbone rate of 1e-4 (planner 1e-5) no training rollout was correct after 11
  steps, and each step cost about three times a planner-only one on 2 CPU cores.
- The step penalty weighs 2.0, not the reference's 0.1: with 32-token generations the NFE range
  is 2..32, and at 1.0 the planner was still at the factor rule's 29 NFE after 20 steps.
"""

import os

import ml_collections

from configs import common
from dultra_jax.data import fill as F

FACTORS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5)


def get_config(arg=None):
    del arg
    model = common.tiny_model()
    # The asset beside this file's directory, so the config works from any working directory.
    asset = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "demo"))
    model.update(dict(path=asset, dtype="float32", param_dtype="float32", remat=False))
    initial = lambda rule, **knob: dict(params="initial", rule=rule, **knob)  # noqa: E731
    trained = lambda rule, **knob: dict(params="trained", rule=rule, **knob)  # noqa: E731
    return ml_collections.ConfigDict(dict(
        model=model,
        decode=common.decode(prompt_length=F.PROMPT_LENGTH, gen_length=F.GEN_LENGTH, block_length=F.BLOCK_LENGTH,
                             temperature=0.0, eos_token_id=F.EOS_ID),
        rl=common.rl(group_size=8, advantage_min_clip=-10.0),
        optim=common.optim(learning_rate=1e-4, train="planner"),
        data=dict(task="fill", generator=dict(name="fill", split="train", n=20000), prompts_per_step=4,
                  shuffle_seed=0),
        rewards=dict(weights={"fill_correct": 1.0, "step_penalty": 2.0}),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=50, keep=2),
        total_steps=200,
        seed=0,
        final_eval=dict(
            generator=dict(name="fill", split="heldout", n=500), seeds=(0, 1, 2), batch_size=100,
            rows=dict(
                low_confidence=initial("low_confidence"),
                threshold=initial("threshold", threshold=0.9),
                factor=initial("factor", factor=1.0),
                planner_init=initial("planner_bernoulli", factor=1.0),
                planner_rl=trained("planner_bernoulli", factor=1.0),
            ),
            sweeps=dict(
                factor=dict(initial("factor"), values=FACTORS),
                threshold=dict(initial("threshold"), values=THRESHOLDS),
                steps_per_block=dict(initial("low_confidence"), values=(F.GEN_LENGTH // F.BLOCK_LENGTH,)),
                planner_rl=dict(trained("planner_bernoulli"), values=(0.5, 1.0, 1.5, 2.0)),
                factor_rl_backbone=dict(trained("factor"), values=FACTORS),
                threshold_rl_backbone=dict(trained("threshold"), values=THRESHOLDS),
            )),
    ))

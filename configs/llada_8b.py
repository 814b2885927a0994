"""LLaDA-8B-Instruct with the dUltra planner head: `--config=configs/llada_8b.py`.

Set `--config.model.path=/path/to/LLaDA-8B-Instruct` to load weights; without it the model is
randomly initialised with these shapes (benchmarks).
"""

import ml_collections

from configs import common


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(model=common.llada_8b_model(), seed=0))

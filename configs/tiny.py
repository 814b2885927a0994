"""A tiny random LLaDA + planner for tests and CPU smoke runs: `--config=configs/tiny.py`."""

import ml_collections

from configs import common


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(model=common.tiny_model(), seed=0))

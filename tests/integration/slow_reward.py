"""Reward functions for the reward-server tests (imported by the server by "module:function")."""

import math
import time


def length(prompts, responses, metadata, delay_s=0.0):
    time.sleep(delay_s)
    return [float(len(r)) for r in responses]


def nan_on_bad(prompts, responses, metadata):
    return [math.nan if r == "bad" else 1.0 for r in responses]

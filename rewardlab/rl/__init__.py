"""Rewards for online RL and reward fine-tuning: reward functions, several rewards as one, group advantages,
calibration statistics."""

from .advantages import GroupStats, group_advantages, group_stats
from .calibrate import calibrate, calibration_record
from .rewards import MultiReward, reward_fn, split_images

__all__ = ["reward_fn", "MultiReward", "split_images", "group_advantages", "group_stats", "GroupStats",
           "calibrate", "calibration_record"]

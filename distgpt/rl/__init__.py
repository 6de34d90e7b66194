"""Reinforcement-learning fine-tuning, the parts without Ray: tasks and rewards, rollout generation on one model,
the rollout batch and its advantages. The Ray side (rollout actors, the coordinator, weight sync, the learner's
batch source) lives in ``distgpt.orchestrator``; the loss is the ``pg`` objective (``train/objectives/pg.py``)."""

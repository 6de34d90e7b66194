"""``sft``: supervised fine-tuning on conversations — next-token loss on the assistant's tokens only.

The data comes from ``data.format = "chat"`` (``data/chat.py``): rows with ``roles`` (0 padding, 1 prompt, 2
assistant) and ``segments`` (which conversation of a packed row a token belongs to). ``loss_on = "assistant"`` counts
the targets that are assistant tokens; ``"all"`` counts every real token except the first of each conversation
(it would be predicted from the previous conversation). Packed rows hand ``segments`` to the model, which then
attends only inside each conversation and restarts positions, so packing changes nothing but the speed.
"""

from __future__ import annotations

import torch

from distgpt.data.batch import Batch
from distgpt.data.chat import PAD, REPLY
from distgpt.data.loader import DatasetError
from distgpt.train.objectives.base import Objective


class SupervisedChat(Objective):
    """Masked next-token cross-entropy over conversations."""

    name = "sft"

    def __init__(self, settings=None):
        super().__init__(settings)
        self.loss_on = getattr(settings, "loss_on", "assistant")
        self.packed = False

    def check_data(self, manifest: dict) -> None:
        """Chat data is required; packed data makes every batch carry its segments."""
        if "roles" not in manifest.get("columns", []):
            raise DatasetError("objective 'sft' trains on conversations: set data.format = 'chat' (and point "
                               "data.sources at .jsonl/.parquet conversations or builtin:chatterbot/<language>)")
        self.packed = bool(manifest.get("chat", {}).get("packing"))

    def make_batch(self, columns: dict[str, torch.Tensor]) -> Batch:
        tokens, roles, segments = columns["tokens"], columns["roles"], columns["segments"]
        target_roles = roles[:, 1:]
        if self.loss_on == "assistant":
            mask = target_roles == REPLY
        else:  # every real token, but not across a conversation boundary
            mask = (target_roles != PAD) & (segments[:, 1:] == segments[:, :-1])
        extras = {"segments": segments[:, :-1].contiguous()} if self.packed else {}
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_mask=mask.contiguous(),
                     extras=extras)

    def model_inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"segments": batch.extras["segments"]} if "segments" in batch.extras else {}

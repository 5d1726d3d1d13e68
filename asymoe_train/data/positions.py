"""Where the training streams stand: the data position a checkpoint records, so a resume neither skips nor replays."""

from __future__ import annotations

import torch

# logical stream -> (shard draw, samples taken from it, samples in all); see asymoe_train.data.pipeline.StreamSpec
Positions = dict[int, tuple[int, int, int]]


class StreamPositions:
    """This rank's position in every training stream it has read (after its last batch), and the positions it
    resumed from."""

    def __init__(self, world_size: int = 1):
        self.world_size = world_size
        self.positions: Positions = {}

    def update(self, positions: Positions) -> None:
        """After a batch: the positions it leaves its streams at."""
        self.positions.update(positions)

    def state_dict(self) -> Positions:
        """Every stream's position over all ranks (a collective): a rank also holds the positions it resumed from
        for streams another rank reads, so the furthest wins."""
        if self.world_size == 1:
            return dict(self.positions)
        gathered: list = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, self.positions)
        merged: Positions = {}
        for part in gathered:
            for stream, position in part.items():
                if stream not in merged or position[2] > merged[stream][2]:
                    merged[stream] = position
        return merged

    def load_state_dict(self, positions: Positions) -> None:
        self.positions = dict(positions)

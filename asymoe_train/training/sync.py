"""The objective of classify stages: cross-entropy on the head's class logits plus semantic synchronization.

Semantic synchronization (A-MESS, arXiv 2503.19474, as we read its abstract): each in-scope label's description is
encoded by the model's own language model (the mean of its final hidden states over the description's tokens, no
image), projected into z's space by the head, and a triplet loss in cosine distance pulls each sample's z toward its
label's description and away from the other labels' by ``sync.margin``: the hardest (closest) other description, or
all of them (``sync.negatives``). The encodings are refreshed every ``sync.refresh_steps`` optimizer steps without a
gradient through the LM (the projection trains), or once at the stage's start (0).

# B samples, C classes, Z embedding, T positions, D LM hidden
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asymoe_train.config.labels import LabelSet
from asymoe_train.config.schema import SyncConfig
from asymoe_train.data.batch import Batch, modality_counts
from asymoe_train.data.tokenizer import TextTokenizer
from asymoe_train.modality import PAD, TEXT
from asymoe_train.models.fusion import masked_mean
from asymoe_train.models.vlm import VLMOutput


def cosine_distance(z_BZ: torch.Tensor, descriptions_CZ: torch.Tensor) -> torch.Tensor:
    """1 - cos(z_b, e_c) for every sample and description ``[B, C]``, in fp32."""
    return 1.0 - F.normalize(z_BZ.float(), dim=-1) @ F.normalize(descriptions_CZ.float(), dim=-1).T


def triplet_loss(z_BZ: torch.Tensor, descriptions_CZ: torch.Tensor, label_B: torch.Tensor, margin: float,
                 negatives: str = "hardest", reduction: str = "mean") -> torch.Tensor:
    """Mean over samples (``reduction="none"``: per sample) of max(0, d(z, e_y) - d(z, e_neg) + margin), d the
    cosine distance: ``hardest`` takes the closest other description as e_neg, ``all`` averages the hinge over every
    other description."""
    distance_BC = cosine_distance(z_BZ, descriptions_CZ)
    positive_B1 = distance_BC.gather(1, label_B[:, None])
    others_BC = ~F.one_hot(label_B, distance_BC.shape[1]).bool()
    if negatives == "hardest":
        hardest_B1 = distance_BC.masked_fill(~others_BC, float("inf")).min(dim=1, keepdim=True).values
        hinge_B = torch.relu(positive_B1 - hardest_B1 + margin).squeeze(1)
    else:
        hinge_B = (torch.relu(positive_B1 - distance_BC + margin) * others_BC).sum(1) / others_BC.sum(1)
    return hinge_B if reduction == "none" else hinge_B.mean()


def description_inputs(labels: LabelSet, tokenizer: TextTokenizer) -> dict:
    """Model inputs of the in-scope descriptions, one right-padded text-only row each (bos, then the text)."""
    rows = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
            for text in labels.class_descriptions]
    length = max(len(r) for r in rows)
    input_ids_BT = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    modality_BT = torch.full((len(rows), length), PAD, dtype=torch.long)
    for n, row in enumerate(rows):
        input_ids_BT[n, : len(row)] = torch.tensor(row)
        modality_BT[n, : len(row)] = TEXT
    return {"input_ids_BT": input_ids_BT, "modality_BT": modality_BT, "pixel_values_NCHW": torch.zeros(0, 3, 1, 1),
            "image_index_B": torch.full((len(rows),), -1, dtype=torch.long), "context_BT": modality_BT != PAD,
            "modality_counts": modality_counts(modality_BT)}


@torch.no_grad()
def encode_descriptions(forward, model, inputs: dict) -> torch.Tensor:
    """The descriptions' embeddings ``[C, D]``: mean of the LM's final hidden states over each description's tokens,
    in eval mode (no router noise) and without a gradient. ``forward`` runs the model (the engine or the module)."""
    was_training = model.training
    model.eval()
    try:
        out = forward(**inputs, classify=True)
    finally:
        model.train(was_training)
    return masked_mean(out.hidden_BTD, inputs["modality_BT"] != PAD)


class ClassifyObjective:
    """What :class:`asymoe_train.training.step.TrainStep` adds in a classify stage: the description refresh before a
    step's forward, the cross-entropy that replaces L_lm, and the weighted synchronization loss."""

    def __init__(self, model, labels: LabelSet, tokenizer: TextTokenizer, sync: SyncConfig, weight: float,
                 device: torch.device | str = "cpu", world_size: int = 1):
        self.model, self.sync, self.weight, self.world_size = model, sync, weight, world_size
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                       for k, v in description_inputs(labels, tokenizer).items()}
        self.refreshed_step: int | None = None
        self.num_encodings = 0  # how often the descriptions were encoded (one forward over all of them each time)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` starts with a refresh: every ``refresh_steps``, or only step 0 (frozen)."""
        every = self.sync.refresh_steps
        return step % every == 0 if every else step == 0

    def refresh(self, forward, step: int) -> None:
        """Re-encode the descriptions into the head's buffer on the first micro-batch of a due step. The buffer is
        part of the weights, so a checkpoint keeps it and a resumed run continues with the same encodings."""
        if self.refreshed_step == step or not self.due(step):
            return
        encoded_CD = encode_descriptions(forward, self.model, self.inputs)
        self.model.head.descriptions_CD.copy_(encoded_CD.to(self.model.head.descriptions_CD.dtype))
        self.refreshed_step = step
        self.num_encodings += 1

    @staticmethod
    def main_loss(out: VLMOutput, batch: Batch) -> tuple[str, torch.Tensor, torch.Tensor]:
        """("ce", summed cross-entropy over the batch's samples, each times its weight, number of samples)."""
        ce_B = F.cross_entropy(out.head.logits_BC.float(), batch.label_B, reduction="none")
        if batch.weight_B is not None:
            ce_B = ce_B * batch.weight_B
        return "ce", ce_B.sum(), torch.as_tensor(ce_B.shape[0], device=ce_B.device)

    def sync_loss(self, out: VLMOutput, batch: Batch, metrics: dict) -> torch.Tensor:
        """``losses.sync`` times the triplet loss; 0 and not computed at weight 0. Normalised as the cross-entropy is:
        this rank's summed hinges over the samples of the micro-batch on all ranks (``answer_tokens``, which
        ``total_loss`` reduced), times ``world_size`` as DeepSpeed averages gradients over ranks, so the gradient does
        not depend on how the batch is split. Logged (``loss/sync``): this rank's mean."""
        if not self.weight:
            return torch.zeros((), device=batch.label_B.device)
        hinge_B = triplet_loss(out.head.z_BZ, out.head.descriptions_CZ, batch.label_B, self.sync.margin,
                               self.sync.negatives, reduction="none")
        metrics["loss/sync"] = hinge_B.mean().detach()
        count = metrics["answer_tokens"].clamp_min(1).to(hinge_B.dtype)
        return self.weight * hinge_B.sum() * (self.world_size / count)

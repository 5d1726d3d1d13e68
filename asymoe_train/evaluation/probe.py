"""Grounding probe: how much the language model looks at the image when it answers.

Per decoder layer, the attention mass that answer-predicting positions (the positions whose next token is an answer
token, i.e. the last prompt token and the answer tokens but the last) put on image tokens, averaged over heads and
positions. Teacher-forced on labelled sequences; the attention probabilities are read from the layers' own eager
attention (switched on for the probe only), so the probe sees exactly what the model computes.

# B sequences, H heads, T positions, L decoder layers
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from asymoe_train.data.batch import Batch
from asymoe_train.data.conversation import IGNORE
from asymoe_train.modality import IMAGE


@torch.no_grad()
def grounding_probe(model, batches: Iterable[Batch], device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> dict:
    """``{"image_mass_per_layer": [L floats], "positions": answer-predicting positions probed}``."""
    layers = model.layers
    config = model.lm.config
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module, args, output):
            captured[index] = output[1]  # (attn_output, attn_weights); weights are returned by eager attention
        return hook

    hooks = [layer.self_attn.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    previous, config._attn_implementation = config._attn_implementation, "eager"
    was_training = model.training
    model.eval()
    mass_L = torch.zeros(len(layers), dtype=torch.float64)
    positions = 0
    try:
        for batch in batches:
            batch.to(device, dtype)
            model(**batch.model_inputs())
            predicts_BT = torch.zeros_like(batch.labels_BT, dtype=torch.bool)
            predicts_BT[:, :-1] = batch.labels_BT[:, 1:] != IGNORE
            image_BT = batch.modality_BT == IMAGE
            for i in range(len(layers)):
                on_image_BHT = (captured[i].float() * image_BT[:, None, None, :]).sum(-1)
                mass_L[i] += on_image_BHT.mean(1)[predicts_BT].double().sum().cpu()
            positions += int(predicts_BT.sum())
    finally:
        config._attn_implementation = previous
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return {"image_mass_per_layer": (mass_L / max(positions, 1)).tolist(), "positions": positions}

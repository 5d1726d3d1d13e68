"""Synthetic LLaVA-shaped training data for ``benchmarks/train_step.py --shape llava``, rendered on the spot.

Each sample is one image (random pixels, JPEG) and a one-turn conversation whose text (question plus answer, a
quarter and three quarters) has a token count drawn uniformly from a range, in the LLaVA-1.5 shard layout
(``<key>.jpg`` + ``<key>.json`` with ``conversations``). The words are random draws from a small vocabulary and mean
nothing: the data exists to give the trainer instruction-tuning shapes (576 image tokens and 32-1024 text tokens per
sample on a GPU, packed into rows of 4096), not to be learned.

    python benchmarks/llava_shape.py --out /tmp/llava_shape --tokenizer data/easy_vqa/tokenizer.json --samples 512
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image
from tokenizers import Tokenizer
from webdataset import TarWriter

WORDS = ("red blue green small large circle square triangle left right above below the a of in on with and is "
         "shows image picture object scene near far bright dark colour shape many few one two three").split()
PREFIX = "llava"


def text_of(tokenizer: Tokenizer, rng: random.Random, num_tokens: int) -> str:
    """Random words whose encoding has about ``num_tokens`` tokens (at least 1 word)."""
    words = [rng.choice(WORDS)]
    while len(tokenizer.encode(" ".join(words)).ids) < num_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def write_shards(out: str | os.PathLike, tokenizer_path: str, num_samples: int, image_size: int,
                 text_tokens: tuple[int, int], seed: int = 0, samples_per_shard: int = 128) -> list[str]:
    """Write ``num_samples`` samples as ``llava-*.tar`` shards into ``out``; returns the shard file names."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed)
    names = []
    writer = stream = None
    for index in range(num_samples):
        if index % samples_per_shard == 0:
            if writer is not None:
                writer.close()
                stream.close()
            names.append(f"{PREFIX}-{len(names):06d}.tar")
            stream = open(out / names[-1], "wb")
            writer = TarWriter(stream, encoder=False, mtime=0)
        total = rng.randint(*text_tokens)
        question = text_of(tokenizer, rng, max(1, total // 4))
        answer = text_of(tokenizer, rng, max(1, total - total // 4))
        image = Image.fromarray(pixels.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        record = {"id": f"{index:08d}", "image": f"{index:08d}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
        writer.write({"__key__": f"{index:08d}", "jpg": buffer.getvalue(), "json": json.dumps(record).encode()})
    if writer is not None:
        writer.close()
        stream.close()
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json the text lengths are measured with")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--text-tokens", default="32,1024", help="min,max text tokens per sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    low, high = (int(v) for v in args.text_tokens.split(","))
    shards = write_shards(args.out, args.tokenizer, args.samples, args.image_size, (low, high), args.seed)
    print(f"wrote {args.samples} samples in {len(shards)} shards to {args.out}")


if __name__ == "__main__":
    main()

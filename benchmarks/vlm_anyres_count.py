"""How many packed visual tokens LLaVA-NeXT gives an image (base image, crops, row newlines), on
the LLaVA-1.6 layout: CLIP-L/14 at 336 px, the default pinpoints up to 672 px. Random weights and
a vision tower cut to 2 layers (token counts depend on neither). The table in
docs/vlm_llava_next.md::

    python benchmarks/vlm_anyres_count.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tome.adapters.common.anyres import newline_mask  # noqa: E402

SIZES = [(672, 672), (336, 1008), (480, 640)]


def main() -> None:
    import transformers
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = transformers.LlavaNextConfig()
    config.vision_config.num_hidden_layers = 2
    config.text_config = transformers.LlamaConfig(
        vocab_size=32064, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    print("| image (h x w) | crops + base | packed tokens | newlines |")
    print("| --- | --- | --- | --- |")
    for size in SIZES:
        crops = image_size_to_num_patches(size, config.image_grid_pinpoints, 336)
        with torch.no_grad():
            packed = model.get_image_features(
                pixel_values=torch.randn(1, crops, 3, 336, 336),
                image_sizes=torch.tensor([size]),
                return_dict=True,
            ).pooler_output[0]
        newlines = int(newline_mask(packed, model.model.image_newline).sum())
        print(f"| {size[0]} x {size[1]} | {crops} | {packed.shape[0]} | {newlines} |")


if __name__ == "__main__":
    main()

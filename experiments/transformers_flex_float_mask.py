"""transformers' ``flex_attention_forward`` with a float ``(B, 1, N, N)`` mask, at the token counts
a merging model's layers would pass (why tome refuses ``attn_implementation="flex_attention"``
for merging: docs/compiled.md).

    python experiments/transformers_flex_float_mask.py

Prints the largest difference to SDPA with the same mask for each token count, or dies in the
attempt: on torch 2.14.1 / transformers 5.25, on the CPU, the process aborts in the first call
("free(): invalid next size" / "double free or corruption"), with a contiguous mask or an
expanded one alike. tome's own score_mod (``tome.core.attention``: ``bias[b, key]`` on a
``(B, N)`` tensor) runs on the same machine.
"""

import torch
import torch.nn.functional as F
from transformers.integrations.flex_attention import flex_attention_forward


def main() -> None:
    module = torch.nn.Module().eval()
    for n in (17, 14, 11, 8):
        q, k, v = (torch.randn(2, 4, n, 16) for _ in range(3))
        bias = torch.rand(2, 1, n, n)
        out, _ = flex_attention_forward(module, q, k, v, bias, scaling=16**-0.5)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)
        print(n, (out - ref).abs().max().item(), flush=True)


if __name__ == "__main__":
    main()

"""What a forward without autograd keeps alive beyond weights and cache: serving's rules.

Under ``torch.inference_mode`` (``generate`` runs under ``no_grad``) nothing is saved for a
backward pass, so activations do not pile up over layers: the peak is the largest moment
inside one decoder layer, for the ``T = batch x tokens`` tokens of the forward (the whole
prompt of every sequence in prefill, one token per sequence in a decoding step). The rules,
per token, in the model dtype unless said (read from transformers 5.17's decoder layers,
e.g. ``modeling_llama.py``; a bound, not a trace):

* the residual stream: the layer input and the residual (2 x hidden);
* attention: q, k, v, the rotated q and k, and the attention output
  (3 x heads x head_dim + 3 x kv_heads x head_dim); SDPA and FlashAttention-2 keep no
  S x S matrix; eager attention adds the scores (batch x heads x S x S) in the dtype and
  their fp32 softmax;
* the MLP: gate, up and their product (3 x intermediate; 2 x for a non-gated MLP);
* RMSNorm's fp32 upcast of its input (``hidden_states.to(torch.float32)``, then ``pow``):
  2 x hidden x 4 bytes;
* k-bit weights: bitsandbytes' ``matmul_4bit`` runs its gemv kernel on packed weights only
  when the input is a single token (``A.numel() == A.shape[-1]``); otherwise it dequantizes
  the weight to 16 bit first (``MatMul4Bit.forward``): the largest quantized weight in 16 bit;
* unmerged LoRA (peft ``lora.Linear.forward``): the input cast to the adapter's fp32
  (``_cast_input_dtype``), ``lora_A``'s output (rank), ``lora_B``'s output and its scaled
  copy (fp32), for the largest targeted linear.

Logits: ``generate`` asks for the last position only (``logits_to_keep=1``,
generation/utils.py) and copies them to fp32 (``outputs.logits[:, -1].to(copy=True,
dtype=torch.float32)``); a plain forward computes every position. Gemma-2's final logit
soft-capping (divide, ``tanh``, multiply) holds a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES, alloc_bytes

FP32 = DTYPE_BYTES["fp32"]


@dataclass(frozen=True)
class ForwardShape:
    """The facts of one forward the rules need."""

    batch: int
    tokens: int  # per sequence in this forward (prompt in prefill, 1 in decoding)
    attended: int  # keys each query sees at most (the prompt in prefill)
    dtype: str
    eager: bool
    kbit: bool
    lora_rank: int  # 0: no unmerged adapter on the path

    @property
    def total_tokens(self) -> int:
        return self.batch * self.tokens


def layer_transient_bytes(inventory: ModelInventory, shape: ForwardShape) -> int:
    """The largest moment inside one decoder layer, beyond weights and cache."""
    t, d = shape.total_tokens, DTYPE_BYTES[shape.dtype]
    h, heads, kv = (
        inventory.hidden_size,
        inventory.num_attention_heads,
        inventory.num_key_value_heads,
    )
    hd = inventory.head_dim
    gated = any(g.name in ("gate_proj", "w1", "gate_up_proj") for g in inventory.linears)
    residual = alloc_bytes(t * h * d, 2)
    attention = alloc_bytes(t * heads * hd * d, 3) + alloc_bytes(t * kv * hd * d, 3)
    if shape.eager:
        scores = shape.batch * heads * shape.tokens * shape.attended
        attention += alloc_bytes(scores * d, 2) + alloc_bytes(scores * FP32)
    mlp = alloc_bytes(t * inventory.intermediate_size * d, 3 if gated else 2)
    norm = alloc_bytes(t * h * FP32, 2)
    inner = max(attention, mlp, norm)
    if shape.kbit and t > 1:
        inner += alloc_bytes(inventory.largest_quantizable_linear_params * d)
    if shape.lora_rank:
        widest = max(
            (g for g in inventory.linears if g.lora),
            key=lambda g: g.in_features + 2 * g.out_features,
            default=None,
        )
        if widest is not None:
            inner += alloc_bytes(t * widest.in_features * FP32) + alloc_bytes(
                t * shape.lora_rank * FP32
            )
            inner += alloc_bytes(t * widest.out_features * FP32, 2)
    return residual + inner


def logits_bytes(inventory: ModelInventory, batch: int, positions: int, dtype: str) -> int:
    """The output head's logits for ``positions`` positions of ``batch`` sequences, with
    ``generate``'s fp32 copy of the last position and gemma-2's soft-capping copy."""
    d = DTYPE_BYTES[dtype]
    copies = 2 if inventory.final_logit_softcapping else 1
    total = alloc_bytes(batch * positions * inventory.vocab_size * d, copies)
    if positions == 1:  # generate: logits[:, -1].to(copy=True, dtype=torch.float32)
        total += alloc_bytes(batch * inventory.vocab_size * FP32)
    return total

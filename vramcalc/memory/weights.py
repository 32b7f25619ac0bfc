"""Base-model weights and LoRA adapters, in the dtypes the recipe leaves them.

Rules (read from the sources named):

* Non-quantized loading (``--quant none``): every parameter in ``--dtype``
  (``from_pretrained(torch_dtype=...)``).
* k-bit loading: transformers' ``replace_with_bnb_linear`` swaps every
  ``type(m) is nn.Linear`` except the output head / tied keys / last module
  (``get_keys_to_not_convert``) for ``bnb.nn.Linear8bitLt`` or
  ``bnb.nn.Linear4bit``. Everything else (embeddings, norms, head, biases,
  MoE expert tensors that are 3-D parameters) is loaded in ``--dtype`` and then
  ``peft.prepare_model_for_kbit_training`` casts every fp16/bf16 parameter that
  is not ``Params4bit``/int8 to **fp32** (peft/utils/other.py).
* NF4/FP4 (``bitsandbytes.functional.quantize_4bit``, CUDA kernel in
  backends/cuda/ops.py): packed weight ``(n + 1) // 2`` uint8 bytes; absmax
  per block of 64 (``Params4bit`` default) as fp32; a 16-entry fp32 code per
  layer. Double quantization (``compress_statistics``) replaces the fp32 absmax
  by uint8 (one byte per block), plus a second-level fp32 absmax per 256 blocks,
  a 256-entry fp32 dynamic map copy and one fp32 offset (``quantize_blockwise``
  with ``nested=False``, ``code.to(copy=True)``).
* INT8 (``Int8Params`` → ``int8_vectorwise_quant``): int8 weight (one byte per
  element) plus ``SCB``, one fp32 scale per output row.
* LoRA adapters: peft creates ``lora_A``/``lora_B`` (and DoRA's
  ``lora_magnitude_vector``) as fp32 and keeps them fp32
  (``autocast_adapter_dtype=True`` upcasts bf16/fp16 adapters).
  ``modules_to_save`` wraps a module with a trainable deep copy in the
  module's own dtype (fp32 after k-bit preparation), counted with adapters.

Every tensor is charged the caching allocator's 512-byte rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramcalc.inventory import ModelInventory
from vramcalc.memory import DTYPE_BYTES, alloc_bytes
from vramcalc.memory.distributed import skips_kbit_upcast
from vramcalc.memory.gradients import saved_copy_dtype
from vramcalc.training_plan import TrainingPlan

NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
DYNAMIC_MAP_ENTRIES = 256
FOUR_BIT_CODE_ENTRIES = 16


@dataclass(frozen=True)
class WeightsEstimate:
    """Bytes of the model's own parameters and of its adapters."""

    quantized_linear_bytes: int  # packed k-bit weights + their quantization constants
    unquantized_bytes: int  # every other base parameter, in its (possibly upcast) dtype
    adapter_bytes: int
    unquantized_dtype: str
    rule: str

    @property
    def weights_bytes(self) -> int:
        return self.quantized_linear_bytes + self.unquantized_bytes


def four_bit_linear_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """Allocated bytes of one ``Linear4bit`` weight with its ``QuantState``."""
    n = out_features * in_features
    blocks = -(n // -NF4_BLOCKSIZE)
    total = alloc_bytes((n + 1) // 2)  # packed uint8
    total += alloc_bytes(FOUR_BIT_CODE_ENTRIES * 4)  # get_4bit_type code, fp32
    if double_quant:
        blocks2 = -(blocks // -NESTED_BLOCKSIZE)
        total += alloc_bytes(blocks)  # absmax quantized to uint8
        total += alloc_bytes(blocks2 * 4)  # state2.absmax fp32
        total += alloc_bytes(DYNAMIC_MAP_ENTRIES * 4)  # state2.code copy
        total += alloc_bytes(4)  # offset
    else:
        total += alloc_bytes(blocks * 4)  # absmax fp32
    return total


def int8_linear_bytes(out_features: int, in_features: int) -> int:
    """Allocated bytes of one ``Linear8bitLt`` weight: int8 CB + fp32 SCB per row."""
    return alloc_bytes(out_features * in_features) + alloc_bytes(out_features * 4)


def estimate_weights(inventory: ModelInventory, plan: TrainingPlan) -> WeightsEstimate:
    """Weights and adapters of ``inventory`` loaded and prepared as ``plan`` says."""
    roles = inventory.params_by_role
    quantized = 0
    if plan.is_kbit:
        for group in inventory.linears:
            if not group.quantizable:
                continue
            if plan.quant == "int8":
                per = int8_linear_bytes(group.out_features, group.in_features)
            else:
                per = four_bit_linear_bytes(
                    group.out_features, group.in_features, plan.double_quant
                )
            quantized += per * group.count
        # prepare_model_for_kbit_training upcasts to fp32; sharded QLoRA skips it
        unquantized_dtype = plan.dtype if skips_kbit_upcast(plan) else "fp32"
        unquantized_params = inventory.total_params - roles["linear"]
        rule = f"{plan.quant} linear weights (bitsandbytes storage + quantization constants); " + (
            f"embeddings, norms, head, biases and other tensors in {unquantized_dtype} "
            "(sharded QLoRA skips prepare_model_for_kbit_training)"
            if unquantized_dtype != "fp32"
            else "embeddings, norms, head, biases and other tensors upcast to fp32 by "
            "prepare_model_for_kbit_training"
        )
    else:
        unquantized_dtype = plan.dtype
        unquantized_params = inventory.total_params
        rule = f"every parameter in {plan.dtype}"
    # Tensor count is not tracked per parameter; the 512-byte rounding of
    # non-quantized tensors is below 0.01 % of any real model and is ignored.
    unquantized = unquantized_params * DTYPE_BYTES[unquantized_dtype]
    adapter = 0
    if plan.uses_adapters:
        adapter = inventory.adapter_params * DTYPE_BYTES["fp32"]
        adapter += inventory.saved_copy_params * DTYPE_BYTES[saved_copy_dtype(plan)]
    return WeightsEstimate(quantized, unquantized, adapter, unquantized_dtype, rule)

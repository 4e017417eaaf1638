"""GGUF's quantization types and llama.cpp's mixtures: block sizes, bytes per row, which types need an
importance matrix, and the fall-backs llama.cpp takes when a row is not a multiple of a block.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT

# name -> (llama_ftype, default tensor type). The default type is what every quantizable tensor
# gets before the per-category rules below raise or lower it.


@dataclass(frozen=True)
class Mixture:
    name: str
    ftype: FT
    default: T
    needs_imatrix: bool = False  # the mixture's main type refuses to run without an importance matrix
    description: str = ""


_MIXTURES = [
    Mixture("F32", FT.ALL_F32, T.F32, description="full precision"),
    Mixture("F16", FT.MOSTLY_F16, T.F16, description="half precision"),
    Mixture("BF16", FT.MOSTLY_BF16, T.BF16, description="bfloat16, lossless from bf16 sources"),
    Mixture("Q8_0", FT.MOSTLY_Q8_0, T.Q8_0, description="8.5 bpw, near lossless"),
    Mixture("Q6_K", FT.MOSTLY_Q6_K, T.Q6_K, description="6.56 bpw"),
    Mixture("Q5_K_M", FT.MOSTLY_Q5_K_M, T.Q5_K),
    Mixture("Q5_K_S", FT.MOSTLY_Q5_K_S, T.Q5_K),
    Mixture("Q5_1", FT.MOSTLY_Q5_1, T.Q5_1),
    Mixture("Q5_0", FT.MOSTLY_Q5_0, T.Q5_0),
    Mixture("Q4_K_M", FT.MOSTLY_Q4_K_M, T.Q4_K, description="the usual default"),
    Mixture("Q4_K_S", FT.MOSTLY_Q4_K_S, T.Q4_K),
    Mixture("Q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
    Mixture("Q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
    Mixture("IQ4_XS", FT.MOSTLY_IQ4_XS, T.IQ4_XS),
    Mixture("IQ4_NL", FT.MOSTLY_IQ4_NL, T.IQ4_NL),
    Mixture("Q3_K_L", FT.MOSTLY_Q3_K_L, T.Q3_K),
    Mixture("Q3_K_M", FT.MOSTLY_Q3_K_M, T.Q3_K),
    Mixture("Q3_K_S", FT.MOSTLY_Q3_K_S, T.Q3_K),
    Mixture("IQ3_M", FT.MOSTLY_IQ3_M, T.IQ3_S),
    Mixture("IQ3_S", FT.MOSTLY_IQ3_S, T.IQ3_S),
    Mixture("IQ3_XS", FT.MOSTLY_IQ3_XS, T.IQ3_S),
    Mixture("IQ3_XXS", FT.MOSTLY_IQ3_XXS, T.IQ3_XXS, needs_imatrix=True),
    Mixture("Q2_K", FT.MOSTLY_Q2_K, T.Q2_K),
    Mixture("Q2_K_S", FT.MOSTLY_Q2_K_S, T.Q2_K, needs_imatrix=True),
    Mixture("IQ2_M", FT.MOSTLY_IQ2_M, T.IQ2_S, needs_imatrix=True),
    Mixture("IQ2_S", FT.MOSTLY_IQ2_S, T.IQ2_XS, needs_imatrix=True),
    Mixture("IQ2_XS", FT.MOSTLY_IQ2_XS, T.IQ2_XS, needs_imatrix=True),
    Mixture("IQ2_XXS", FT.MOSTLY_IQ2_XXS, T.IQ2_XXS, needs_imatrix=True),
    Mixture("IQ1_M", FT.MOSTLY_IQ1_M, T.IQ1_M, needs_imatrix=True),
    Mixture("IQ1_S", FT.MOSTLY_IQ1_S, T.IQ1_S, needs_imatrix=True),
]
MIXTURES: dict[str, Mixture] = {m.name: m for m in _MIXTURES}

BITS_TO_MIXTURE = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}

# Types whose ggml kernel refuses to run without an importance matrix (ggml_quantize_requires_imatrix).
IMATRIX_TYPES = {T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS}

# Where a row length is not a multiple of a type's block, llama.cpp demotes to a 32-wide type
# (tensor_type_fallback); if even that does not divide the row, the tensor is stored F16.
FALLBACK = {
    T.IQ1_S: T.IQ4_NL, T.IQ1_M: T.IQ4_NL, T.IQ2_XXS: T.IQ4_NL, T.IQ2_XS: T.IQ4_NL, T.IQ2_S: T.IQ4_NL,
    T.IQ3_XXS: T.IQ4_NL, T.IQ3_S: T.IQ4_NL, T.IQ4_XS: T.IQ4_NL,
    T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0,
    T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
}

FLOAT_TYPES = {T.F32, T.F16, T.BF16}


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def row_bytes(t: T, n_per_row: int) -> int:
    """Bytes of one row of n_per_row elements stored as type t (ggml_row_size)."""
    blck, type_size = GGML_QUANT_SIZES[t]
    if n_per_row % blck:
        raise ValueError(f"row of {n_per_row} is not a multiple of the {t.name} block ({blck})")
    return n_per_row // blck * type_size


def tensor_bytes(t: T, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor with numpy-order shape (..., rows, n_per_row) stored as t."""
    return prod(shape[:-1]) * row_bytes(t, shape[-1])



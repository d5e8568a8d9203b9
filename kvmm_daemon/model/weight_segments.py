"""Weight segments: the model's weights cut into the units a step reads in order.

A step reads every layer in order and then the LM head, so the weights are cut into
*segments* in exactly that cyclic order: one per transformer layer (all of its tensors, in
the form the forward multiplies: int4-packed Q4_1, bf16 scales, float32 norms) and one per
chunk of LM-head rows (about a layer's bytes each). A segment is the unit the weight pool
keeps resident or streams from flash, and the unit of the weight file. The embedding table
is not a segment: a step needs only its tokens' rows (`EmbeddingRows`), and the final norm
is a few KiB that always stays resident.

`segment_parts` / `segment_from_parts` convert a segment to (JSON-able meta, named tensors)
and back over any tensors (views into a flash buffer included), with no conversion: the
bytes a weight file holds are the bytes the matmuls read. The LM head of a Q8_0 table
(SmolLM2's tied embeddings) is multiplied straight from its Q8_0 blocks under "auto" (mode
q8_0), so its chunks are stored and held as those blocks too. One exception, `FlashForm`: such
a head asked for in bfloat16 (--linear-mode bfloat16) is still stored as its Q8_0 blocks, 8.5
bits a weight instead of 16, and expanded in place after each read (kernels/q8_0.py) into
exactly the bfloat16 weight the resident head holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch

from kvmm_daemon.model import quant_linear as ql
from kvmm_daemon.model.spec import ModelSpec

LINEARS = ("qkv", "o", "gate_up", "down")
NORMS = ("attn_norm", "ffn_norm")


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: ql.QuantLinear
    o: ql.QuantLinear
    ffn_norm: torch.Tensor
    gate_up: ql.QuantLinear
    down: ql.QuantLinear


Segment = Union[LayerWeights, ql.QuantLinear]   # a layer, or one LM-head chunk


@dataclass(frozen=True, slots=True)
class FlashForm:
    """A segment stored in another form than its memory form. kind "q8_0": `data` holds the
    chunk's GGUF Q8_0 blocks (f16 d, 32 int8 q; 34 bytes), row by row, which kernels.q8_0
    expands in place to the chunk linear's bfloat16 weight [rows, in] (64 bytes a block)."""

    kind: str
    data: torch.Tensor      # uint8, the bytes the weight file holds


@dataclass(frozen=True, slots=True)
class SegmentId:
    """Which segment: kind "layer" (index = layer) or "lm_head" (index = chunk)."""

    kind: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.kind}.{self.index}"


def segment_ids(num_layers: int, lm_head_chunks: int) -> list[SegmentId]:
    """Every segment in the order a step reads them."""
    return ([SegmentId("layer", i) for i in range(num_layers)]
            + [SegmentId("lm_head", c) for c in range(lm_head_chunks)])


class ModelWeights:
    """Builds the forward's weights from a model file (GGUF or safetensors) one segment at a
    time, so preparing a weight file never holds more than one converted layer.

    Attributes (fixed): spec; linear_mode; lm_head_chunk_rows (rows per LM-head chunk, a
    function of the model's shape, see quant_linear.lm_head_chunk_rows); lm_head_chunks.
    """

    def __init__(self, model_file, spec: ModelSpec, *, linear_mode: str = "auto") -> None:
        self.model_file = model_file
        self.spec = spec
        self.linear_mode = linear_mode
        self._head_name = ("token_embd.weight" if spec.tie_word_embeddings
                           or "output.weight" not in model_file.tensor_names() else "output.weight")
        self.lm_head_chunk_rows = ql.lm_head_chunk_rows(spec.vocab_size, spec.hidden_size,
                                                        self._layer_storage_bytes())
        self.lm_head_chunks = -(-spec.vocab_size // self.lm_head_chunk_rows)

    def _layer_storage_bytes(self) -> int:
        """Stored bytes of layer 0's tensors (the file's quantized size, not the forward's)."""
        return sum(self.model_file.tensor(n).nbytes for n in self.model_file.tensor_names()
                   if n.startswith("blk.0."))

    def segment_ids(self) -> list[SegmentId]:
        return segment_ids(self.spec.num_layers, self.lm_head_chunks)

    def norm(self, name: str) -> torch.Tensor:
        return self.model_file.tensor(name).dequantize().to(torch.float32).contiguous()

    def layer(self, i: int) -> LayerWeights:
        p = f"blk.{i}."

        def linear(*names: str) -> ql.QuantLinear:
            return ql.make_linear([self.model_file.tensor(p + n) for n in names], mode=self.linear_mode)

        return LayerWeights(
            attn_norm=self.norm(p + "attn_norm.weight"),
            qkv=linear("attn_q.weight", "attn_k.weight", "attn_v.weight"),
            o=linear("attn_output.weight"),
            ffn_norm=self.norm(p + "ffn_norm.weight"),
            gate_up=linear("ffn_gate.weight", "ffn_up.weight"),
            down=linear("ffn_down.weight"),
        )

    def lm_head(self) -> list[ql.QuantLinear]:
        """The head as row chunks (the weight file's segments)."""
        return ql.make_lm_head_chunks(self.model_file.tensor(self._head_name),
                                      chunk_rows=self.lm_head_chunk_rows, mode=self.linear_mode)

    def _head_flash_forms(self, chunks: list[ql.QuantLinear]) -> list[FlashForm | None]:
        """Q8_0 blocks of each chunk when the head is a Q8_0 table multiplied in bfloat16
        (its bfloat16 weight is then bf16(d * q), which the blocks give back exactly)."""
        if not chunks or chunks[0].mode != "bfloat16":
            return [None] * len(chunks)
        qw = ql.as_quant_weight(self.model_file.tensor(self._head_name))
        if qw.ggml_type != "Q8_0":
            return [None] * len(chunks)
        rows = self.lm_head_chunk_rows
        return [FlashForm("q8_0", qw.rows(a, min(a + rows, qw.out_features)).blocks())
                for a in range(0, qw.out_features, rows)]

    def lm_head_whole(self) -> ql.QuantLinear:
        """The head as one linear: one matmul when it is all in memory. Its logits equal
        the chunks' bit for bit (each logit is the same dot product; checked across batch
        sizes and thread counts in tests/model/test_weight_segments.py)."""
        return ql.make_lm_head(self.model_file.tensor(self._head_name), mode=self.linear_mode)

    def segments(self) -> Iterator[tuple[SegmentId, Segment]]:
        """Every segment in step order; the LM head's table is converted once, at its turn."""
        for sid, segment, _ in self.stored_segments():
            yield sid, segment

    def stored_segments(self) -> Iterator[tuple[SegmentId, Segment, FlashForm | None]]:
        """Every segment in step order with the form a weight file stores it in (None: as
        `segment_parts` gives it)."""
        for i in range(self.spec.num_layers):
            yield SegmentId("layer", i), self.layer(i), None
        chunks = self.lm_head()
        for c, (chunk, flash) in enumerate(zip(chunks, self._head_flash_forms(chunks))):
            yield SegmentId("lm_head", c), chunk, flash

    def embedding(self) -> ql.QuantEmbedding:
        return ql.make_embedding(self.model_file.tensor("token_embd.weight"))

    def output_norm(self) -> torch.Tensor:
        return self.norm("output_norm.weight")


def segment_parts(segment: Segment) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able meta, named tensors) of a segment; `segment_from_parts` inverts it."""
    if isinstance(segment, ql.QuantLinear):
        meta, tensors = segment.parts()
        return {"linear": meta}, tensors
    meta: dict = {"linears": {}}
    tensors = {n: getattr(segment, n) for n in NORMS}
    for name in LINEARS:
        lin_meta, lin_tensors = getattr(segment, name).parts()
        meta["linears"][name] = lin_meta
        tensors.update({f"{name}.{k}": t for k, t in lin_tensors.items()})
    return meta, tensors


def segment_from_parts(meta: dict, tensors: dict[str, torch.Tensor]) -> Segment:
    if "linear" in meta:
        return ql.QuantLinear.from_parts(meta["linear"], tensors)
    linears = {}
    for name, lin_meta in meta["linears"].items():
        prefix = name + "."
        linears[name] = ql.QuantLinear.from_parts(
            lin_meta, {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
    return LayerWeights(attn_norm=tensors["attn_norm"], ffn_norm=tensors["ffn_norm"], **linears)


def segment_nbytes(segment: Segment) -> int:
    """Bytes of the tensors a segment's forward reads."""
    return sum(t.numel() * t.element_size() for t in segment_parts(segment)[1].values())

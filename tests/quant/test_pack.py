import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import (
    pack_to_int32,
    unpack_from_int32,
)

from llmpress.quant.pack import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(3, 70), (16, 576), (5, 33), (7, 32), (1, 1)])
@pytest.mark.parametrize("dim", [0, 1])
def test_roundtrip_exact_and_matches_compressed_tensors(bits, shape, dim):
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g).to(torch.int8)
    p = pack_int32(q, bits, dim)
    assert p.dtype == torch.int32
    # dense: ceil(n * bits / 32) words along the packed dimension
    assert p.shape[dim] == -(-shape[dim] * bits // 32)
    assert torch.equal(unpack_int32(p, bits, shape, dim), q)
    # bit-exact with the real reader's packer and unpacker
    assert torch.equal(p, pack_to_int32(q, bits, packed_dim=dim))
    assert torch.equal(unpack_from_int32(p, bits, torch.Size(shape), packed_dim=dim), q)


def test_extremes_roundtrip():
    for bits in range(2, 9):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.tensor([[lo, hi] * 40], dtype=torch.int8)
        assert torch.equal(unpack_int32(pack_int32(q, bits), bits, q.shape), q)


def test_bad_dtype():
    with pytest.raises(ValueError, match="int8"):
        pack_int32(torch.zeros(2, 2), 4)

"""The Triton kernel against dequantise-then-matmul: on the GPU when there is one, else in
Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 before Triton is imported)."""
import dataclasses

import pytest
import torch

from sparsemix.packing import dequantise, random_packed

CASES = [  # rows, cols, widths, sparsity, group size, batch
    (37, 200, (2, 3, 4, 6, 8, 16), 0.5, 200, 1),
    (19, 300, (3, 6), 0.0, 300, 5),
    (33, 1100, (2, 3, 4, 6, 8), 0.5, 64, 3),
    (8, 64, (16,), 0.3, 64, 16),
    (21, 96, (3,), 0.0, 96, 1),
    (100, 2090, (3, 4, 6), 0.5, 2090, 1),  # segments over several row blocks and column chunks, ragged
    (70, 1050, (2, 4, 8, 16), 0.0, 48, 8),  # dense, groups not a multiple of 32, tl.dot batch
    (45, 77, (4, 6), 0.7, 77, 2),  # mask rows of 10 bytes, padded to 12
    (40, 2048, (2, 3, 4), 0.5, 128, 1),  # chunks tile the columns exactly (no column checks), groups per tile
    (24, 1376, (6, 8), 0.0, 1376, 4),  # a 43-tile chunk that divides the columns
]


def check(device: str) -> None:
    from sparsemix.kernels import packed_matmul
    from sparsemix.packed import PackedLinear

    gen = torch.Generator().manual_seed(0)
    for rows, cols, widths, sparsity, group_size, batch in CASES:
        bits = torch.tensor(widths)[torch.randint(0, len(widths), (rows,), generator=gen)]
        packed = random_packed(bits, cols, sparsity, group_size, gen)
        module = PackedLinear(packed.header(), packed.tensors, bias=False).to(device)
        module.fixed_meta = {}  # the general kernel even where the fixed-position one applies
        x = torch.randn(batch, cols, generator=gen).half()
        y = packed_matmul(x.to(device), module).float().cpu()
        assert module.kernel_meta is not None
        reference = x.float() @ dequantise(packed).float().T
        error = float((y - reference).abs().max())
        assert error <= 2e-3 * float(reference.abs().max()), (rows, cols, widths, sparsity, group_size, batch, error)


def test_kernel_matches_dequantise_then_matmul():
    pytest.importorskip("triton")
    check("cuda" if torch.cuda.is_available() else "cpu")


FIXED_CASES = [  # rows, cols, widths, group size, batch, sparsity: 2:4 (every 4 columns keep 2) or a fraction
    (300, 256, (2, 3, 4, 6, 8, 16), 256, 1, "2:4"),  # all widths, segments over several row blocks
    (40, 320, (3, 6), 64, 3, "2:4"),  # a group per tile; 5 tiles: a ragged last split
    (7, 128, (16,), 128, 1, "2:4"),  # unquantised rows only
    (50, 256, (2, 3, 4, 6, 8, 16), 256, 1, 0.0),
    (30, 160, (3, 6), 32, 2, 0.0),  # a group per 32-column tile; 5 tiles: a ragged last split
    (20, 128, (4, 8), 128, 6, "2:4"),  # two passes over the weights, the second with 2 of its 4 tokens
    (20, 96, (2, 16), 96, 16, 0.0),  # the largest decode batch: four passes
    (60, 192, (2, 3, 4, 6, 8, 16), 64, 1, 0.5),  # unstructured: pruned weights at the zero point's code
    (24, 128, (4, 16), 128, 5, 0.8),
]


def test_fixed_position_kernel_matches_dequantise_then_matmul():
    pytest.importorskip("triton")
    from sparsemix.kernels import packed_matmul
    from sparsemix.packed import PackedLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1)
    for rows, cols, widths, group_size, batch, sparsity in FIXED_CASES:
        bits = torch.tensor(widths)[torch.randint(0, len(widths), (rows,), generator=gen)]
        two_four = sparsity == "2:4"
        packed = random_packed(bits, cols, 0.5 if two_four else sparsity, group_size, gen, two_four=two_four)
        module = PackedLinear(packed.header(), packed.tensors, bias=False).to(device)
        x = torch.randn(batch, cols, generator=gen).half()
        y = packed_matmul(x.to(device), module).float().cpu()
        assert module.fixed_meta and module.kernel_meta is None, "should take the fixed-position kernel only"
        assert module.fixed_meta["dense"] != two_four
        reference = x.float() @ dequantise(packed).float().T
        assert float((y - reference).abs().max()) <= 2e-3 * float(reference.abs().max()), (rows, cols, widths)


def test_fixed_position_kernel_gives_the_same_product_under_other_launch_shapes():
    """Rows per program, column walks side by side, warps and loading ahead change which program and
    thread take a (row, tile) pair and when, never the product: ragged splits, programs spanning
    segments, batches of one and of two passes (2:4) or mma token blocks (dense). An unrolled walk sums in the
    loop's order, so it gives the loop's product bit for bit, also where it decodes its weights before the wait."""
    pytest.importorskip("triton")
    from sparsemix.kernels import FixedConfig, packed_matmul
    from sparsemix.packed import PackedLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    # 5 tiles each; 2:4 at one token also with a grid per 64 columns (unrolled 2-step walks decode before the wait)
    for cols, sparsity, batch, group in ((320, "2:4", 1, 320), (320, "2:4", 1, 64), (160, 0.0, 6, 160),
                                         (160, 0.5, 11, 160)):
        bits = torch.tensor((2, 4, 6))[torch.randint(0, 3, (40,), generator=gen)]
        two_four = sparsity == "2:4"
        packed = random_packed(bits, cols, 0.5 if two_four else sparsity, group, gen, two_four=two_four)
        module = PackedLinear(packed.header(), packed.tensors, bias=False).to(device)
        x = torch.randn(batch, cols, generator=gen).half()
        reference = x.float() @ dequantise(packed).float().T
        packed_matmul(x.to(device), module)
        # tensor cores: warps = split * rows / 16
        # the cap and the L2 prefetches only exist on a GPU
        gpu_only = (FixedConfig(16, 1, 1, ahead=2, unrolled=True, programs_per_sm=2),
                    FixedConfig(16, 1, 1, ahead=2, programs_per_sm=3),
                    FixedConfig(16, 1, 1, ahead=2, unrolled=True, prefetchers=2)) if device == "cuda" else ()
        for config in (FixedConfig(16, 1, 1), FixedConfig(16, 2, 2, ahead=3), FixedConfig(32, 2, 4, pdl=False, ahead=1),
                       FixedConfig(64, 1, 4, ahead=2), FixedConfig(16, 1, 1, ahead=2, unrolled=True),
                       FixedConfig(32, 2, 4, ahead=1, unrolled=True), *gpu_only):
            module.fixed_meta["config"] = config
            y = packed_matmul(x.to(device), module).float().cpu()
            assert float((y - reference).abs().max()) <= 2e-3 * float(reference.abs().max()), (cols, config)
            if config.unrolled:
                module.fixed_meta["config"] = dataclasses.replace(config, unrolled=False)
                assert torch.equal(packed_matmul(x.to(device), module).float().cpu(), y), (cols, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launch order only matters on a GPU")
def test_chained_layers_read_their_input_only_after_the_previous_layer_wrote_it():
    """Each layer's input is the previous layer's output. Launched back to back (on Hopper each kernel
    starts while the previous one ends and must wait before reading x) and replayed as a CUDA graph,
    the chain gives exactly what it gives with the GPU synchronised between layers."""
    pytest.importorskip("triton")
    from sparsemix.kernels import packed_matmul
    from sparsemix.packed import PackedLinear

    gen = torch.Generator().manual_seed(4)
    layers = []
    for i in range(6):  # 2:4, dense and unstructured in turn
        sparsity = ("2:4", 0.0, 0.5)[i % 3]
        packed = random_packed(torch.tensor((3, 4, 6))[torch.randint(0, 3, (2048,), generator=gen)], 2048,
                               0.5 if sparsity == "2:4" else sparsity, 2048, gen, two_four=sparsity == "2:4")
        layers.append(PackedLinear(packed.header(), packed.tensors, bias=False).cuda())
    x = torch.randn(1, 2048, generator=gen).half().cuda() * 0.1

    def chain(synchronise: bool) -> torch.Tensor:
        h = x
        for layer in layers:
            h = packed_matmul(h, layer)
            if synchronise:
                torch.cuda.synchronize()
        return h

    expected = chain(True)
    assert all(layer.fixed_meta for layer in layers) and bool(torch.isfinite(expected).all())
    assert torch.equal(chain(False), expected)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(False)
    for _ in range(3):
        captured.zero_()
        graph.replay()
        assert torch.equal(captured, expected)


def test_launch_shapes_fill_their_programs_exactly():
    """A warp per 16 rows and column walk; all programs in one wave (at most 2 of 16 rows or 3 of 32 per
    multiprocessor, by registers, or by the cap where there is one); 2:4 programs of 32 rows load 1 step ahead
    (2 would leave 2 per multiprocessor)."""
    pytest.importorskip("triton")
    from sparsemix.kernels import PAD_ROWS, FixedConfig, fixed_config

    for rows in (16, 576, 4096, 11008, 28672):
        for dense in (True, False):
            for batch in (1, 2, 16):
                config = fixed_config(rows, 4096, dense, 132, batch, True)
                assert config.rows % PAD_ROWS == 0 and config.split & (config.split - 1) == 0
                assert config.warps * PAD_ROWS == config.rows * config.split, (rows, dense, batch, config)
                assert -(-rows // config.rows) <= 3 * 132 or config.rows == 2 * PAD_ROWS
                assert not config.programs_per_sm or -(-rows // config.rows) <= config.programs_per_sm * 132  # one wave
    # dense walks of at most 4 steps (of 1024 columns with one block a program) run unrolled; 2:4 walks of at most
    # 2 steps too, at most 2 programs to a multiprocessor; dense unrolled layers of more programs than multiprocessors
    # have 32 of them ask the L2 for the call's weights, up to 8 tokens
    assert fixed_config(4096, 4096, True, 132, 1, False) == FixedConfig(16, 8, 8, True, 2, unrolled=True, prefetchers=32)
    assert fixed_config(576, 1536, True, 132, 1, False) == FixedConfig(16, 8, 8, True, 2, unrolled=True)
    assert fixed_config(4096, 4096, True, 132, 16, False) == FixedConfig(16, 8, 8, True, 2, unrolled=True)
    assert fixed_config(4096, 4096, False, 132, 1, False) == FixedConfig(16, 8, 8, True, 2, True, programs_per_sm=2)
    assert fixed_config(576, 1536, False, 132, 1, False) == FixedConfig(16, 8, 8, True, 2, True, programs_per_sm=2)
    assert fixed_config(4096, 4096, False, 132, 16, False) == FixedConfig(16, 8, 8, True, 2, True, programs_per_sm=2)
    assert fixed_config(4096, 11008, False, 132, 1, False) == FixedConfig(16, 8, 8, True, 2)
    assert fixed_config(4096, 11008, True, 132, 1, False) == FixedConfig(16, 8, 8, True, 2)
    assert fixed_config(11008, 4096, True, 132, 1, False) == FixedConfig(32, 4, 8, True, 2)
    assert fixed_config(11008, 4096, False, 132, 1, False) == FixedConfig(32, 4, 8, True, 1)
    # narrow loop walks (at most 3 code bits a row on average, no row above 6 dense, 4 2:4), at one token: a fair
    # share of the programs to a multiprocessor (258 programs of 16 rows: 2; 11040 padded rows: at most 345 + 6 of 32)
    assert fixed_config(4128, 11008, True, 132, 1, True) == FixedConfig(16, 8, 8, True, 2, programs_per_sm=2)
    assert fixed_config(11040, 4096, True, 132, 1, True) == FixedConfig(32, 4, 8, True, 2, programs_per_sm=3)
    assert fixed_config(4128, 11008, False, 132, 1, True) == FixedConfig(16, 8, 8, True, 2, programs_per_sm=2)
    assert fixed_config(11040, 4096, False, 132, 1, True) == FixedConfig(32, 4, 8, True, 1, programs_per_sm=3)
    for elsewhere in ((4128, 11008, True, 132, 4, True), (4128, 11008, True, 132, 1, False),
                      (4128, 11008, False, 132, 2, True), (4096, 4096, True, 132, 1, True)):
        assert fixed_config(*elsewhere).programs_per_sm == 0, elsewhere


def test_a_residency_cap_asks_each_launch_for_its_share_of_a_multiprocessors_shared_memory():
    """Capping at 2 programs a multiprocessor makes every later launch ask for a third of its shared memory
    and a byte (3 never fit, 2 do) and reloads the module; a kernel that asks for
    more already, or an object that is not Triton 3's CompiledKernel, is left as it is."""
    from collections import namedtuple

    from sparsemix.kernels import _cap_residency

    metadata = namedtuple("KernelMetadata", "num_warps num_ctas shared")

    class Compiled:  # what a launch of Triton 3's CompiledKernel reads
        def __init__(self, shared):
            self.metadata, self.packed_metadata = metadata(8, 1, shared), (8, 1, shared)
            self.module = self._run = "loaded"

    capped, roomy = Compiled(1024), Compiled(100_000)
    for kernel in (capped, roomy, object()):
        _cap_residency(kernel, 2, 233_472)  # an H100's shared memory per multiprocessor
    share = capped.packed_metadata[2]
    assert capped.metadata.shared == share and 2 * (share + 1024) <= 233_472 < 3 * share
    assert capped.module is None and capped._run is None
    assert roomy.packed_metadata == (8, 1, 100_000) and roomy.module == "loaded"


def test_a_kernel_with_less_shared_scratch_than_its_shared_sum_writes_fails_loudly():
    """The one-token sum writes 64 bytes a warp into scratch that Triton allocates for its own use: a compiled kernel
    with less raises at its first launch, rather than letting warps overwrite each other's sums; enough passes, and so
    does an object without Triton 3's metadata."""
    from types import SimpleNamespace

    from sparsemix.kernels import _check_scratch

    with pytest.raises(RuntimeError, match="needs 512"):
        _check_scratch(SimpleNamespace(metadata=SimpleNamespace(shared=256)), 8)
    _check_scratch(SimpleNamespace(metadata=SimpleNamespace(shared=1024)), 8)
    _check_scratch(object(), 8)


def test_zero_points_that_are_not_codes_leave_the_layer_to_the_general_kernel():
    pytest.importorskip("triton")
    from sparsemix.kernels import fixed_meta
    from sparsemix.packed import PackedLinear

    gen = torch.Generator().manual_seed(2)
    for sparsity, two_four in ((0.5, False), (0.0, False), (0.5, True)):  # unstructured, dense, 2:4
        packed = random_packed(torch.full((16,), 4), 128, sparsity, 128, gen, two_four=two_four)
        assert fixed_meta(PackedLinear(packed.header(), packed.tensors, bias=False))["dense"] != two_four
        for zero in (packed.tensors["zero"] + 0.5, packed.tensors["zero"] - 16):  # neither is a code of a 4-bit row
            tensors = dict(packed.tensors, zero=zero)
            assert fixed_meta(PackedLinear(packed.header(), tensors, bias=False)) is None, (sparsity, two_four)


def test_kernel_bytes_count_the_arrangement_x_and_the_output_each_kernel_writes():
    """The benchmark's bandwidth divides these bytes by the time: y counts at the width each kernel writes it
    (fp16 from the fixed-position kernel, fp32 from the general kernel's atomics), the rest at its storage."""
    pytest.importorskip("triton")
    from sparsemix.kernels import _fixed_matmul, _general_matmul, fixed_meta, kernel_bytes, kernel_meta
    from sparsemix.packed import PackedLinear

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    rows, cols, batch = 32, 256, 3
    packed = random_packed(torch.full((rows,), 4), cols, 0.0, cols, gen)
    module = PackedLinear(packed.header(), packed.tensors, bias=False).to(device)
    x = torch.randn(batch, cols, generator=gen).half().to(device)
    fixed = fixed_meta(module)
    module.kernel_meta = kernel_meta(module)
    for meta, y in ((fixed, _fixed_matmul(x, fixed, rows, cols, cols)), (module.kernel_meta, _general_matmul(x, module))):
        arrangement = sum(t.numel() * t.element_size() for t in meta.values() if isinstance(t, torch.Tensor))
        assert kernel_bytes(meta, batch, rows, cols) == arrangement + x.numel() * 2 + y.numel() * y.element_size()


def test_narrow_layers_average_at_most_3_code_bits_with_no_row_above_6_dense_or_4_two_four():
    """The policy's "narrow" (a fair share of programs to a multiprocessor on loop walks): the rows' mean code
    width at most NARROW_BITS, none wider than NARROW_WIDEST (6 dense, 4 2:4; fp16 rows count as 16 bits)."""
    pytest.importorskip("triton")
    from sparsemix.kernels import fixed_meta
    from sparsemix.packed import PackedLinear

    gen = torch.Generator().manual_seed(4)
    for widths, dense, two_four in (((2, 3, 4), True, True), ((3,), True, True), ((2, 4), True, True),
                                    ((2, 2, 2, 6), True, False), ((3, 4), False, False), ((2, 2, 2, 8), False, False),
                                    ((2, 2, 2, 2, 2, 2, 16), False, False)):
        bits = torch.tensor(widths).repeat_interleave(16)  # 16 rows of each width in turn
        for sparse, narrow in ((False, dense), (True, two_four)):
            packed = random_packed(bits, 64, 0.5 if sparse else 0.0, 64, gen, two_four=sparse)
            meta = fixed_meta(PackedLinear(packed.header(), packed.tensors, bias=False))
            assert meta["dense"] != sparse and meta["narrow"] == narrow, (widths, sparse)

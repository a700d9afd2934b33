"""The bank's arrays are declared once (contract.BANK_ARRAYS): the bank, its shapes and the graph inputs agree."""

from diki_edge_runtime import bank as bank_module
from diki_edge_runtime import contract
from diki_edge_runtime.bank import BankLayout, TaskBank


def _layout() -> BankLayout:
    return BankLayout(backbone={"model": "t", "weights_sha256": "0" * 64}, image_layers=2, text_layers=3,
                      residual_length=4, image_width=5, text_width=6, embed_dim=7, calibration_levels=[0.0, 1.0],
                      ridge=1e-3, logit_scale=100.0)


def test_every_bank_array_has_its_declared_shape_and_dtype():
    layout = _layout()
    shapes = layout.shapes(tasks=3, classes=11)
    assert set(shapes) == set(contract.BANK_ARRAY_NAMES)
    assert shapes[contract.BANK_K] == (3, 2, 4, 5)
    assert shapes[contract.TEXT_V] == (3, 3, 4, 6)
    assert shapes[contract.GAUSS_WHITEN] == (3, 7, 7)
    assert shapes[contract.CLASS_EMBEDS] == (2, 11, 7)
    empty = TaskBank.empty(layout)
    for spec in contract.BANK_ARRAYS:
        assert empty.arrays[spec.name].dtype.name == spec.dtype, spec.name


def test_graph_inputs_are_the_graph_consumed_bank_arrays_in_declared_order():
    graph_bank_inputs = [s.name for s in contract.GRAPH_INPUTS[1:]]
    assert graph_bank_inputs == list(bank_module.GRAPH_ARRAYS)
    assert [s.name for s in contract.TEXT_GRAPH_INPUTS if s.name in contract.BANK_ARRAY_NAMES] == \
        list(bank_module.TEXT_GRAPH_ARRAYS)
    by_name = {s.name: s for s in contract.BANK_ARRAYS}
    for spec in contract.GRAPH_INPUTS[1:] + contract.TEXT_GRAPH_INPUTS:
        if spec.name in by_name:
            assert spec.dims == by_name[spec.name].dims and spec.dtype == by_name[spec.name].dtype


def test_layout_dimensions_are_the_declared_symbolic_dimensions():
    declared = {d for s in contract.BANK_ARRAYS for d in s.dims} - set(contract.DYNAMIC_DIMS)
    assert declared == set(bank_module.BANK_LAYOUT_DIMS)
    assert set(bank_module.BANK_LAYOUT_DIMS) <= set(BankLayout.__dataclass_fields__)


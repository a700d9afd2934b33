"""Training shapes derive from the bank's declared array dimensions (contract.BANK_ARRAYS)."""

from dataclasses import fields

from diki_edge.model import AdapterShape
from diki_edge_runtime import bank as bank_module


def test_training_adapter_shape_names_the_bank_layout_dimensions():
    assert {f.name for f in fields(AdapterShape)} == set(bank_module.BANK_LAYOUT_DIMS)

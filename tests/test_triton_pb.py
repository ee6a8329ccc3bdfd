"""The pb helpers' checks that need no tritonserver: they run before anything reaches Triton's module."""
import numpy as np
import pytest

from ensemble.triton import pb


def test_a_joint_run_whose_outputs_lack_a_row_per_input_row_is_refused_before_slicing():
    """Sliced anyway, the requests after the first short output would get other requests' rows, or none."""
    members = [(0, {"X": np.ones((1, 2), np.float32)}), (1, {"X": np.full((2, 2), 2, np.float32)})]

    def run(batch):
        return {"Y": batch["X"] * 3, "Z": batch["X"][:1], "W": np.zeros((4, 1), np.float32)}

    with pytest.raises(RuntimeError) as error:
        pb._joint_run(members, run)
    assert str(error.value) == "outputs ['W', 'Z'] do not have one row per input row (3)"  # Y's 3 rows are fine

"""The spec copies in tests/specs/ are the published ones the project shares."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "specs"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "specs"


@pytest.mark.parametrize("name", ["openai-images.schema.json", "stability.yaml"])
def test_copies_match_the_shared_specs(name):
    if not SHARED.is_dir():
        pytest.skip("no shared/specs beside this checkout")
    assert (HERE / name).read_bytes() == (SHARED / name).read_bytes()

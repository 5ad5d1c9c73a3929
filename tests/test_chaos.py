"""bench/chaos.py drives the real trainer: a small subset of its faults, run as the benchmark runs them."""

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_chaos_subset_recovers_or_stops_clearly_and_loses_nothing(tmp_path):
    import chaos

    out = tmp_path / "chaos.json"
    payload = chaos.main(["--faults", "bitflip,used_folder", "--quick", "--work_dir", str(tmp_path / "w"),
                          "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    rows = {r["fault"]: r for r in payload["rows"]}
    # The optimizer state and the model weights of the newest checkpoint, each with a flipped bit: every
    # time `latest` falls back and ends bit-identical to the undamaged run, and the damaged checkpoint named
    # explicitly is refused with the file.
    assert rows["bitflip"] | {"seen": None, "seconds": None} == {
        "fault": "bitflip", "injected": 2, "recovered": 2, "stopped": 2, "lost": 0, "seen": None, "seconds": None,
    }  # fmt: skip
    assert (rows["used_folder"]["injected"], rows["used_folder"]["stopped"], rows["used_folder"]["lost"]) == (1, 1, 0)
    table = (tmp_path / "chaos.md").read_text()
    assert "| bitflip | 2 | 2 | 2 | 0 |" in table and "| used_folder | 1 | 0 | 1 | 0 |" in table

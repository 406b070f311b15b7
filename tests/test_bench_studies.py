"""The study scripts run end to end on tiny models: bench/sampling.py (the sampling-time table
with both cinc columns, and its figure) and bench/fashion.py (Fashion-MNIST at equal budget,
here on small synthetic idx files)."""
import json

import numpy as np

from bench import fashion, sampling
from tests.test_data import idx_bytes


def test_sampling_table_has_both_cinc_columns_and_a_figure(tmp_path, capsys):
    figure = tmp_path / "sampling.png"
    assert sampling.main(["--sizes", "8", "16", "--n", "2", "--steps", "1", "--hidden", "4",
                          "--repeats", "1", "--plot", str(figure)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| size |"))
    for label in ("finc", "cinc (published, raster)", "cinc (wavefront)", "emerging", "glow1x1",
                  "cinc (published, raster) / finc"):
        assert f"| {label} |" in header + "|"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fashion_study_on_synthetic_files(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for name, count in (("train-images-idx3-ubyte", 128), ("t10k-images-idx3-ubyte", 40)):
        (data / name).write_bytes(idx_bytes(rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)))
    out, figures = tmp_path / "runs", tmp_path / "figures"
    fashion.main(["--invconv", "finc", "cinc", "--seeds", "0", "1", "--steps", "1", "--hidden", "4",
                  "--batch-size", "16", "--cpu-budget", "1", "--equal-steps", "3",
                  "--curve-every", "2", "--eval-subset", "16", "--repeats", "1",
                  "--data-dir", str(data), "--out", str(out), "--figures", str(figures)])
    result = json.loads((out / "cinc-s1" / "result.json").read_text())
    assert result["equal_steps"]["steps"] == 3
    assert result["equal_time"]["cpu_s"] >= 1 and result["equal_time"]["steps"] >= 3
    assert {"sample100_28_raster", "sample100_28_wavefront", "sample100_112_raster",
            "recon_error"} <= set(result["measured"])
    table = (figures / "fashion.md").read_text()
    assert "| cinc (published, raster) |" in table and "| finc |" in table
    for name in ("fashion_curves.png", "fashion_samples.png"):
        assert (figures / name).read_bytes()[:4] == b"\x89PNG"


def test_conversion_shares_are_measured_and_the_functions_restored(monkeypatch):
    """bench/conversions.py: the clock sees the layers' conversions (a positive share below
    1 for a FInC flow, whose masked convs and coupling networks both convert) and puts the
    original functions back afterwards."""
    from bench import conversions, flow_timing
    from nfcore.kernels import cpu
    from nfcore.nn import network
    monkeypatch.setitem(flow_timing.PRESETS, "tiny", dict(levels=2, steps=1, hidden=8, batch=4))
    monkeypatch.setattr(conversions, "N_SAMPLES", 3)
    before = (cpu.to_groups, network.channel_last)
    (step_s, step_share), (sample_s, sample_share) = conversions.measure("tiny", "finc", 2)
    assert step_s > 0 and sample_s > 0
    assert 0 < step_share < 1 and 0 < sample_share < 1
    assert (cpu.to_groups, network.channel_last) == before

"""The examples in quick mode: they run, write non-trivial PNGs, and show what they claim.

Each example is imported from its file and driven through ``main(argv)``, which returns its
results as a dict; the assertions read that dict, never the printed table.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def assert_nontrivial_png(path, min_bytes=20_000):
    from matplotlib.image import imread

    path = Path(path)
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > min_bytes
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    # Not a blank canvas: many distinct colours (contours, curves, text).
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50


@pytest.fixture(scope="module")
def mlp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_mlp")
    results = load_example("train_mlp").main(
        ["--quick", "--out", str(out), "--no-progress", "--json", str(out / "results.json")])
    return results, out


def test_train_mlp_outputs(mlp_results):
    results, out = mlp_results
    assert_nontrivial_png(results["figures"]["loss_curves"])
    assert_nontrivial_png(results["figures"]["decision_boundaries"])
    assert Path(results["figures"]["loss_curves"]).parent == out
    # The JSON file is the returned dict.
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    runs = results["runs"]
    for key in ("gd", "minibatch_gd", "sgd", "momentum", "rmsprop", "adam", "adagrad",
                "adadelta", "minibatch_gd_decay", "momentum_decay", "adam_decay"):
        r = runs[key]
        assert np.isfinite(r["loss"]) and 0 < r["loss"] < r["history"]["loss"][0], key
        assert 0.5 < r["train_accuracy"] <= 1.0
        assert r["steps"] == r["history"]["step"][-1] == results["epochs"] * r["steps_per_epoch"]
    assert runs["gd"]["batch_size"] == results["n_train"] and runs["sgd"]["batch_size"] == 1


def test_train_mlp_adam_and_momentum_beat_plain_gd(mlp_results):
    results, _ = mlp_results
    runs = results["runs"]
    plain = runs["minibatch_gd"]  # plain GD (no momentum) on the same mini-batches
    for key in ("adam", "momentum"):
        r = runs[key]
        # Same number of steps on the same sequence of batches, from the same initial weights.
        assert r["steps"] == plain["steps"] and r["batch_size"] == plain["batch_size"]
        assert r["history"]["step"] == plain["history"]["step"]
        assert r["history"]["loss"][0] == plain["history"]["loss"][0]
        assert r["loss"] < 0.75 * plain["loss"], (key, r["loss"], plain["loss"])
        # And lower than full-batch gradient descent after the same number of epochs.
        assert r["loss"] < runs["gd"]["loss"], (key, r["loss"], runs["gd"]["loss"])


def assert_gif(path, min_frames=11, max_bytes=2_000_000):
    """An animated GIF whose frames change (the race moves)."""
    from PIL import Image

    path = Path(path)
    assert path.read_bytes()[:6] == b"GIF89a"
    assert path.stat().st_size < max_bytes
    with Image.open(path) as gif:
        assert gif.n_frames >= min_frames
        first = np.asarray(gif.convert("RGB"))
        gif.seek(gif.n_frames - 1)
        last = np.asarray(gif.convert("RGB"))
        assert first.shape[0] > 300 and first.shape[1] > 300
        assert (first != last).any(axis=-1).mean() > 0.005  # paths drawn between them
        return gif.n_frames


def test_train_mlp_class_colours_match():
    # The region predicted as a class has the hue of that class's points (light and dark
    # shades of one colour), and not the hue of the other class.
    from matplotlib.colors import rgb_to_hsv, to_rgb

    colours = load_example("train_mlp").CLASS_COLORS
    hue = lambda c: rgb_to_hsv(to_rgb(c))[0]  # noqa: E731
    for c in (0, 1):
        same = abs(hue(colours["region"][c]) - hue(colours["point"][c]))
        other = abs(hue(colours["region"][c]) - hue(colours["point"][1 - c]))
        assert min(same, 1 - same) < 0.05 < min(other, 1 - other), c


def test_trajectories(tmp_path):
    results = load_example("trajectories").main(["--quick", "--out", str(tmp_path)])
    assert_nontrivial_png(results["figures"]["trajectories"])
    assert results["race_frames"] == 15
    assert assert_gif(results["figures"]["race"]) == results["race_frames"]
    surfaces = results["surfaces"]
    assert set(surfaces) == {"saddle", "rosenbrock", "beale", "local_min"}
    for key, paths in surfaces.items():
        assert set(paths) == {"GD", "momentum", "Nesterov", "RMSprop", "Adam", "Adagrad",
                              "Adadelta"}
        for name, r in paths.items():
            assert r["finite"] and r["steps"] == results["steps"], (key, name)
            assert r["value"] < r["start_value"], (key, name)
    # Heavy-ball momentum carries the iterate over the barrier into the global minimum (x < 0);
    # plain gradient descent stops in the local one (x > 0).
    local = surfaces["local_min"]
    assert local["GD"]["final"][0] > 0.5 and local["momentum"]["final"][0] < -0.5
    # In the same number of steps Adam gets further down than plain gradient descent: off the
    # saddle, along Rosenbrock's valley, into Beale's.
    for key in ("saddle", "rosenbrock", "beale"):
        assert surfaces[key]["Adam"]["value"] < surfaces[key]["GD"]["value"], key


def test_trajectories_race_clock():
    race_steps = load_example("trajectories").race_steps
    shown = race_steps(800, 100)
    assert shown[0] == 0 and shown[-1] == 800
    assert (np.diff(shown) >= 1).all()           # every frame moves the clock on
    assert (np.diff(shown)[:30] == 1).all()       # one step a frame at the start
    assert (race_steps(5, 20) <= 5).all() and race_steps(5, 20)[-1] == 5


def test_ema_bias_correction_of_a_constant():
    # A constant series: the bias-corrected average is the constant from the first step on;
    # the uncorrected one starts at (1 - beta) times it and climbs as 1 - beta**t.
    averages = load_example("ema_bias_correction").averages
    t = np.arange(1, 201)
    for beta in (0.5, 0.9, 0.98):
        np.testing.assert_allclose(averages(np.full(200, 7.0), beta, True), 7.0, rtol=1e-13)
        np.testing.assert_allclose(averages(np.full(200, 7.0), beta, False),
                                   7.0 * (1 - beta**t), rtol=1e-12)


def test_ema_bias_correction_example(tmp_path):
    results = load_example("ema_bias_correction").main(["--quick", "--out", str(tmp_path)])
    assert_nontrivial_png(results["figures"]["ema_bias_correction"])
    series = np.array(results["series"])
    assert len(series) == results["days"] == 120
    roughness = []
    for beta in (0.5, 0.9, 0.98):
        corrected = np.array(results["corrected"][beta])
        raw = np.array(results["raw"][beta])
        # Day 1: the corrected average is the first value, the raw one (1 - beta) of it.
        assert corrected[0] == pytest.approx(series[0], rel=1e-12)
        assert raw[0] == pytest.approx((1 - beta) * series[0], rel=1e-12)
        # After 2 / (1 - beta) days the two differ by less than beta**t of the average.
        t = int(2 / (1 - beta))
        assert abs(corrected[t] - raw[t]) < 1.01 * beta ** (t + 1) * abs(corrected[t])
        roughness.append(np.abs(np.diff(corrected[t:])).mean())
    # A larger beta averages more days: a smoother curve.
    assert roughness[0] > roughness[1] > roughness[2]


@pytest.mark.parametrize("name", ["train_mlp", "trajectories", "ema_bias_correction",
                                  "char_transformer"])
def test_command_line_help(name):
    # The subprocess imports the same fastoptim as this test (installed, or PYTHONPATH=python).
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--out" in proc.stdout


@pytest.mark.parametrize("png", sorted(DOCS_IMG.glob("*.png")) if DOCS_IMG.is_dir() else [],
                         ids=lambda p: p.name)
def test_committed_pictures_are_small(png):
    assert png.stat().st_size < 300_000


@pytest.mark.skipif(not (DOCS_IMG / "race.gif").is_file(), reason="no docs/img/race.gif")
def test_committed_race_gif():
    assert assert_gif(DOCS_IMG / "race.gif", min_frames=50) <= 150


def test_char_transformer_quick(tmp_path):
    pytest.importorskip("torch")
    results = load_example("char_transformer").main(
        ["--quick", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert_nontrivial_png(results["figure"])
    assert json.loads((tmp_path / "r.json").read_text())["params"] == results["params"]
    table = results["table"]
    assert list(table) == ["torch fused fp32", "fp32", "bf16", "int8", "int4"]
    for config, runs in results["runs"].items():
        assert all(r["finite"] for r in runs), config
        # 60 steps from ln(98) = 4.58 nats: every format learns the character statistics
        assert table[config]["train_loss"] < 3.2, config
        assert 0 < table[config]["val_acc"] <= 100
    # fastoptim's float32 AdamW is torch's algorithm: the same losses up to rounding
    assert abs(table["fp32"]["train_loss"] / table["torch fused fp32"]["train_loss"] - 1) < 1e-3
    # Measured state memory: bf16 halves it; int8 / int4 store 1 / 0.5 byte per element plus
    # an absmax per block, and the few tensors under 4,096 elements keep float32 states.
    assert table["bf16"]["state_bytes_vs_fp32"] == pytest.approx(0.5, abs=0.01)
    assert 0.25 < table["int8"]["state_bytes_vs_fp32"] < 0.3
    assert 0.12 < table["int4"]["state_bytes_vs_fp32"] < table["int8"]["state_bytes_vs_fp32"]

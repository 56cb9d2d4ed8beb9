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


def test_trajectories(tmp_path):
    results = load_example("trajectories").main(["--quick", "--out", str(tmp_path)])
    assert_nontrivial_png(results["figures"]["trajectories"])
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


@pytest.mark.parametrize("name", ["train_mlp", "trajectories"])
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

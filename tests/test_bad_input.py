"""Bad input through the real CLI: every case is exit code 2, exactly one line on stderr, no
traceback, and no file left behind (the working folder is compared before and after).

Also: planted malicious pickles (.ckpt, .pt, CIFAR batch) are refused without running their
payload; every ``torch.load``/``pickle`` use in the source is the safe kind; and a hypothesis
fuzz of ``Config.from_dict`` (anything is either a config or a one-line ConfigError).
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from difflab.cli import main
from difflab.config import Config
from difflab.data import load_dataset, write_idx
from difflab.errors import ConfigError
from difflab.io import save_tensors
from difflab.models.unet import UNet2DModel, UNetConfig
from difflab.runs.diffusion import save_bundle
from difflab.training import TrainConfig
from difflab.training.objectives import DiffusionConfig

TINY = dict(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            attention_levels=(False, True), norm_num_groups=4, attention_head_dim=8,
            sample_size=8)
TRAIN = ["train", "ddpm", "--steps", "2", "--batch-size", "4", "--no-progress", "--out", "run"]
SAMPLE = ["sample", "--n", "2", "--steps", "2", "--out", "out.png"]


# ------------------------------------------------------------------------------ input makers
def _mnist(tmp: Path, images: bytes | None = None) -> None:
    """$DIFFLAB_DATA/mnist with 8 valid 28×28 train images + labels; ``images`` replaces the
    image file's bytes."""
    folder = tmp / "data" / "mnist"
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte", np.zeros((8, 28, 28), np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(8, dtype=np.uint8))
    if images is not None:
        (folder / "train-images-idx3-ubyte").write_bytes(images)


def _idx_bytes(tmp: Path) -> bytes:
    path = write_idx(tmp / "scratch.idx", np.zeros((8, 28, 28), np.uint8))
    blob = path.read_bytes()
    path.unlink()
    return blob


def _png(path: Path, size: int = 8, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), color=100 if mode == "L" else (10, 20, 30)).save(path)


class _Payload:
    """Unpickling runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A valid (tiny, untrained) diffusion model folder for `difflab sample`."""
    folder = tmp_path_factory.mktemp("model") / "model"
    torch.manual_seed(0)
    save_bundle(folder, UNet2DModel(UNetConfig(**TINY)), DiffusionConfig(),
                load_dataset("digits"))
    return folder


def _bad_model(tmp: Path, good: Path, edit: Callable[[Path], None]) -> str:
    folder = tmp / "model"
    shutil.copytree(good, folder)
    edit(folder)
    return str(folder)


def _edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        d = json.loads((folder / name).read_text())
        change(d)
        (folder / name).write_text(json.dumps(d))
    return edit


def _edit_tensor(key: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file
        sd = load_file(str(folder / "model.safetensors"))
        sd[key] = make(sd[key])
        save_tensors(folder / "model.safetensors", sd)
    return edit


# --------------------------------------------------------------------- the table of bad input
# name -> setup(tmp, model_folder) -> argv (run with the working folder = tmp)
CASES: dict[str, Callable[[Path, Path], list[str]]] = {
    # data files
    "idx truncated": lambda t, m: (_mnist(t, _idx_bytes(t)[:-100]), TRAIN + ["--data", "mnist"])[1],
    "idx wrong magic": lambda t, m: (_mnist(t, b"\x01\x02" + _idx_bytes(t)[2:]),
                                     TRAIN + ["--data", "mnist"])[1],
    "idx 2^32-1 images claimed": lambda t, m: (
        _mnist(t, bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") + (28).to_bytes(4, "big")
               + (28).to_bytes(4, "big") + bytes(100)), TRAIN + ["--data", "mnist"])[1],
    "idx.gz header 2^96 bytes": lambda t, m: (
        _mnist(t, gzip.compress(b"\x00\x00\x08\x03" + b"\xff" * 12)),
        TRAIN + ["--data", "mnist"])[1],
    "folder: sizes differ": lambda t, m: (_png(t / "imgs/a.png", 8), _png(t / "imgs/b.png", 12),
                                          TRAIN + ["--data", "./imgs"])[2],
    "folder: modes differ": lambda t, m: (_png(t / "imgs/a.png", 8, "L"),
                                          _png(t / "imgs/b.png", 8, "RGB"),
                                          TRAIN + ["--data", "./imgs"])[2],
    "folder: corrupt png": lambda t, m: (_png(t / "imgs/a.png"),
                                         (t / "imgs/b.png").write_bytes(b"\x89PNG\r\n\x1a\nxx"),
                                         TRAIN + ["--data", "./imgs"])[2],
    "folder: empty": lambda t, m: ((t / "imgs").mkdir(), TRAIN + ["--data", "./imgs"])[1],
    "data set: unknown name": lambda t, m: TRAIN + ["--data", "imagenet"],
    # flags
    "negative steps": lambda t, m: [*TRAIN[:2], "--steps", "-1", "--data", "digits"],
    "lr nan": lambda t, m: TRAIN + ["--lr", "nan", "--data", "digits"],
    "batch size 10^9": lambda t, m: TRAIN + ["--data", "digits", "--batch-size", str(10**9)],
    "unknown scheduler": lambda t, m: SAMPLE + ["--ckpt", str(m), "--scheduler", "bogus"],
    "guidance nan": lambda t, m: SAMPLE + ["--ckpt", str(m), "--guidance", "nan"],
    "guidance inf": lambda t, m: SAMPLE + ["--ckpt", str(m), "--guidance", "inf"],
    "guidance -inf": lambda t, m: SAMPLE + ["--ckpt", str(m), "--guidance", "-inf"],
    # outputs: checked before any work (a finished training run must not die on its --out)
    "--out under /proc (train)": lambda t, m: TRAIN + ["--data", "digits", "--out", "/proc/r"],
    "--out is a file (train)": lambda t, m: ((t / "afile").write_text("x"),
                                             TRAIN + ["--data", "digits", "--out", "afile"])[1],
    "--out not an image name": lambda t, m: SAMPLE + ["--ckpt", str(m), "--out", "grid.txt"],
    "--out inside a file": lambda t, m: ((t / "afile").write_text("x"),
                                         SAMPLE + ["--ckpt", str(m), "--out", "afile/g.png"])[1],
    "--out under /proc (eval)": lambda t, m: ["eval", "--ckpt", str(m), "--metric", "fid",
                                              "--out", "/proc/m.json"],
    "--out holds a run (train)": lambda t, m: ((t / "run" / "checkpoint").mkdir(parents=True),
                                               TRAIN + ["--data", "digits"])[1],
    # values that used to fail late or silently
    "steps > trained timesteps (lms)": lambda t, m: SAMPLE + ["--ckpt", str(m), "--scheduler",
                                                             "lms", "--steps", "1001"],
    "guidance on an unconditional model": lambda t, m: SAMPLE + ["--ckpt", str(m), "--guidance",
                                                                "3"],
    "eval: pr with n <= k": lambda t, m: ["eval", "--ckpt", str(m), "--metric", "pr", "--n",
                                          "3", "--data", "digits", "--out", "m.json"],
    "eval: steps > trained timesteps": lambda t, m: ["eval", "--ckpt", str(m), "--metric", "fid",
                                                     "--steps", "5000", "--data", "digits",
                                                     "--out", "m.json"],
    "plot forward: index out of range": lambda t, m: ["plot", "forward", "--data", "digits",
                                                      "--index", "5000", "--out", "f.png"],
    "seed 2^64": lambda t, m: SAMPLE + ["--ckpt", str(m), "--seed", str(2**64)],
    "image size 10^5": lambda t, m: ["data", "info", "digits", "--image-size", "100000",
                                     "--out", "x.png"],
    # model folders (configs and weights)
    "config.json malformed": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, lambda f: (f / "config.json").write_text('{"_class_name": "UNet2DModel",'))],
    "config.json unknown key": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_json("config.json", lambda d: d.update(bogus_key=1)))],
    "config.json wrong type": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_json("config.json", lambda d: d.update(block_out_channels="8,16")))],
    "config.json not an object": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, lambda f: (f / "config.json").write_text("[1, 2]"))],
    "diffusion_config wrong type": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_json("diffusion_config.json", lambda d: d.update(num_train_timesteps=1.5)))],
    "diffusion_config bad value": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_json("diffusion_config.json", lambda d: d.update(prediction_type="x")))],
    "weights: wrong shape": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_tensor("conv_in.weight", lambda w: torch.zeros(3, 3)))],
    "weights: wrong dtype": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, _edit_tensor("conv_in.weight", lambda w: w.to(torch.int64)))],
    "weights: missing key": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, lambda f: _drop(f, "conv_in.bias"))],
    "weights: truncated file": lambda t, m: SAMPLE + ["--ckpt", _bad_model(
        t, m, lambda f: _truncate(f / "model.safetensors"))],
    "checkpoint folder missing": lambda t, m: SAMPLE + ["--ckpt", str(t / "nope")],
    # planted pickles (the payload would create t/pwned)
    "malicious .ckpt (sd)": lambda t, m: ["sd", "--model", _evil(t, "evil.ckpt"), "--prompt", "x",
                                          "--steps", "1", "--out", "out.png", "--cpu"],
    "malicious .pt (sd)": lambda t, m: ["sd", "--model", _evil(t, "evil.pt"), "--prompt", "x",
                                        "--steps", "1", "--out", "out.png", "--cpu"],
    "malicious cifar batch": lambda t, m: (_evil_cifar(t), TRAIN + ["--data", "cifar10"])[1],
}


def _drop(folder: Path, key: str) -> None:
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    del sd[key]
    save_tensors(folder / "model.safetensors", sd)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _evil(tmp: Path, name: str) -> str:
    """A pickled checkpoint whose unpickling would run the payload, with a (minimal) tokenizer
    beside it so that the SD loader gets as far as reading the weights."""
    torch.save({"state_dict": {"x": _Payload(tmp / "pwned")}}, tmp / name)
    tok = tmp / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1,
                                                "a</w>": 2}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    return str(tmp / name)


def _evil_cifar(tmp: Path) -> None:
    folder = tmp / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in
                                                                         range(10)]}))
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": _Payload(tmp / "pwned"),
                                                  "labels": [0]}))


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_no_leftovers(case, tmp_path, model_folder, capsys,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    argv = CASES[case](tmp_path, model_folder)
    before = _tree(tmp_path)
    tracemalloc.start()
    try:
        code, _, err = run_cli(argv, capsys)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("difflab"), err
    assert _tree(tmp_path) == before, "files were created or changed"
    assert not (tmp_path / "pwned").exists(), "the pickle payload ran"
    assert peak < 256 << 20, f"Python-side peak {peak:,} bytes"  # nothing huge was allocated


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a GPU")
def test_fp16_without_a_gpu_is_refused_not_silently_float32(model_folder, tmp_path, capsys):
    code, _, err = run_cli(SAMPLE[:-1] + [str(tmp_path / "o.png"), "--ckpt", str(model_folder),
                                          "--mixed-precision", "fp16"], capsys)
    assert code == 2 and "needs a CUDA GPU" in err and not (tmp_path / "o.png").exists()


def test_refusals_say_why(tmp_path, model_folder, capsys, monkeypatch):
    """Spot-check that the one line names the actual problem."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFLAB_DATA", str(tmp_path / "data"))
    want = {"batch size 10^9": "batch size", "weights: wrong dtype": "dtype",
            "weights: wrong shape": "shape", "config.json wrong type": "wrong type",
            "config.json unknown key": "bogus_key", "malicious .ckpt (sd)": "refused",
            "malicious cifar batch": "refused", "idx 2^32-1 images claimed": "mnist",
            "eval: steps > trained timesteps": "--steps 5000: num_inference_steps=5000"}
    for case, word in want.items():
        for p in tmp_path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _, _, err = run_cli(CASES[case](tmp_path, model_folder), capsys)
        assert word in err, (case, err)


def test_real_process_stderr_is_one_line(tmp_path):
    """The same through a real `difflab` process (warnings of imported libraries included)."""
    proc = subprocess.run([sys.executable, "-m", "difflab.cli", *TRAIN, "--data", "digits",
                           "--batch-size", str(10**9)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- safe loading
def test_every_torch_load_is_weights_only_and_pickle_is_restricted():
    """A source scan: each torch.load passes weights_only=True; pickle is used only through a
    restricted Unpickler subclass (CIFAR), never pickle.load/loads."""
    src = Path(__file__).parents[1] / "src" / "difflab"
    loads = 0
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = f"{getattr(owner, 'id', '?')}.{node.func.attr}"
            if name == "torch.load":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and \
                    kw["weights_only"].value is True, f"{path}:{node.lineno}"
            assert name not in ("pickle.load", "pickle.loads", "torch._load",
                                "numpy.load", "np.load") or _allow_pickle_false(node), \
                f"{path}:{node.lineno}: {name}"
    assert loads >= 2  # the interop and Inception readers


def _allow_pickle_false(node: ast.Call) -> bool:
    kw = {k.arg: k.value for k in node.keywords}
    return isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value is False


# ------------------------------------------------------------------------- config parser fuzz
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40)
                    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                           max_size=3),
                    max_leaves=8)
CONFIGS = [TrainConfig, DiffusionConfig, UNetConfig]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(cls=st.sampled_from(CONFIGS), data=st.data())
def test_config_from_dict_fuzz(cls, data):
    """Random values for real field names (and a few random keys): the result is a config
    that round-trips through JSON, or a one-line ConfigError — never another exception."""
    import dataclasses
    names = [f.name for f in dataclasses.fields(cls)]
    d = data.draw(st.dictionaries(st.sampled_from(names) | st.text(max_size=5), JSON,
                                  max_size=4))
    try:
        cfg = cls.from_dict(d)
    except ConfigError as e:
        assert "\n" not in str(e) and cls.__name__ in str(e) or "expected" in str(e)
        return
    assert cls.from_dict(json.loads(cfg.to_json())) == cfg or _has_nan(cfg.to_dict())


def _has_nan(d: dict) -> bool:
    return any(isinstance(v, float) and math.isnan(v) for v in d.values())


@settings(max_examples=30, deadline=None, derandomize=True)
@given(text=st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin1")))
def test_config_from_json_fuzz(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz_config.json"
    path.write_text(text, encoding="utf-8")
    try:
        TrainConfig.from_json(path)
    except ConfigError as e:
        assert "\n" not in str(e)


def test_config_subclasses_round_trip_defaults():
    """Every config class with all-default fields passes its own type check."""
    import difflab.models  # noqa: F401  (imports every model config)
    import difflab.runs.demo  # noqa: F401

    def subclasses(c):
        for s in c.__subclasses__():
            yield s
            yield from subclasses(s)

    checked = 0
    for cls in set(subclasses(Config)):
        try:
            cfg = cls()
        except TypeError:  # has required fields
            continue
        assert cls.from_dict(json.loads(cfg.to_json())) == cfg, cls.__name__
        checked += 1
    assert checked >= 8
